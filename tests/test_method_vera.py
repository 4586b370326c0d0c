"""VeRA, FourierFT and MoRA: equations against direct computations, PEFT interop both ways, bad input.

PEFT 0.21.2 (installed) is the oracle for VeRA's and FourierFT's file format and numerics; MoRA is not in PEFT and
is checked against a direct re-implementation of the reference code's compress/decompress (kongds/MoRA, types 1
and 6) and against its own matrix form.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from peft import FourierFTConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.vera.model import _kaiming_init
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.mora import MoRA, mora_rank
from tiny_models import tiny as tiny_model

ATOL = 1e-5


# -- tiny models (random biases, so nothing hides behind zero biases) ---------------------------------
@torch.no_grad()
def _biases(model: nn.Module) -> nn.Module:
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.normal_(0, 0.1)
    return model.eval()


def tiny(kind: str, seed: int = 0) -> nn.Module:
    model = tiny_model(kind, seed)
    return model if kind == "llama" else _biases(model)


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"],
           "bert": ["query", "value", "dense"]}
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits


def assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter does not change the output: the comparison proves nothing"
    assert (got - want).abs().max() <= ATOL, f"max abs diff {(got - want).abs().max():.3g}"


@torch.no_grad()
def perturb(params, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * 0.5)


def peft_load(base: nn.Module, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


def peft_save(pm: PeftModel, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(folder))


def keys_and_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# == VeRA ==============================================================================================
def vera_deltas(dm: dt.DeltaModel, name: str = "default"):
    return dm.deltas(name)


def test_vera_projections_are_peft_kaiming_draws_from_the_key_sized_to_the_largest_layer():
    model = tiny("llama")
    dm = dt.attach(model, dt.config("vera", r=6, projection_prng_key=11, targets=TARGETS["llama"]))
    proj = next(iter(dm.deltas("default").values())).projection
    g = torch.Generator().manual_seed(11)
    want_a = _kaiming_init((6, 64), generator=g)  # largest in: down_proj (64)
    want_b = _kaiming_init((32, 6), generator=g)  # largest out: q_proj, down_proj (32)
    assert torch.equal(proj.vera_A, want_a) and torch.equal(proj.vera_B, want_b)


def test_vera_forward_and_merge_follow_the_equation():
    model = tiny("llama")
    dm = dt.attach(model, dt.config("vera", r=6, targets=["v_proj"], init_weights=False))
    path = "model.layers.0.self_attn.v_proj"
    d = dm.deltas("default")[path]
    base = dict(dm.sites())[path].base
    x = torch.randn(3, 5, 32)
    a, b = d.projection.vera_A[:, :32], d.projection.vera_B[:16]
    want = base(x) + d.vera_lambda_b * ((d.vera_lambda_d * (x @ a.T)) @ b.T)
    with torch.no_grad():
        torch.testing.assert_close(d(x, base(x), base), want, atol=1e-6, rtol=0)
        dw = torch.diag(d.vera_lambda_b) @ b @ torch.diag(d.vera_lambda_d) @ a
        torch.testing.assert_close(d.delta_weight(base), dw, atol=1e-6, rtol=0)


def test_vera_default_init_is_peft_init():
    dm = dt.attach(tiny("llama"), dt.config("vera", r=4, d_initial=0.3, targets=["q_proj"]))
    for d in dm.deltas("default").values():
        assert torch.equal(d.vera_lambda_b, torch.zeros(32)) and torch.equal(d.vera_lambda_d, torch.full((4,), 0.3))


def test_vera_one_projection_per_adapter_shared_by_all_its_layers(tmp_path):
    model = tiny("llama")
    dm = dt.attach(model, dt.config("vera", r=8, init_weights=False))  # all-linear: 14 layers
    dm.add(dt.config("vera", r=4, projection_prng_key=3, targets=["q_proj", "k_proj"], init_weights=False), "b")
    for name in ("default", "b"):
        projs = {id(d.projection) for d in dm.deltas(name).values()}
        ptrs = {d.projection.vera_A.data_ptr() for d in dm.deltas(name).values()}
        assert len(dm.deltas(name)) > 1 and len(projs) == 1 and len(ptrs) == 1
    assert next(iter(dm.deltas("default").values())).projection is not next(iter(dm.deltas("b").values())).projection
    # the projections are buffers: no parameters added, nothing in the model's state dict
    assert not any("vera_A" in k or "vera_B" in k for k in dm.state_dict())
    dm.save(tmp_path)
    # loaded adapters share too (one A/B per loaded adapter), and are the file's tensors
    dm2 = dt.load_adapter(tiny("llama"), tmp_path, name="x")
    dm2.load(tmp_path / "b", "y")
    files = {"x": load_file(str(tmp_path / "adapter_model.safetensors")),
             "y": load_file(str(tmp_path / "b" / "adapter_model.safetensors"))}
    for name in ("x", "y"):
        projs = {id(d.projection) for d in dm2.deltas(name).values()}
        assert len(projs) == 1
        proj = next(iter(dm2.deltas(name).values())).projection
        assert torch.equal(proj.vera_A, files[name]["base_model.vera_A"])
        assert torch.equal(proj.vera_B, files[name]["base_model.vera_B"])
    for ours, theirs in (("default", "x"), ("b", "y")):
        dm.activate(ours)
        dm2.activate(theirs)
        assert torch.equal(logits(dm2), logits(dm))


def test_vera_file_has_peft_keys_and_config(tmp_path):
    dt.attach(tiny("llama"), dt.config("vera", r=4, targets=TARGETS["llama"])).save(tmp_path / "ours")
    pm = get_peft_model(tiny("llama"), VeraConfig(r=4, target_modules=TARGETS["llama"]))
    peft_save(pm, tmp_path / "theirs")
    assert keys_and_shapes(tmp_path / "ours") == keys_and_shapes(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for k in ("peft_type", "r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "bias",
              "init_weights"):
        assert ours[k] == theirs[k], k
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_deltatune_adapter_loads_in_peft(kind, save_projection, tmp_path):
    base = tiny(kind)
    fresh = copy.deepcopy(base)
    y0 = logits(base)
    cfg = dt.config("vera", r=8, projection_prng_key=5, save_projection=save_projection, targets=TARGETS[kind],
                    init_weights=False)
    dm = dt.attach(base, cfg)
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    want = logits(dm)
    dm.save(tmp_path)
    assert ("base_model.vera_A" in keys_and_shapes(tmp_path)) == save_projection
    pm = peft_load(fresh, tmp_path)
    assert_same(logits(pm), want, y0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_peft_adapter_loads_in_deltatune(kind, save_projection, tmp_path):
    base = tiny(kind)
    fresh = copy.deepcopy(base)
    y0 = logits(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, VeraConfig(r=8, target_modules=TARGETS[kind], projection_prng_key=9,
                                             save_projection=save_projection, init_weights=False))
    perturb(p for n, p in pm.named_parameters() if "vera_lambda" in n)
    want = logits(pm)
    peft_save(pm, tmp_path)
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, y0)
    # merged, it is the same function too
    dm.merge()
    assert (logits(dm) - want).abs().max() <= ATOL


def test_vera_file_without_its_projections_fails_cleanly(tmp_path):
    dm = dt.attach(tiny("llama"), dt.config("vera", r=4, targets=["q_proj"]))
    dm.save(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(file)).items() if k != "base_model.vera_B"}
    save_file(tensors, str(file))
    model = tiny("llama")
    with pytest.raises(dt.AdapterFileError, match="vera_B"):
        dt.load_adapter(model, tmp_path)
    assert dt.owner_of(model) is None


def test_vera_bad_input():
    with pytest.raises(ValidationError, match="r"):
        dt.config("vera", r=0)
    with pytest.raises(ValidationError, match="dropout"):
        dt.config("vera", dropout=1.5)
    model = tiny("llama")
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(model, dt.config("vera", targets=["embed_tokens"]))
    assert dt.owner_of(model) is None
    with pytest.raises(ValueError, match="bias"):
        type(dt.config("vera")).from_peft({"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"], "bias": "all"})


# == FourierFT =========================================================================================
def test_fourierft_positions_and_spectrum_match_peft():
    torch.manual_seed(4)
    ours = dt.attach(tiny("llama"), dt.config("fourierft", n_frequency=30, targets=["v_proj"]))
    torch.manual_seed(4)
    pm = get_peft_model(tiny("llama"), FourierFTConfig(n_frequency=30, target_modules=["v_proj"]))
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    d = ours.deltas("default")["model.layers.1.self_attn.v_proj"]
    assert torch.equal(d.indices, layer.indices["default"])
    assert torch.equal(d.fourierft_spectrum, layer.fourierft_spectrum["default"])  # PEFT's default: N(0, 1)
    torch.testing.assert_close(d.delta_weight(None), layer.get_delta_weight("default"), atol=0, rtol=0)


def test_fourierft_delta_is_the_inverse_dft_of_the_sparse_spectrum():
    """dW[p, q] = alpha / (out in) * sum_k c_k cos(2 pi (u_k p / out + v_k q / in)): the real part of the IDFT."""
    dm = dt.attach(tiny("gpt2"), dt.config("fourierft", n_frequency=25, scaling=7.0, targets=["c_fc"]))
    path = "transformer.h.0.mlp.c_fc"
    d = dm.deltas("default")[path]
    base = dict(dm.sites())[path].base
    out_f, in_f = 128, 32
    u, v = d.indices.double()
    p = torch.arange(out_f, dtype=torch.float64)[:, None, None]
    q = torch.arange(in_f, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (u * p / out_f + v * q / in_f)
    want = 7.0 * (d.fourierft_spectrum.detach().double() * torch.cos(phase)).sum(-1) / (out_f * in_f)
    dw = d.delta_weight(base)
    assert dw.shape == base.weight.shape == (in_f, out_f)  # Conv1D stores (in, out): merged transposed
    torch.testing.assert_close(dw.T.double(), want, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        torch.testing.assert_close(d(x, base(x), base), base(x) + x @ want.float().T, atol=1e-5, rtol=0)


def test_fourierft_default_init_is_peft_random_and_init_weights_gives_identity():
    model = tiny("llama")
    y0 = logits(model)
    dm = dt.attach(model, dt.config("fourierft", n_frequency=20, scaling=30.0, targets=["q_proj"]))
    assert (logits(dm) - y0).abs().max() > 1e-3
    dm.delete("default")
    dm = dt.attach(model, dt.config("fourierft", n_frequency=20, init_weights=True, targets=["q_proj"]))
    assert torch.equal(logits(dm), y0)


FFT_CASES = {
    "llama": ("llama", dict(targets=TARGETS["llama"], n_frequency_pattern={"v_proj": 12, r"layers\.1\.mlp\.down_proj": 99})),
    "gpt2": ("gpt2", dict(targets=TARGETS["gpt2"])),
    "bert": ("bert", dict(targets=["query", "value"], random_loc_seed=3)),
}


@pytest.mark.parametrize("case", list(FFT_CASES))
def test_fourierft_deltatune_adapter_loads_in_peft(case, tmp_path):
    kind, kw = FFT_CASES[case]
    base = tiny(kind)
    fresh = copy.deepcopy(base)
    y0 = logits(base)
    dm = dt.attach(base, dt.config("fourierft", n_frequency=40, scaling=25.0, **kw))
    want = logits(dm)
    dm.save(tmp_path)
    assert_same(logits(peft_load(fresh, tmp_path)), want, y0)


@pytest.mark.parametrize("case", list(FFT_CASES))
def test_fourierft_peft_adapter_loads_in_deltatune(case, tmp_path):
    kind, kw = FFT_CASES[case]
    base = tiny(kind)
    fresh = copy.deepcopy(base)
    y0 = logits(base)
    peft_kw = {"target_modules": kw["targets"], **{k: v for k, v in kw.items() if k != "targets"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, FourierFTConfig(n_frequency=40, scaling=25.0, **peft_kw))
    want = logits(pm)
    peft_save(pm, tmp_path)
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, y0)
    dm.merge()
    assert (logits(dm) - want).abs().max() <= ATOL


def test_fourierft_n_frequency_pattern_matches_like_peft():
    cfg = dt.config("fourierft", n_frequency=10, n_frequency_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 4})
    assert cfg.frequencies("model.layers.1.self_attn.v_proj") == 3
    assert cfg.frequencies("model.layers.0.mlp.up_proj") == 4  # the exact full name
    assert cfg.frequencies("model.layers.1.mlp.up_proj") == 10


def test_fourierft_bad_input():
    with pytest.raises(ValidationError, match="n_frequency"):
        dt.config("fourierft", n_frequency=0)
    with pytest.raises(ValidationError, match="n_frequency_pattern"):
        dt.config("fourierft", n_frequency_pattern={"v_proj": 0})
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.v_proj: n_frequency=600"):
        dt.attach(model, dt.config("fourierft", n_frequency=600, targets=["v_proj"]))  # 16 x 32 = 512 entries
    assert dt.owner_of(model) is None
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(model, dt.config("fourierft", targets=["embed_tokens"]))
    cls = type(dt.config("fourierft"))
    with pytest.raises(ValueError, match="random_loc_seed"):
        cls.from_peft({"peft_type": "FOURIERFT", "target_modules": ["q_proj"], "random_loc_seed": None})


# == MoRA ==============================================================================================
def reference_mora(x: torch.Tensor, m: torch.Tensor, in_f: int, out_f: int, kind: str) -> torch.Tensor:
    """The reference code's compress -> M -> decompress (kongds/MoRA ``_apply_mora``, types 1 and 6), whose
    padding appends the first entries of x (valid while the padding is no longer than in)."""
    r = m.shape[0]
    n = -(-in_f // r)
    pad = n * r - in_f
    x = torch.cat([x, x[..., :pad]], dim=-1)
    chunks = x.view(*x.shape[:-1], n, r)
    if kind == "sharing":
        h = chunks.sum(-2) @ m.T
        return torch.cat([h] * -(-out_f // r), dim=-1)[..., :out_f]
    inv = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    ang = torch.outer(torch.arange(n).float(), inv)
    ang = torch.cat([ang, ang], dim=-1)
    rot = torch.cat([-chunks[..., r // 2:], chunks[..., : r // 2]], dim=-1)
    h = ((chunks * ang.cos() + rot * ang.sin()) @ m.T).flatten(-2)[..., :out_f]
    if h.shape[-1] < out_f:
        h = torch.cat([h] * -(-out_f // h.shape[-1]), dim=-1)[..., :out_f]
    return h


SHAPES = [(12, 16), (16, 5), (32, 96), (128, 32), (32, 32), (64, 32), (40, 7)]


@pytest.mark.parametrize("kind", ["rope", "sharing"])
@pytest.mark.parametrize("in_f,out_f", SHAPES)
def test_mora_forward_equals_the_reference_and_its_matrix(kind, in_f, out_f):
    torch.manual_seed(0)
    r_hat = mora_rank(in_f, out_f, 4, kind)
    d = MoRA(nn.Linear(in_f, out_f), r_hat, kind, init="random")
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        got = d(x, torch.zeros(2, 3, out_f), None)
        torch.testing.assert_close(got, reference_mora(x, d.mora_M, in_f, out_f, kind), atol=1e-6, rtol=0)
        torch.testing.assert_close(got, x @ d.update_matrix().T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["rope", "sharing"])
def test_mora_matrix_and_merge_on_gpt2_conv1d(kind):
    base = Conv1D(48, 20)  # nf=48 outputs, nx=20 inputs: weight (20, 48)
    dm = dt.attach(nn.Sequential(base), dt.config("mora", r=2, mora_type=kind, init="random", targets=["0"]))
    d = dm.deltas("default")["0"]
    x = torch.randn(3, 20)
    with torch.no_grad():
        y = dm(x)
        torch.testing.assert_close(y, base(x) + x @ d.update_matrix().T, atol=1e-5, rtol=0)
        assert d.delta_weight(base).shape == base.weight.shape
        dm.merge()
        torch.testing.assert_close(dm(x), y, atol=1e-5, rtol=0)


def test_mora_padding_longer_than_the_input_wraps_cyclically():
    """in=5, r_hat=16: the input repeats cyclically (x_p = x_{p mod in}); the matrix form agrees."""
    d = MoRA(nn.Linear(5, 60), 16, "sharing", init="random")
    x = torch.randn(4, 5)
    with torch.no_grad():
        got = d(x, torch.zeros(4, 60), None)
        xs = x[:, torch.arange(16) % 5]
        torch.testing.assert_close(got, (xs @ d.mora_M.T)[:, torch.arange(60) % 16], atol=1e-6, rtol=0)
        torch.testing.assert_close(got, x @ d.update_matrix().T, atol=1e-5, rtol=0)


def test_mora_budget_zero_init_and_high_rank():
    in_f, out_f, r = 64, 32, 4
    r_hat = mora_rank(in_f, out_f, r, "sharing")
    assert r_hat == round(math.sqrt((in_f + out_f) * r)) == 20
    assert abs(r_hat ** 2 - r * (in_f + out_f)) <= 2 * r_hat  # the parameter budget of a rank-r LoRA
    assert mora_rank(in_f, out_f, r, "rope") == 20
    assert (mora_rank(30, 30, 2, "sharing"), mora_rank(30, 30, 2, "rope")) == (11, 10)  # rope: even
    d = MoRA(nn.Linear(in_f, out_f), r_hat, "sharing")
    assert torch.equal(d.mora_M, torch.zeros(r_hat, r_hat))
    for kind in ("sharing", "rope"):
        torch.manual_seed(0)
        d = MoRA(nn.Linear(in_f, out_f), mora_rank(in_f, out_f, r, kind), kind, init="random")
        assert torch.linalg.matrix_rank(d.update_matrix()) > r  # higher rank than the LoRA it replaces


def test_mora_saves_in_its_own_format_and_reloads(tmp_path):
    model = tiny("llama")
    fresh = copy.deepcopy(model)
    dm = dt.attach(model, dt.config("mora", r=2, init="random", targets=["q_proj", "down_proj"]))
    want = logits(dm)
    dm.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_type" not in saved and saved["deltatune"]["type"] == "mora"
    keys = keys_and_shapes(tmp_path)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.mora_M"] == (10, 10)  # sqrt(64 * 2) = 11.3 -> 11 -> even
    assert keys["base_model.model.model.layers.0.mlp.down_proj.mora_M"] == (14, 14)  # sqrt(96 * 2) = 13.9
    assert torch.equal(logits(dt.load_adapter(fresh, tmp_path)), want)


def test_mora_bad_input():
    with pytest.raises(ValidationError, match="mora_type"):
        dt.config("mora", mora_type="truncation")
    with pytest.raises(ValidationError, match="r"):
        dt.config("mora", r=0)
    model = nn.Sequential(nn.Linear(1, 1))
    with pytest.raises(ValueError, match=r"^0: .*r_hat"):
        dt.attach(model, dt.config("mora", r=1, targets=["0"]))  # sqrt(2) -> 1, odd: no rope
    assert dt.owner_of(model) is None
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(tiny("llama"), dt.config("mora", targets=["embed_tokens"]))
