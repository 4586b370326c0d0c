"""LoHa, LoKr, OFT, BOFT: equations against direct computations, PEFT's shape rules, PEFT interop both ways.

Interop: every case adapts a tiny model on one side with non-identity weights, saves, loads on the other side
onto an untouched copy of the base and compares outputs in float32 (max abs diff <= 1e-5).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import BOFTConfig, LoHaConfig, LoKrConfig, OFTConfig, PeftModel, get_peft_model
from peft.tuners.boft import layer as peft_boft
from peft.tuners.boft.layer import BOFTLayer
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn

import deltatune as dt
from conftest import build_conv
from deltatune.io.adapter import read_config
from deltatune.methods.lycoris import factorization
from deltatune.methods.orthogonal import butterfly_perm
from test_peft_interop import tiny_bert, tiny_gpt2, tiny_llama

ATOL = 1e-5
PEFT_CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig, "oft": OFTConfig, "boft": BOFTConfig}


# -- helpers ----------------------------------------------------------------------------------------
class ConvSquare(nn.Module):
    """Convolutions with square kernels (PEFT's BOFT Conv2d needs them), a Conv1d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(3, 4, kernel_size=3, padding=1)
        self.img = nn.Conv2d(4, 6, kernel_size=2, padding=1, stride=2)  # filters 4 x 2 x 2 = 16 wide
        self.head = nn.Linear(10, 4)

    def forward(self, seq, img):
        return self.head(torch.cat([self.seq(seq).mean(-1), self.img(img).mean((-1, -2))], dim=-1))


def conv_square(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConvSquare().eval()


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_conv().eval()


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "conv": conv_net, "square": conv_square}


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind in ("conv", "square"):
        return {"seq": torch.randn(2, 3, 10, generator=g), "img": torch.randn(2, 3 if kind == "conv" else 4, 6, 6,
                                                                                  generator=g)}
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


@torch.no_grad()
def out(model: nn.Module, kind: str) -> torch.Tensor:
    model.eval()
    y = model(**inputs(kind))
    return y.logits if hasattr(y, "logits") else y


@torch.no_grad()
def jitter(params, seed: int = 2, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=g))


def close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    assert (want - base).abs().max() > 1e-4, "the adapter does not change the output: the comparison proves nothing"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.3g}"
    return diff


def peft_load(base: nn.Module, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


def saved_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


class FakeFBD:
    """PEFT's BOFT silently drops to one butterfly factor unless its CUDA block-diagonal extension loads;
    this CPU stand-in (same contract: (N, D, b, b) -> [(N, D b, D b)]) lets PEFT compute several factors."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*blocks) for blocks in x])]


@pytest.fixture
def peft_butterfly(monkeypatch):
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", FakeFBD())


# -- deltatune -> peft and peft -> deltatune -----------------------------------------------------------
ATTN_MLP = ["q_proj", "v_proj", "down_proj"]
BERT = ["query", "value", "intermediate.dense"]
SQUARE_ALL = ["seq", "img", "head"]
CONV_ALL = ["conv1", "conv2", "conv3", "head"]
INTEROP = {
    "loha-llama": ("llama", "loha", dict(r=4, alpha=6, targets=ATTN_MLP)),
    "loha-patterns": ("llama", "loha", dict(r=4, alpha=6, targets=ATTN_MLP, rank_pattern={"v_proj": 2},
                                            alpha_pattern={r"layers\.1\..*": 3.0})),
    "loha-bert": ("bert", "loha", dict(r=2, alpha=4, targets=BERT)),
    "loha-conv": ("conv", "loha", dict(r=2, alpha=4, targets=CONV_ALL)),
    "loha-conv-effective": ("conv", "loha", dict(r=2, alpha=4, targets=CONV_ALL, use_effective_conv2d=True)),
    "lokr-llama": ("llama", "lokr", dict(r=4, alpha=6, targets=ATTN_MLP)),
    "lokr-decompose-both": ("llama", "lokr", dict(r=1, alpha=6, targets=ATTN_MLP, decompose_both=True)),
    "lokr-factor": ("llama", "lokr", dict(r=2, alpha=3, targets=ATTN_MLP, decompose_factor=4)),
    "lokr-bert": ("bert", "lokr", dict(r=2, alpha=4, targets=BERT)),
    "lokr-conv": ("conv", "lokr", dict(r=1, alpha=2, targets=CONV_ALL)),
    "lokr-conv-full": ("conv", "lokr", dict(r=8, alpha=2, targets=CONV_ALL)),
    # not conv3: PEFT's torch.kron fails on its (3, 1) kernel in this mode (a view/stride error inside PEFT)
    "lokr-conv-effective": ("conv", "lokr", dict(r=1, alpha=2, targets=["conv1", "conv2", "head"],
                                                 use_effective_conv2d=True)),
    "oft-llama": ("llama", "oft", dict(oft_block_size=8, targets=ATTN_MLP)),
    "oft-exact-cayley": ("llama", "oft", dict(oft_block_size=8, use_cayley_neumann=False, targets=ATTN_MLP)),
    "oft-neumann-3": ("llama", "oft", dict(oft_block_size=8, num_cayley_neumann_terms=3, targets=ATTN_MLP)),
    "oft-r-block-share": ("llama", "oft", dict(r=4, oft_block_size=0, block_share=True, targets=ATTN_MLP)),
    "oft-coft": ("llama", "oft", dict(oft_block_size=8, coft=True, eps=0.2, targets=ATTN_MLP)),
    "oft-adjusted-block": ("llama", "oft", dict(oft_block_size=12, targets=ATTN_MLP)),
    "oft-bert": ("bert", "oft", dict(oft_block_size=16, targets=BERT)),
    "boft-llama": ("llama", "boft", dict(boft_block_size=4, targets=ATTN_MLP)),
    "boft-block-num": ("llama", "boft", dict(boft_block_size=0, boft_block_num=2, targets=ATTN_MLP)),
    "boft-bert": ("bert", "boft", dict(boft_block_size=8, targets=BERT)),
    "boft-conv2d": ("square", "boft", dict(boft_block_size=4, targets=["img"])),
}
BUTTERFLY = {
    "boft-butterfly-2": ("llama", "boft", dict(boft_block_size=4, boft_n_butterfly_factor=2, targets=ATTN_MLP)),
    "boft-butterfly-3": ("llama", "boft", dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3,
                                               targets=ATTN_MLP)),
    "boft-butterfly-conv2d": ("square", "boft", dict(boft_block_size=2, boft_n_butterfly_factor=2, targets=["img"])),
}
OMITTED = {"alpha": "alpha", "targets": "target_modules"}


def peft_kwargs(kw: dict) -> dict:
    return {OMITTED.get(k, k): v for k, v in kw.items()}


def to_peft(case: dict, tmp_path: Path) -> float:
    kind, method, kw = case
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = out(base, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an adjusted OFT block size warns
        dm = dt.attach(base, dt.config(method, init_weights=False, **kw))
    jitter(p for d in dm.deltas("default").values() for p in d.parameters())
    want = out(dm, kind)
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    assert theirs == saved_keys(tmp_path)  # PEFT adapts exactly our modules, with the same tensor shapes
    return close(out(pm, kind), want, base_out)


def from_peft(case: dict, tmp_path: Path) -> float:
    kind, method, kw = case
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = out(base, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, PEFT_CONFIGS[method](init_weights=False, **peft_kwargs(kw)))
        jitter(p for n, p in pm.named_parameters() if p.requires_grad)
        want = out(pm, kind)
        pm.save_pretrained(str(tmp_path))
        dm = dt.load_adapter(fresh, tmp_path)
    return close(out(dm, kind), want, base_out)


@pytest.mark.parametrize("case", list(INTEROP))
def test_deltatune_adapter_loads_in_peft(case, tmp_path):
    to_peft(INTEROP[case], tmp_path)


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_adapter_loads_in_deltatune(case, tmp_path):
    from_peft(INTEROP[case], tmp_path)


@pytest.mark.parametrize("case", list(BUTTERFLY))
def test_butterfly_factors_cross_with_peft_both_ways(case, tmp_path, peft_butterfly):
    to_peft(BUTTERFLY[case], tmp_path / "to")
    from_peft(BUTTERFLY[case], tmp_path / "from")


def test_saved_configs_parse_in_peft_with_the_same_fields(tmp_path):
    cfgs = {
        "loha": dict(r=4, alpha=6.0, rank_dropout=0.1, module_dropout=0.2, use_effective_conv2d=True),
        "lokr": dict(r=2, alpha=3.0, decompose_both=True, decompose_factor=4, rank_dropout_scale=True),
        "oft": dict(oft_block_size=8, coft=True, eps=1e-3, block_share=True, num_cayley_neumann_terms=7),
        "boft": dict(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.1),
    }
    for method, kw in cfgs.items():
        folder = tmp_path / method
        dt.attach(tiny_llama(), dt.config(method, targets=["q_proj"], **kw)).save(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert saved["peft_type"] == method.upper() and saved["deltatune"]["type"] == method
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "old OFT format" or version warnings
            warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['deltatune'\]")
            theirs = PEFT_CONFIGS[method].from_pretrained(str(folder))
        for k, v in kw.items():
            assert getattr(theirs, k) == v, k
        assert set(theirs.target_modules) == {"q_proj"}
        assert read_config(folder).type == method


# -- PEFT's shape rules ----------------------------------------------------------------------------
def test_factorization_is_peft_rule():
    for n in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16, 17):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)


@pytest.mark.parametrize("n,num,size,factor", [(32, 8, 4, 2), (64, 16, 4, 3), (12, 6, 2, 2), (96, 8, 12, 4),
                                               (32, 4, 8, 1), (27, 3, 9, 1)])
def test_butterfly_permutations_are_peft_ones(n, num, size, factor):
    for i in range(factor):
        want = BOFTLayer.block_butterfly_perm(None, n, int(num / 2 ** i), int(size / 2), factor - 1)
        assert torch.equal(butterfly_perm(n, num // 2 ** i, size // 2, factor - 1), want)


@pytest.mark.parametrize("r,both,factor", [(4, False, -1), (1, True, -1), (8, True, 4), (2, False, 2), (16, True, -1)])
def test_lokr_shapes_are_the_ones_peft_creates(r, both, factor):
    ours = dt.attach(tiny_llama(), dt.config("lokr", r=r, decompose_both=both, decompose_factor=factor))
    got = {f"{p}.{k}": tuple(v.shape) for p, d in ours.deltas("default").items() for k, v in d.state_dict().items()}
    pm = get_peft_model(tiny_llama(), LoKrConfig(r=r, decompose_both=both, decompose_factor=factor,
                                                  target_modules="all-linear"))
    want = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in get_peft_model_state_dict(pm).items()}
    assert got == want


# -- equations -------------------------------------------------------------------------------------
def _x(n: int = 5, width: int = 32) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(3))


def adapted_linear(method: str, module: nn.Module | None = None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(module or nn.Linear(32, 24)).eval()
    dm = dt.attach(model, dt.config(method, init_weights=False, targets=["0"], **kw)).eval()
    delta = dm.deltas("default")["0"]
    jitter(delta.parameters())
    return dm, model[0].base, delta


def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    dm, base, d = adapted_linear("loha", r=3, alpha=5.0)
    dw = 5.0 / 3 * (d.hada_w1_a @ d.hada_w1_b) * (d.hada_w2_a @ d.hada_w2_b)
    x = _x()
    torch.testing.assert_close(dm(x), F.linear(x, base.weight + dw, base.bias), atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(dw).item() > 3  # the Hadamard product exceeds rank r


def test_lokr_is_a_scaled_kronecker_product():
    dm, base, d = adapted_linear("lokr", r=1, alpha=3.0, decompose_both=True)
    assert (d.lokr_w1_a.shape, d.lokr_w2_a.shape) == ((4, 1), (6, 1))  # 24 = 4 x 6, 32 = 4 x 8
    w1, w2 = d.lokr_w1_a @ d.lokr_w1_b, d.lokr_w2_a @ d.lokr_w2_b
    dw = 3.0 * torch.stack([torch.stack([w1[i, j] * w2 for j in range(4)], 1) for i in range(4)]).reshape(24, 32)
    x = _x()
    torch.testing.assert_close(dm(x), F.linear(x, base.weight + dw, base.bias), atol=1e-6, rtol=0)


def test_lokr_lycoris_init_zeroes_w2_and_is_the_identity():
    d = dt.attach(nn.Sequential(nn.Linear(32, 24)), dt.config("lokr", r=2, init_weights="lycoris")).deltas(
        "default")["0"]
    assert d.lokr_w2_b.abs().sum() == 0 and d.lokr_w1.abs().sum() > 0


def test_oft_rotates_the_input_by_a_block_diagonal_orthogonal_matrix():
    dm, base, d = adapted_linear("oft", oft_block_size=8, use_cayley_neumann=False)
    r = d.rotation()
    torch.testing.assert_close(r @ r.T, torch.eye(32), atol=1e-5, rtol=0)
    assert r[:8, 8:].abs().sum() == 0  # block diagonal
    q = torch.zeros(8, 8)
    q[tuple(torch.triu_indices(8, 8, 1))] = d.oft_R.weight[0]
    q = q - q.T
    torch.testing.assert_close(r[:8, :8], (torch.eye(8) - q) @ torch.linalg.inv(torch.eye(8) + q), atol=1e-5, rtol=0)
    x = _x()
    torch.testing.assert_close(dm(x), base(x @ r), atol=1e-5, rtol=0)
    w = base.weight.detach().clone()
    dm.merge()
    torch.testing.assert_close(base.weight, w @ r.T, atol=1e-6, rtol=0)  # W' = W R^T


def test_oft_neumann_series_is_the_truncated_cayley_of_the_other_sign():
    _, _, d = adapted_linear("oft", oft_block_size=4, num_cayley_neumann_terms=5)
    q = torch.zeros(4, 4)
    q[tuple(torch.triu_indices(4, 4, 1))] = d.oft_R.weight[0]
    q = q - q.T
    series = torch.eye(4) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(d.blocks()[0], series, atol=1e-6, rtol=0)
    exact = (torch.eye(4) + q) @ torch.linalg.inv(torch.eye(4) - q)
    assert (d.blocks()[0] - exact).abs().max() < 1e-2


def test_oft_neumann_unmerge_restores_the_weight_although_r_is_not_exactly_orthogonal():
    dm, base, d = adapted_linear("oft", oft_block_size=8)
    with torch.no_grad():
        d.oft_R.weight.mul_(3)
    r = d.rotation()
    assert (r @ r.T - torch.eye(32)).abs().max() > 1e-4
    w0 = base.weight.detach().clone()
    dm.merge()
    dm.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_coft_projects_in_place_while_training_and_never_in_eval():
    dm, base, d = adapted_linear("oft", oft_block_size=8, coft=True, eps=0.05)
    before = d.oft_R.weight.detach().clone()
    dm.eval()
    dm(_x())
    dm.merge()
    dm.unmerge()
    assert torch.equal(d.oft_R.weight, before)  # evaluation and merging leave the parameter alone
    dm.train()
    dm(_x()).sum().backward()
    q = d._skew(d.oft_R.weight.detach())
    assert (q.norm(dim=(1, 2)) <= 0.05 / math.sqrt(4) + 1e-7).all()
    assert not torch.equal(d.oft_R.weight, before)


def test_boft_is_scaled_rotation_by_a_product_of_permuted_block_diagonal_factors():
    dm, base, d = adapted_linear("boft", boft_block_size=4, boft_n_butterfly_factor=3)
    m, blocks, b, _ = d.boft_R.shape
    assert (m, blocks, b) == (3, 8, 4)
    factors = []
    for i in range(m):
        a = d.boft_R[i]
        s = 0.5 * (a - a.transpose(-1, -2))
        q = torch.block_diag(*[(torch.eye(b) - si) @ torch.linalg.inv(torch.eye(b) + si) for si in s])
        perm = BOFTLayer.block_butterfly_perm(None, 32, 8 // 2 ** i, 2, m - 1)
        p = BOFTLayer.perm2mat(None, perm)
        factors.append(p @ q @ p.T)
    r = factors[2] @ factors[1] @ factors[0]
    torch.testing.assert_close(d.rotation(), r, atol=1e-5, rtol=0)
    torch.testing.assert_close(r @ r.T, torch.eye(32), atol=1e-5, rtol=0)
    assert r[:4, 4:].abs().sum() > 0  # the butterfly mixes blocks
    x = _x()
    want = d.boft_s.view(-1) * F.linear(x @ r, base.weight) + base.bias
    torch.testing.assert_close(dm(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,kw", [("loha", dict(r=4)), ("lokr", dict(r=2)), ("oft", dict(oft_block_size=8)),
                                       ("boft", dict(boft_block_size=4, boft_n_butterfly_factor=2))])
def test_gpt2_conv1d_weight_in_out_is_handled_like_the_equivalent_linear(method, kw):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 32)  # weight (in=32, out=24)
    with torch.no_grad():
        conv.weight.normal_(0, 0.1)
        conv.bias.normal_(0, 0.1)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    dm_c, _, dc = adapted_linear(method, conv, **kw)
    dm_l, _, dl = adapted_linear(method, lin, **kw)
    dl.load_state_dict(dc.state_dict())
    x = _x()
    torch.testing.assert_close(dm_c(x), dm_l(x), atol=1e-5, rtol=0)
    dm_c.merge()
    dm_l.merge()
    torch.testing.assert_close(dm_c.model[0].base.weight.T, dm_l.model[0].base.weight, atol=1e-6, rtol=0)


# -- dropout options -------------------------------------------------------------------------------
def test_module_dropout_skips_the_delta_only_while_training():
    dm, base, d = adapted_linear("loha", r=4, module_dropout=0.999)
    x = _x()
    adapted = dm(x)
    assert (adapted - base(x)).abs().max() > 1e-3
    dm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(dm(x), base(x))
    dm.eval()
    assert torch.equal(dm(x), adapted)


@pytest.mark.parametrize("method,scaled", [("loha", True), ("lokr", False)])
def test_rank_dropout_drops_output_rows_while_training(method, scaled):
    kw = dict(rank_dropout=0.5) if method == "loha" else dict(rank_dropout=0.5, rank_dropout_scale=False)
    dm, base, d = adapted_linear(method, r=4, **kw)
    x = _x()
    full = dm(x) - base(x)
    dm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        part = dm(x) - base(x)
    dropped = part.abs().sum(0) == 0
    assert 0 < dropped.sum() < 24
    ratio = part[:, ~dropped] / full[:, ~dropped]
    want = 24 / (~dropped).sum() if scaled else 1.0
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(want)), atol=1e-4, rtol=1e-4)


def test_orthogonal_dropout_replaces_blocks_by_the_identity_while_training():
    dm, base, d = adapted_linear("oft", oft_block_size=4, module_dropout=0.5)
    x = _x()
    dm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        y = dm(x)
    blocks = d.blocks()
    kept = [i for i in range(8) if not torch.equal(blocks[i], torch.eye(4))]
    # exactly half the blocks act as the identity: some choice of 4 reproduces y
    from itertools import combinations
    eye = torch.eye(4)
    assert any(torch.allclose(y, base(x @ torch.block_diag(*[eye if i in c else blocks[i] for i in range(8)])),
                              atol=1e-5) for c in combinations(kept, 4))


# -- bad input -------------------------------------------------------------------------------------
def test_oft_refuses_convolutions_naming_the_module():
    with pytest.raises(ValueError, match=r"conv2 \(Conv2d\)"):
        dt.attach(conv_net(), dt.config("oft", oft_block_size=3, targets=["conv2"]))


def test_boft_block_size_that_does_not_divide_names_the_module_and_field():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"q_proj.*boft_block_size=5"):
        dt.attach(model, dt.config("boft", boft_block_size=5, targets=["q_proj"]))
    assert dt.owner_of(model) is None and list(model.state_dict()) == list(before)
    with pytest.raises(ValueError, match=r"even"):
        dt.attach(nn.Sequential(nn.Linear(12, 4)), dt.config("boft", boft_block_size=3, boft_n_butterfly_factor=2))


def test_oft_block_size_adjusts_to_a_divisor_with_a_warning_naming_the_module():
    with pytest.warns(UserWarning, match=r"0: oft_block_size=5 does not divide its input width 12; using 4"):
        d = dt.attach(nn.Sequential(nn.Linear(12, 4)), dt.config("oft", oft_block_size=5)).deltas("default")["0"]
    assert (d.r, d.block_size) == (3, 4)


@pytest.mark.parametrize("method,kw,field", [
    ("loha", dict(r=0), "r"), ("loha", dict(rank_dropout=1.5), "rank_dropout"), ("lokr", dict(decompose_factor=0),
                                                                                  "decompose_factor"),
    ("lokr", dict(init_weights="gaussian"), "init_weights"), ("oft", dict(r=4), "oft_block_size"),
    ("oft", dict(r=0, oft_block_size=0), "oft_block_size"), ("boft", dict(boft_block_num=4), "boft_block_num"),
    ("boft", dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor"), ("loha", dict(rank_pattern={"(": 2}), "("),
])
def test_bad_config_values_name_the_field(method, kw, field):
    with pytest.raises(ValueError, match=re_escape(field)):
        dt.config(method, **kw)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_peft_boft_file_without_its_butterfly_factors_gives_a_clear_error(tmp_path):
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA extension: PEFT uses one factor whatever the config says
        pm = get_peft_model(copy.deepcopy(base), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                            target_modules=["q_proj"]))
        pm.save_pretrained(str(tmp_path))
    with pytest.raises(dt.AdapterFileError, match=r"q_proj\.boft_R.*boft_n_butterfly_factor=1"):
        dt.load_adapter(base, tmp_path)
    assert dt.owner_of(base) is None or not dt.owner_of(base).configs


def test_old_peft_oft_format_is_refused_clearly(tmp_path):
    dt.attach(tiny_llama(), dt.config("oft", oft_block_size=8, targets=["q_proj"])).save(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    del data["deltatune"], data["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="PEFT < 0.14.*oft_block_size"):
        dt.load_adapter(tiny_llama(), tmp_path)
