"""dt.combine / dt.negate: adapter arithmetic over saved adapter folders.

Adapters are attached to tiny models, given random non-zero weights, saved, combined, and the result is
loaded back (deltatune and PEFT) and compared against the arithmetic done by hand on the dense deltas.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.merge import ops
from tiny_models import tiny

ATOL = 1e-5
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
LORA_A = dict(r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"],
              rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0})
LORA_B = dict(r=3, alpha=5.0, use_rslora=True, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"])


def make(folder: Path, cfg: dt.DeltaConfig, seed: int, kind: str = "llama", model=None, positive: bool = False) -> Path:
    """Attach ``cfg`` to a tiny model, give every trainable tensor random values, save to ``folder``."""
    model = tiny(kind) if model is None else model
    dm = dt.attach(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                noise = torch.rand(p.shape, generator=g) + 0.5 if positive else 0.3 * torch.randn(p.shape, generator=g)
                p.copy_(noise)
    dm.save(folder)
    return folder


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@torch.no_grad()
def by_hand(folders: list[Path], weights: list[float], kind: str = "llama"):
    """A plain model with ``W + sum_i w_i dW_i`` written into its weights, dW_i from each adapter's own deltas."""
    target = tiny(kind)
    for i, (folder, w) in enumerate(zip(folders, weights)):
        dm = dt.load_adapter(tiny(kind), folder, f"a{i}")
        for path, delta in dm.deltas(f"a{i}").items():
            site = target.get_submodule(path)
            site.weight += w * delta.delta_weight(dm.model.get_submodule(path).base)
    return target


def loaded(folder: Path, kind: str = "llama"):
    return dt.load_adapter(tiny(kind), folder)


def dense(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's s B A (out, in) from a LoRA folder, through deltatune's own delta."""
    dm = loaded(folder)
    return {p: d.delta_weight(dm.model.get_submodule(p).base) for p, d in dm.deltas("default").items()}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return (make(root / "a", dt.LoRAConfig(**LORA_A), 1), make(root / "b", dt.LoRAConfig(**LORA_B), 2))


def assert_close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None = None) -> None:
    if base is not None:
        assert (want - base).abs().max() > 1e-3, "the adapters do not change the output: the test proves nothing"
    assert (got - want).abs().max() <= ATOL, (got - want).abs().max()


# -- LoRA: exact concatenation ---------------------------------------------------------------------
def test_cat_sum_equals_both_adapters_active(loras, tmp_path):
    a, b = loras
    dm = dt.load_adapter(tiny("llama"), a, "a")
    dm.load(b, "b")
    dm.activate(["a", "b"])
    want = logits(dm)
    out = dt.combine([a, b], [1, 1], out=tmp_path / "c")
    assert out == tmp_path / "c"
    assert_close(logits(loaded(out)), want, logits(tiny("llama")))
    report = json.loads((out / "combine_report.json").read_text())
    assert report["combination"] == "cat"
    # ranks add up per module, including the rank_pattern module (v_proj: 2 + 3)
    assert report["modules"]["model.layers.0.self_attn.v_proj"]["rank"] == 5
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 7


def test_cat_with_negative_weights_is_the_weighted_sum(loras, tmp_path):
    a, b = loras
    weights = [0.7, -1.3]
    out = dt.combine([a, b], weights, "task_arithmetic", tmp_path / "c", lambda_=0.5)
    want = logits(by_hand([a, b], [0.5 * w for w in weights]))
    assert_close(logits(loaded(out)), want, logits(tiny("llama")))


def test_peft_loads_the_cat_result_with_the_same_outputs(loras, tmp_path):
    out = dt.combine(list(loras), [0.5, -2.0], out=tmp_path / "c")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"], "per-module ranks must reach PEFT through rank_pattern"
    peft = PeftModel.from_pretrained(tiny("llama"), str(out)).eval()
    assert_close(logits(peft), logits(loaded(out)), logits(tiny("llama")))


def test_negate_lora_negates_b_only_and_gives_base_minus_delta(loras, tmp_path):
    a, _ = loras
    out = dt.negate(a, tmp_path / "neg")
    src, neg = load_file(str(a / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k, t in src.items():
        assert torch.allclose(neg[k], -t if ".lora_B." in k or k.endswith("lora_embedding_B") else t, atol=1e-6), k
    assert_close(logits(loaded(out)), logits(by_hand([a], [-1.0])), logits(tiny("llama")))


def test_params_combination_adds_a_and_signs_b(tmp_path):
    cfg = dt.LoRAConfig(r=2, alpha=4.0, targets=["q_proj"])
    a, b = make(tmp_path / "a", cfg, 1), make(tmp_path / "b", cfg, 2)
    res = dt.combine([a, b], [1, -1], combination="params")
    fa, fb = read_weights(a), read_weights(b)
    key = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(res["state"][f"{key}.lora_A.weight"], fa[f"{key}.lora_A.weight"] + fb[f"{key}.lora_A.weight"])
    assert torch.allclose(res["state"][f"{key}.lora_B.weight"], fa[f"{key}.lora_B.weight"] - fb[f"{key}.lora_B.weight"])


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model."): t for k, t in load_file(str(folder / "adapter_model.safetensors")).items()}


# -- LoRA: SVD ---------------------------------------------------------------------------------------
def _product(state: dict, cfg: dt.LoRAConfig, path: str) -> torch.Tensor:
    a, b = state.get(f"{path}.lora_A.weight"), state.get(f"{path}.lora_B.weight")
    if a is None:  # embedding: delta_weight is (s B A)^T
        return (cfg.scaling(path) * state[f"{path}.lora_embedding_B"] @ state[f"{path}.lora_embedding_A"]).T
    return cfg.scaling(path) * b @ a


def test_svd_with_the_sum_of_ranks_is_exact(loras, tmp_path):
    a, b = loras
    out = dt.combine([a, b], [1.0, -0.5], out=tmp_path / "c", combination="svd", rank=7)
    report = json.loads((out / "combine_report.json").read_text())
    assert report["max_rel_error"] < 1e-5
    assert_close(logits(loaded(out)), logits(by_hand([a, b], [1.0, -0.5])), logits(tiny("llama")))


def test_svd_to_lower_rank_is_the_best_rank_k_approximation(loras):
    a, b = loras
    res = dt.combine([a, b], [1.0, 1.0], combination="svd", rank=2)
    da, db = dense(a), dense(b)
    for path, info in res["report"]["modules"].items():
        m = da[path] + db[path]
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        got = _product(res["state"], res["config"], path)
        assert info["rank"] == 2
        assert torch.allclose(got, best, atol=1e-5), path
        want_err = float(s[2:].norm() / s.norm())
        assert info["rel_error"] > 0.05 and math.isclose(info["rel_error"], want_err, rel_tol=1e-3), path


def test_ties_through_svd_equals_ops_on_the_dense_deltas(loras):
    a, b = loras
    da, db = dense(a), dense(b)
    full = dt.combine([a, b], [1.0, 0.8], "ties", combination="svd", rank=64, density=0.5)
    low = dt.combine([a, b], [1.0, 0.8], "ties", rank=3, density=0.5)  # svd is the default for ties
    assert low["report"]["combination"] == "svd"
    for path in da:
        m = ops.apply("ties", [da[path], db[path]], torch.zeros_like(da[path]), weight=[1.0, 0.8], density=0.5)
        assert torch.allclose(_product(full["state"], full["config"], path), m, atol=1e-5), path
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert torch.allclose(_product(low["state"], low["config"], path), best, atol=1e-5), path


def test_result_without_out_loads_with_dm_add(loras):
    res = dt.combine(list(loras), [1, 1])
    dm = dt.DeltaModel(tiny("llama"))
    dm.add(res["config"], "combined", state=res["state"])
    assert_close(logits(dm), logits(by_hand(list(loras), [1, 1])), logits(tiny("llama")))
