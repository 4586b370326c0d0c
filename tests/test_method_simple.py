"""Method-specific checks for IA3, SSF, BitFit, LN tuning and sparse fine-tuning.

Equations against a direct computation, merge details (biases created and removed, zero scales refused),
masks and GPS calibration, bad input, and PEFT interop for IA3 and LN tuning (both ways, float32,
max abs diff <= 1e-5, non-identity weights).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import LNTuningConfig as PeftLNTuningConfig
from peft import PeftModel, get_peft_model
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.ia3 import IA3, IA3Config
from deltatune.methods.ln_tuning import LNTuningConfig
from deltatune.methods.sparse_ft import SparseFT, SparseFTConfig, calibrate_sparse
from deltatune.methods.ssf import SSFConfig
from tiny_models import tiny

ATOL = 1e-5


# -- tiny models -----------------------------------------------------------------------------------
@torch.no_grad()
def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial biases and norm weights (transformers initialises them to 0 / 1, hiding mistakes)."""
    for n, p in model.named_parameters():
        if n.endswith("bias") or "norm" in n.lower() or n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    return randomise(tiny("llama", seed))


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return randomise(tiny("gpt2", seed))


def tiny_bert(seed: int = 0) -> nn.Module:
    return randomise(tiny("bert", seed))


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))}


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    return model(**batch()).logits


@torch.no_grad()
def perturb(params, seed: int = 2, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter does not change the output: the comparison proves nothing"
    assert (got - want).abs().max() <= ATOL, f"max abs diff {(got - want).abs().max():.3g}"


def peft_load(base: nn.Module, folder) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


def peft_save(pm: PeftModel, folder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(folder))


def adapter_modules(pm: PeftModel, attr: str) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, attr)
            and isinstance(getattr(m, attr), (nn.ParameterDict, nn.ModuleDict)) and len(getattr(m, attr))}


# -- PEFT interop: IA3 -----------------------------------------------------------------------------
SCALE = {"llama": 0.5, "gpt2": 0.5, "bert": 3.0}  # BERT's logits are tiny: IA3 needs big scales to show
IA3_TO_PEFT = {
    "llama-default": ("llama", {}),
    "gpt2-default": ("gpt2", {}),
    "bert-default": ("bert", {}),
    "llama-custom-ff": ("llama", dict(targets=["q_proj", "up_proj", "down_proj"], feedforward_modules=["mlp.down_proj"])),
    "llama-regex-ff": ("llama", dict(targets=["o_proj", "gate_proj"], feedforward_modules=r".*\.layers\.1\..*")),
    "gpt2-all-linear": ("gpt2", dict(targets="all-linear", feedforward_modules=["c_proj"])),
}


@pytest.mark.parametrize("case", list(IA3_TO_PEFT))
def test_ia3_deltatune_adapter_loads_in_peft(case, tmp_path):
    kind, kw = IA3_TO_PEFT[case]
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, IA3Config(**kw))
    perturb((p for d in dm.deltas("default").values() for p in d.parameters()), scale=SCALE[kind])
    want = logits(dm)
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    assert adapter_modules(pm, "ia3_l") == set(dm.deltas("default"))
    for path, d in dm.deltas("default").items():  # the same modules are feedforward on both sides
        assert pm.get_submodule("base_model.model." + path).is_feedforward == d.feedforward, path
    assert_same(logits(pm), want, base_out)


IA3_FROM_PEFT = {
    "llama-default": ("llama", {}),
    "gpt2-default": ("gpt2", {}),
    "bert-default": ("bert", {}),
    "llama-list-ff": ("llama", dict(target_modules=["k_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "llama-regex": ("llama", dict(target_modules=r".*\.(v_proj|up_proj)", feedforward_modules=r".*up_proj")),
}


@pytest.mark.parametrize("case", list(IA3_FROM_PEFT))
def test_ia3_peft_adapter_loads_in_deltatune(case, tmp_path):
    kind, kw = IA3_FROM_PEFT[case]
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    pm = get_peft_model(base, PeftIA3Config(**kw))
    perturb((p for n, p in pm.named_parameters() if "ia3_l" in n), scale=SCALE[kind])
    want = logits(pm)
    peft_save(pm, tmp_path)
    dm = dt.load_adapter(fresh, tmp_path)
    assert set(dm.deltas("default")) == adapter_modules(pm, "ia3_l")
    assert_same(logits(dm), want, base_out)


def test_ia3_saved_config_is_peft_format(tmp_path):
    dm = dt.attach(tiny_llama(), IA3Config())
    dm.save(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and sorted(cfg["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 64)


# -- PEFT interop: LN tuning -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_ln_tuning_deltatune_adapter_loads_in_peft(kind, tmp_path):
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, LNTuningConfig())
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    want = logits(dm)
    dm.save(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert all(k.endswith((".ln_tuning_layers.weight", ".ln_tuning_layers.bias")) for k in keys)
    pm = peft_load(fresh, tmp_path)
    assert adapter_modules(pm, "ln_tuning_layers") == set(dm.deltas("default"))
    assert_same(logits(pm), want, base_out)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_ln_tuning_peft_adapter_loads_in_deltatune(kind, tmp_path):
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    targets = ["LayerNorm"] if kind == "bert" else None  # PEFT has no default LN targets for BERT
    pm = get_peft_model(base, PeftLNTuningConfig(target_modules=targets))
    perturb(p for n, p in pm.named_parameters() if "ln_tuning_layers" in n)
    want = logits(pm)
    peft_save(pm, tmp_path)
    dm = dt.load_adapter(fresh, tmp_path)
    assert set(dm.deltas("default")) == adapter_modules(pm, "ln_tuning_layers")
    assert_same(logits(dm), want, base_out)


def test_ln_tuning_finds_rmsnorm_and_layernorm_generically():
    llama = dt.attach(tiny_llama(), LNTuningConfig())
    assert {type(llama.model.get_submodule(p).base).__name__ for p in llama.deltas("default")} == {"LlamaRMSNorm"}
    assert len(llama.deltas("default")) == 5  # 2 x (input, post-attention) + final norm
    bert = dt.attach(tiny_bert(), LNTuningConfig())
    assert len(bert.deltas("default")) == 5  # embeddings + 2 x (attention output, output)


def test_ln_tuning_merge_writes_the_copy_and_unmerge_restores_exactly():
    dm = dt.attach(tiny_gpt2(), LNTuningConfig(targets=["ln_f"]))
    d = dm.deltas("default")["transformer.ln_f"]
    perturb(d.parameters())
    base = dm.model.transformer.ln_f.base
    w0, b0 = base.weight.clone(), base.bias.clone()
    y = logits(dm)
    dm.merge()
    assert torch.equal(base.weight, d.ln_tuning_layers.weight) and torch.equal(base.bias, d.ln_tuning_layers.bias)
    assert (logits(dm) - y).abs().max() <= ATOL
    dm.unmerge()
    assert torch.equal(base.weight, w0) and torch.equal(base.bias, b0)


def test_ln_tuning_rejects_non_norm_targets():
    with pytest.raises(ValueError, match=r"q_proj.*Linear"):
        dt.attach(tiny_llama(), LNTuningConfig(targets=["q_proj"]))


# -- IA3 equations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("conv1d", [False, True])
def test_ia3_scales_outputs_and_feedforward_inputs(conv1d):
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D
        lin = Conv1D(5, 4)  # nf=5 outputs, nx=4 inputs, weight (4, 5)
        w = lin.weight.T
    else:
        lin = nn.Linear(4, 5)
        w = lin.weight
    nn.init.normal_(lin.bias)
    x = torch.randn(3, 4)
    for ff in (False, True):
        d = IA3(4 if ff else 5, ff, conv1d)
        perturb(d.parameters())
        y = d(x, lin(x), lin)
        l = d.ia3_l.reshape(-1)  # noqa: E741
        want = (x * l) @ w.T + lin.bias if ff else (x @ w.T + lin.bias) * l
        assert (y - want).abs().max() < 1e-6
        # merging: diag(l) W and l * b, or W diag(l)
        m = copy.deepcopy(lin)
        d.merge_into(m)
        assert (m(x) - want).abs().max() < 1e-6
        d.unmerge_from(m)
        assert (m.weight - lin.weight).abs().max() < 1e-6 and (m.bias - lin.bias).abs().max() < 1e-6


def test_ia3_merge_refuses_zero_scales_and_changes_nothing():
    dm = dt.attach(tiny_llama(), IA3Config())
    d = dm.deltas("default")["model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        d.ia3_l[3] = 0.0
    w0 = {k: v.clone() for k, v in dm.model.state_dict().items()}
    with pytest.raises(dt.MergeError, match="zero"):
        dm.merge()
    assert all(torch.equal(v, w0[k]) for k, v in dm.model.state_dict().items())


def test_ia3_default_targets_follow_peft_per_architecture():
    def chosen(model):
        dm = dt.attach(model, IA3Config())
        return {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1]: d.feedforward for p, d in dm.deltas("default").items()}

    assert chosen(tiny_llama()) == {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True}
    assert chosen(tiny_gpt2()) == {"attn.c_attn": False, "mlp.c_proj": True}
    assert chosen(tiny_bert()) == {"self.key": False, "self.value": False, "output.dense": True}


def test_ia3_bad_input_names_the_module_or_field():
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding"):
        dt.attach(tiny_llama(), IA3Config(targets=["embed_tokens"]))
    with pytest.raises(ValidationError, match="feedforward_modules"):
        IA3Config(feedforward_modules="(")


# -- SSF -------------------------------------------------------------------------------------------
def test_ssf_is_scale_and_shift_of_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    x = torch.randn(3, 4)
    dm = dt.attach(model, SSFConfig(targets=["0"]))
    d = dm.deltas("default")["0"]
    perturb(d.parameters())
    base = model[0].base
    assert (dm(x) - (base(x) * d.ssf_scale + d.ssf_shift)).abs().max() < 1e-6


def test_ssf_merge_creates_a_bias_on_bias_less_layers_and_unmerge_removes_it():
    model = tiny_llama()
    keys = list(model.state_dict())
    dm = dt.attach(model, SSFConfig())
    wrapped_keys = list(dm.model.state_dict())
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    y = logits(dm)
    dm.merge()
    q = dm.model.model.layers[0].self_attn.q_proj.base
    assert q.bias is not None and not q.bias.requires_grad
    assert (logits(dm) - y).abs().max() <= 1e-5
    dm.unmerge()
    assert q.bias is None and list(dm.model.state_dict()) == wrapped_keys
    plain = dm.unload()
    assert list(plain.state_dict()) == keys


def test_ssf_merge_and_unload_keeps_the_created_bias_trainable_like_its_weight():
    model = tiny_llama()
    dm = dt.attach(model, SSFConfig(targets=["q_proj"]))
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    y = logits(dm)
    plain = dm.merge_and_unload()
    q = plain.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.Linear) and q.bias is not None and q.bias.requires_grad
    assert (logits(plain) - y).abs().max() <= 1e-5


def test_ssf_zero_scale_refuses_merge():
    dm = dt.attach(tiny_gpt2(), SSFConfig(targets=["c_fc"]))
    with torch.no_grad():
        next(iter(dm.deltas("default").values())).ssf_scale[0] = 0.0
    with pytest.raises(dt.MergeError, match="zero"):
        dm.merge()
    assert not any(s.merged for _, s in dm.sites())


# -- BitFit ----------------------------------------------------------------------------------------
def test_bitfit_trains_only_bias_deltas_and_merges_into_the_bias():
    model = tiny_gpt2()
    dm = dt.attach(model, BitFitConfig())
    names = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("bitfit_bias") for n in names)
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    site = dm.model.transformer.h[0].mlp.c_fc
    b0 = site.base.bias.clone()
    y = logits(dm)
    dm.merge()
    assert torch.allclose(site.base.bias, b0 + dm.deltas("default")["transformer.h.0.mlp.c_fc"].bitfit_bias)
    assert (logits(dm) - y).abs().max() <= 1e-5


def test_bitfit_two_adapters_merged_on_bias_less_layers_unmerge_in_any_order():
    model = tiny_llama()
    keys = list(model.state_dict())
    dm = dt.attach(model, BitFitConfig(targets=["q_proj"]), "a")
    dm.add(BitFitConfig(targets=["q_proj"]), "b")
    perturb(p for n in "ab" for d in dm.deltas(n).values() for p in d.parameters())
    dm.activate(["a", "b"])
    dm.merge()
    dm.unmerge(["a"])  # b stays merged: the created bias stays, holding b's part
    q = dm.model.model.layers[0].self_attn.q_proj.base
    assert torch.allclose(q.bias, dm.deltas("b")["model.layers.0.self_attn.q_proj"].bitfit_bias, atol=1e-7)
    dm.unmerge()
    assert q.bias is None
    assert list(dm.unload().state_dict()) == keys


def test_bitfit_include_norms_adds_layernorm_biases_but_not_rmsnorm():
    gpt2 = dt.attach(tiny_gpt2(), BitFitConfig(include_norms=True))
    paths = set(gpt2.deltas("default"))
    assert {"transformer.h.0.ln_1", "transformer.ln_f", "transformer.h.0.attn.c_attn"} <= paths
    assert "lm_head" not in paths
    llama = dt.attach(tiny_llama(), BitFitConfig(include_norms=True))
    assert not any("norm" in p for p in llama.deltas("default"))


def test_bitfit_rejects_unsupported_targets():
    with pytest.raises(ValueError, match=r"input_layernorm.*LlamaRMSNorm"):
        dt.attach(tiny_llama(), BitFitConfig(targets=["input_layernorm"], include_norms=True))


# -- sparse fine-tuning ----------------------------------------------------------------------------
def test_sparse_ft_magnitude_mask_and_equation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20))
    w = model[0].weight.detach().clone()
    dm = dt.attach(model, SparseFTConfig(density=0.1, targets=["0"]))
    d = dm.deltas("default")["0"]
    assert d.sparse_ft_indices.dtype == torch.int64 and d.sparse_ft_indices.numel() == 20
    assert set(d.sparse_ft_indices.tolist()) == set(w.abs().flatten().topk(20).indices.tolist())
    perturb(d.parameters())
    dw = torch.zeros(200).index_put((d.sparse_ft_indices,), d.sparse_ft_values.detach()).view(20, 10)
    x = torch.randn(4, 10)
    assert (dm(x) - (x @ (w + dw).T + model[0].base.bias)).abs().max() < 1e-6


@pytest.mark.parametrize("conv1d", [False, True])
def test_sparse_ft_gather_and_dense_paths_agree(conv1d):
    torch.manual_seed(0)
    shape = (6, 9)
    d = SparseFT(shape, torch.randperm(54)[:7].sort().values, conv1d=conv1d)
    perturb(d.parameters())
    w = d.dense()
    for tokens in (1, 50):  # 1 token: the gather path; 50 tokens: the dense path
        x = torch.randn(tokens, shape[0] if conv1d else shape[1])
        want = x @ w if conv1d else x @ w.T
        got = d(x, torch.zeros_like(want), None)
        assert (got - want).abs().max() < 1e-6


def test_sparse_ft_random_mask_differs_and_saves_indices_and_values(tmp_path):
    torch.manual_seed(0)
    dm = dt.attach(tiny_gpt2(), SparseFTConfig(mask="random", density=0.02))
    d = dm.deltas("default")["transformer.h.0.attn.c_attn"]
    mag = SparseFTConfig(density=0.02).make_delta(dm.model.transformer.h[0].attn.c_attn.base, "x")
    assert not torch.equal(d.sparse_ft_indices, mag.sparse_ft_indices)
    dm.save(tmp_path)
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert t["base_model.model.transformer.h.0.attn.c_attn.sparse_ft_indices"].dtype == torch.int64
    assert t["base_model.model.transformer.h.0.attn.c_attn.sparse_ft_values"].dtype == torch.float32


def test_sparse_ft_load_rejects_indices_outside_the_weight(tmp_path):
    from safetensors.torch import save_file

    dm = dt.attach(tiny_gpt2(), SparseFTConfig(targets=["c_fc"]))
    dm.save(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    t = load_file(str(file))
    key = "base_model.model.transformer.h.1.mlp.c_fc.sparse_ft_indices"
    t[key][0] = 10**6
    save_file(t, str(file))
    with pytest.raises(dt.AdapterFileError, match=r"h\.1\.mlp\.c_fc\.sparse_ft_indices.*outside"):
        dt.load_adapter(tiny_gpt2(), tmp_path)


def lm_loss(model, b):
    return model(**b, labels=b["input_ids"]).loss


def test_sparse_ft_gradient_calibration_selects_top_gradients():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    dm = dt.attach(model, SparseFTConfig(mask="gradient", density=0.05, targets=["q_proj", "down_proj"]))
    batches = [batch(), {"input_ids": batch()["input_ids"].flip(1)}]
    dm.train()
    new = calibrate_sparse(dm, "default", batches, loss_fn=lm_loss)
    # independent: the accumulated |grad| of the plain model's weights
    ref.train()
    acc = {p: 0 for p in new}
    for b in batches:  # sum over batches of |grad| (not |sum of grads|)
        ref.zero_grad()
        lm_loss(ref, b).backward()
        for p in new:
            acc[p] = acc[p] + ref.get_submodule(p).weight.grad.abs()
    for path, idx in new.items():
        g = acc[path].flatten()
        # ties aside, the chosen entries are the top-k gradients
        assert g[idx].min() >= g.topk(idx.numel()).values.min() - 1e-12
        assert torch.equal(dm.deltas("default")[path].sparse_ft_indices, idx)
    assert not any(p.requires_grad or p.grad is not None for n, p in dm.model.named_parameters() if "deltas" not in n)


def test_sparse_ft_calibration_failure_changes_nothing():
    dm = dt.attach(tiny_llama(), SparseFTConfig(mask="gradient", targets=["q_proj"]))
    before = {p: d.sparse_ft_indices.clone() for p, d in dm.deltas("default").items()}
    calls = []

    def flaky(model, b):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data error")
        return lm_loss(model, b)

    with pytest.raises(RuntimeError, match="data error"):
        dm.configs["default"].calibrate(dm, "default", [batch(), batch()], loss_fn=flaky)
    for p, d in dm.deltas("default").items():
        assert torch.equal(d.sparse_ft_indices, before[p])
    assert not any(p.requires_grad or p.grad is not None for n, p in dm.model.named_parameters() if "deltas" not in n)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_sparse(dm, "default", [], loss_fn=lm_loss)


def test_sparse_ft_bad_config_names_the_field():
    with pytest.raises(ValidationError, match="density"):
        SparseFTConfig(density=0.0)
    with pytest.raises(ValidationError, match="mask"):
        SparseFTConfig(mask="fisher")
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding"):
        dt.attach(tiny_llama(), SparseFTConfig(targets=["embed_tokens"]))
