"""Out-of-core checkpoint merging (``deltatune.merge.executor``) and its recipes, on tiny saved models.

Oracles: ``ops.apply`` on the full state dicts in memory, and mergekit 0.1.5 run in-process on the same
recipe (ties, task_arithmetic, linear; gradients and filters included). Inputs are tiny Llamas with 4
layers (so a gradient has interior points), saved as single files and as shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.merge import executor, ops
from deltatune.merge.executor import MergeInputError, merge
from deltatune.merge.recipe import RecipeError, evaluate, layer_positions, load_recipe, parse_setting
from deltatune.merge.shards import Checkpoint
from tiny_models import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYERS = 4


def _llama(seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _perturb(model, seed: int, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _save(model, folder: Path, shard: str | None = None) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    return folder


def _state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """base (one file, with a tokenizer file), ft0 (one file), ft1 (sharded), ft2 (one file)."""
    root = tmp_path_factory.mktemp("zoo")
    paths = {"base": _save(_llama(0), root / "base")}
    (paths["base"] / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    paths["ft0"] = _save(_perturb(_llama(0), 1), root / "ft0")
    paths["ft1"] = _save(_perturb(_llama(0), 2), root / "ft1", shard="40KB")
    paths["ft2"] = _save(_perturb(_llama(0), 3), root / "ft2")
    assert (paths["ft1"] / "model.safetensors.index.json").is_file()
    return paths


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- recipe resolution vs mergekit ----------------------------------------------------------------
@pytest.mark.parametrize("value", [0.3, [0.0, 1.0], [0.2, 0.9, 0.4], [1, 0.5, 0.25, 0.1, 0.0],
                                   [{"filter": "self_attn", "value": [0.1, 0.7]}, {"filter": "mlp", "value": 0.2},
                                    {"value": 0.9}],
                                   [{"filter": "q_proj", "value": 0.5}], {"filter": "*", "value": [0, 2]}])
def test_setting_resolution_matches_mergekit(value):
    from mergekit.config import ConditionalParameter, evaluate_setting

    mk = ([ConditionalParameter(**v) for v in value] if isinstance(value, list) and isinstance(value[0], dict)
          else ConditionalParameter(**value) if isinstance(value, dict) else value)
    s = parse_setting(value, "weight")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"):
        for t in (0.0, 1 / 3, 0.5, 2 / 3, 0.8, 1.0):
            assert evaluate(s, name, t) == pytest.approx(evaluate_setting(name, mk, t, validate=float)), (name, t)


def test_layer_positions_follow_mergekit_layer_index():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight", "lm_head.weight"]
    t = layer_positions(names)
    assert [t[n] for n in names] == [0.0, 1 / 3, 2 / 3, 1.0, 0.0, 0.0]
    assert layer_positions(["h.0.w"]) == {"h.0.w": 1.0}  # one layer: t = 1, as mergekit


# -- results --------------------------------------------------------------------------------------
def test_equals_in_memory_ops_on_full_state_dicts(zoo, tmp_path):
    recipe = {"method": "ties", "base": str(zoo["base"]),
              "models": [{"model": str(zoo["ft0"]), "weight": 0.5, "density": [0.2, 0.8]},
                         {"model": str(zoo["ft1"]), "weight": 0.3, "density": 0.5},
                         {"model": str(zoo["ft2"]), "weight": 0.2, "density": 0.7}],
              "params": {"normalize": True}}
    res = merge(recipe, tmp_path / "out")
    got = _state(tmp_path / "out")
    base, fts = _state(zoo["base"]), [_state(zoo[k]) for k in ("ft0", "ft1", "ft2")]
    assert set(got) == set(base) and res.tensors == len(base)
    t = layer_positions(base)
    for name, b in base.items():
        want = ops.apply("ties", [f[name] for f in fts], b, weight=[0.5, 0.3, 0.2],
                         density=[0.2 + 0.6 * t[name], 0.5, 0.7], normalize=True)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=name)
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'


def _mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return _state(out)


WEIGHT_FILTERED = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.4}, {"value": 0.5}]
MK_CASES = {
    "ties": ({"normalize": True, "lambda": 0.9},
             [{"weight": WEIGHT_FILTERED, "density": [0.3, 0.9]}, {"weight": 0.3, "density": 0.5},
              {"weight": [0.1, 0.6, 0.2], "density": 0.7}]),
    "task_arithmetic": ({"normalize": False, "weight": 0.25},
                        [{"weight": [1.0, 0.0]}, {}, {"weight": WEIGHT_FILTERED}]),
    "linear": ({"normalize": True},
               [{"weight": [0.1, 0.9]}, {"weight": 0.5}, {"weight": [{"filter": "embed", "value": 2.0}, {"value": 1}]}]),
}


@pytest.mark.parametrize("method", list(MK_CASES))
def test_matches_mergekit_with_gradients_and_filters(zoo, tmp_path, method):
    shared, per_model = MK_CASES[method]
    models = [zoo["ft0"], zoo["ft1"], zoo["ft2"]]
    with_base = ops.get(method).needs_base
    mk_cfg = {"merge_method": method, "dtype": "float32", "parameters": shared,
              "models": [{"model": str(m), "parameters": p} for m, p in zip(models, per_model)],
              **({"base_model": str(zoo["base"])} if with_base else {})}
    want = _mergekit(mk_cfg, tmp_path / "mk")
    ours = {"method": method, "params": shared, "models": [{"model": str(m), **p} for m, p in zip(models, per_model)],
            **({"base": str(zoo["base"])} if with_base else {})}
    merge(ours, tmp_path / "dt")
    got = _state(tmp_path / "dt")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)


def test_tied_head_missing_in_a_model_is_read_from_its_embeddings(zoo, tmp_path):
    tied = _save(_perturb(_llama(0, tie=True), 5), tmp_path / "tied")
    assert "lm_head.weight" not in _state(tied)
    res = merge({"method": "task_arithmetic", "base": str(zoo["base"]),
                 "models": [{"model": str(tied), "weight": 1.0}, {"model": str(zoo["ft0"]), "weight": 1.0}]},
                tmp_path / "out")
    assert res.tied == [f"{tied}: lm_head.weight <- model.embed_tokens.weight"]
    got, b, t, f0 = _state(tmp_path / "out"), _state(zoo["base"]), _state(tied), _state(zoo["ft0"])
    want = b["lm_head.weight"] + (t["model.embed_tokens.weight"] - b["lm_head.weight"]) + (
        f0["lm_head.weight"] - b["lm_head.weight"])
    torch.testing.assert_close(got["lm_head.weight"], want)


@pytest.mark.parametrize("kind,cfg", [("llama", {"type": "lora", "r": 4, "alpha": 8}),
                                      ("llama", {"type": "dora", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}),
                                      ("gpt2", {"type": "lora", "r": 4, "alpha": 8})])
def test_model_plus_adapter_equals_merging_the_adapter_first(tmp_path, kind, cfg):
    base = _save(tiny(kind, 0), tmp_path / "base")
    ft = _save(_perturb(tiny(kind, 0), 1), tmp_path / "ft")
    model = AutoModelForCausalLM.from_pretrained(ft).eval()
    conf = dt.config(cfg.pop("type"), init="random", **cfg)
    dm = dt.attach(model, conf)
    with torch.no_grad():  # LoRA's B starts at zero: make the delta visible
        for n, p in dm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    dm.save(tmp_path / "adapter")
    _save(dm.merge_and_unload(), tmp_path / "premerged")
    recipe = {"method": "task_arithmetic", "base": str(base), "params": {"lambda": 0.7},
              "models": [{"model": f"{ft}+{tmp_path / 'adapter'}", "weight": 1.0}]}
    merge(recipe, tmp_path / "a")
    merge({**recipe, "models": [{"model": str(tmp_path / "premerged"), "weight": 1.0}]}, tmp_path / "b")
    a, b, f = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(ft)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6, msg=k)
    assert any(not torch.equal(_state(tmp_path / "premerged")[k], f[k]) for k in f)  # the adapter did something


def test_adapter_that_cannot_merge_is_refused_naming_the_method(zoo, tmp_path):
    dm = dt.attach(_llama(0), dt.config("adapter_houlsby"))
    dm.save(tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_houlsby"):
        merge({"method": "task_arithmetic", "base": str(zoo["base"]),
               "models": [{"model": f"{zoo['ft0']}+{tmp_path / 'adapter'}", "weight": 1}]}, tmp_path / "out")
    _no_output(tmp_path / "out")


# -- output layout --------------------------------------------------------------------------------
def test_shards_and_index_load_with_transformers_and_dtype_bfloat16(zoo, tmp_path):
    out = tmp_path / "out"
    res = merge({"method": "task_arithmetic", "base": str(zoo["base"]), "dtype": "bfloat16", "shard_size": "30KB",
                 "models": [{"model": str(zoo["ft0"]), "weight": 0.5}, {"model": str(zoo["ft1"]), "weight": 0.5}]},
                out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert res.shards == len(shards) > 1 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    got = _state(out)
    assert set(index["weight_map"]) == set(got) == set(_state(zoo["base"]))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    for p in shards:  # each shard within the limit unless it holds a single larger tensor
        part = load_file(str(p))
        assert len(part) == 1 or sum(t.numel() * 2 for t in part.values()) <= 30_000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    b, f0, f1 = _state(zoo["base"]), _state(zoo["ft0"]), _state(zoo["ft1"])
    name = "model.layers.1.mlp.down_proj.weight"
    want = ops.apply("task_arithmetic", [f0[name], f1[name]], b[name], weight=0.5).to(torch.bfloat16)
    assert torch.equal(got[name], want)
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for k, v in got.items():
        assert torch.equal(sd[k].to(torch.bfloat16), v), k
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_single_safetensors_file_as_input(zoo, tmp_path):
    merge({"method": "linear", "models": [{"model": str(zoo["ft0"] / "model.safetensors"), "weight": 1},
                                          {"model": str(zoo["ft1"]), "weight": 1}]}, tmp_path / "out")
    got, f0, f1 = _state(tmp_path / "out"), _state(zoo["ft0"]), _state(zoo["ft1"])
    torch.testing.assert_close(got["model.norm.weight"], (f0["model.norm.weight"] + f1["model.norm.weight"]) / 2)


def _count_block_reads(monkeypatch) -> list:
    reads = []
    real = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, n, rows=None: reads.append(rows) or real(self, n, rows))
    return reads


def test_elementwise_operator_in_row_blocks_gives_the_same_result(zoo, tmp_path, monkeypatch):
    recipe = {"method": "task_arithmetic", "base": str(zoo["base"]),
              "models": [{"model": str(zoo["ft0"]), "weight": 0.7}, {"model": str(zoo["ft1"]), "weight": 0.4}]}
    assert ops.get("task_arithmetic").blockwise == "elementwise"
    merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 100)
    reads = _count_block_reads(monkeypatch)
    merge(recipe, tmp_path / "blocks")
    assert any(r is not None for r in reads)  # the block path ran
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "blocks")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_magnitude_trim_in_row_blocks_equals_the_whole_tensor_top_k(zoo, tmp_path, monkeypatch, method):
    """Block-wise TIES: each model's cut-off is found over the whole tensor first, so the trim is the
    whole tensor's top-k (random float tensors: no ties at the cut-off), not a per-block one."""
    recipe = {"method": method, "base": str(zoo["base"]),
              "models": [{"model": str(zoo["ft0"]), "weight": 0.7, "density": 0.3},
                         {"model": str(zoo["ft1"]), "weight": 0.4, "density": 0.6}]}
    merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 100)
    reads = _count_block_reads(monkeypatch)
    merge(recipe, tmp_path / "blocks")
    assert any(r is not None for r in reads)
    a, b = _state(tmp_path / "whole"), _state(tmp_path / "blocks")
    base, f0, f1 = _state(zoo["base"]), _state(zoo["ft0"]), _state(zoo["ft1"])
    for k in a:
        want = ops.apply(method, [f0[k], f1[k]], base[k], weight=[0.7, 0.4], density=[0.3, 0.6])
        torch.testing.assert_close(b[k], want, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(a[k], want, rtol=0, atol=1e-6, msg=k)


def test_rescaled_magnitude_trim_is_not_split_into_blocks(zoo, tmp_path, monkeypatch):
    """rescale: l1 needs the whole tensor's norm: the executor must not split it."""
    recipe = {"method": "ties", "base": str(zoo["base"]), "params": {"rescale": "l1"},
              "models": [{"model": str(zoo["ft0"]), "weight": 1, "density": 0.5},
                         {"model": str(zoo["ft1"]), "weight": 1, "density": 0.5}]}
    monkeypatch.setattr(executor, "CHUNK_ELEMENTS", 100)
    reads = _count_block_reads(monkeypatch)
    merge(recipe, tmp_path / "out")
    assert all(r is None for r in reads)


# -- refusals before any output -------------------------------------------------------------------
def _broken(zoo, tmp_path) -> Path:
    """ft0 with one tensor removed, one reshaped and one added."""
    sd = _state(zoo["ft0"])
    del sd["model.layers.2.mlp.gate_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / "model.safetensors"))
    return bad


def test_mismatched_inputs_fail_with_one_error_listing_everything(zoo, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeInputError) as e:
        merge({"method": "task_arithmetic", "base": str(zoo["base"]),
               "models": [{"model": str(_broken(zoo, tmp_path)), "weight": 1}]}, out)
    msg = str(e.value)
    assert "missing tensor 'model.layers.2.mlp.gate_proj.weight'" in msg
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (8, 32)" in msg and "(16, 32)" in msg
    assert "extra tensor 'model.layers.0.extra.weight'" in msg
    _no_output(out)


@pytest.mark.parametrize("bad,match", [
    ({"method": "nope"}, "unknown merge method 'nope'.*linear"),
    ({"models": [{"model": "M0", "weight": 1, "densty": 0.5}]}, r"models\[0\]\.densty.*no parameter 'densty'"),
    ({"params": {"normalize": 3}}, r"params.normalize: expected true or false"),
    ({"models": [{"model": "M0", "normalize": True}]}, "shared by all models; set it under params"),
    ({"models": [{"model": "M0", "density": 0.5}]}, "needs 'weight' for every model"),
    ({"base": None}, "needs a base|give a base model"),
    ({"filter": [{"filter": "mlp", "value": 1}]}, "filter: unknown key"),
    ({"models": [{"model": "M0", "weight": [{"filter": "mlp", "value": 1}]}]}, "no value for models\\[0\\]"),
    ({"models": [{"model": "M0", "weight": 1}], "params": {"lambda": "x"}}, "expected a number"),
    ({"models": [{"model": "missing/folder", "weight": 1}]}, "missing/folder: checkpoint not found"),
    ({"models": [{"model": "gone1", "weight": 1}, {"model": "gone2", "weight": 1}]},
     "cannot open the inputs:\n  gone1: checkpoint not found\n  gone2: checkpoint not found"),
    ({"method": "linear", "models": [{"model": "M0", "weight": 1}, {"model": "M0", "weight": -1}]},
     "weights sum to zero"),
])
def test_bad_recipes_fail_before_any_output(zoo, tmp_path, bad, match):
    recipe = {"method": "ties", "base": str(zoo["base"]), "models": [{"model": "M0", "weight": 1}], **bad}
    recipe["models"] = [{**m, "model": m["model"].replace("M0", str(zoo["ft0"]))} for m in recipe["models"]]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        merge(recipe, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_recipe_reads_mergekit_spellings_and_yaml_exponents(tmp_path):
    (tmp_path / "r.yaml").write_text(
        "merge_method: ties\nbase_model: b\nparameters: {lambda: 2, density: 5e-1}\n"
        "models:\n  - model: m1+adapter\n    parameters: {weight: [0, 1]}\n  - {model: m2, weight: 1, density: 1e-1}\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r.models[0].ref.adapter == Path("adapter") and r.models[0].ref.path == Path("m1")
    p = r.resolve("model.layers.3.mlp.weight", 0.5)
    assert p == {"weight": [0.5, 1], "density": [0.5, 0.1], "lambda_": 2}


def test_bad_yaml_and_missing_recipe_file(tmp_path):
    (tmp_path / "r.yaml").write_text("method: ties\nmodels: [\n")
    with pytest.raises(RecipeError, match="r.yaml: not valid YAML"):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_merge_leaves_nothing_and_keeps_the_old_output(zoo, tmp_path, monkeypatch, exc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls, partial = [], []
    real = ops.apply

    def failing(name, *a, **k):
        calls.append(name)
        if len(calls) == 20:  # past the dry runs (2), halfway through the 39 tensors
            partial.extend(tmp_path.glob(".out.partial-*/model-*.safetensors"))
            raise exc("injected")
        return real(name, *a, **k)

    monkeypatch.setattr(ops, "apply", failing)
    with pytest.raises(exc, match="injected"):
        merge({"method": "task_arithmetic", "base": str(zoo["base"]), "shard_size": "20KB",
               "models": [{"model": str(zoo["ft0"]), "weight": 1}]}, out, force=True)
    assert len(partial) > 1  # shards had been written when it failed
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_non_empty_out_needs_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    recipe = {"method": "linear", "models": [{"model": str(zoo["ft0"]), "weight": 1}]}
    with pytest.raises(FileExistsError, match="--force"):
        merge(recipe, out)
    merge(recipe, out, force=True)
    assert not (out / "x").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="would replace the input"):
        merge(recipe, zoo["ft0"], force=True)


# -- faults: nothing an input or a recipe holds makes a merge delete an input or write a bad model -------------------
def test_out_may_not_be_an_adapter_input_even_with_force(zoo, tmp_path):
    dm = dt.attach(_llama(0), dt.LoRAConfig(r=2, init="random"))
    adapter = tmp_path / "adapter"
    dm.save(adapter)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    recipe = {"method": "linear", "models": [{"model": f"{zoo['ft0']}+{adapter}", "weight": 1}]}
    for out in (adapter, tmp_path, adapter / "inside"):  # the adapter itself, a folder around it, one inside it
        with pytest.raises(ValueError, match="would replace the input"):
            merge(recipe, out, force=True)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_a_float16_overflow_is_refused_naming_the_tensor_and_nothing_is_written(zoo, tmp_path):
    big = _llama(0)
    with torch.no_grad():
        big.model.layers[2].mlp.up_proj.weight.fill_(40000.0)  # finite in float32, x2 overflows float16
    src = _save(big, tmp_path / "big")
    out = tmp_path / "out"
    recipe = {"method": "linear", "dtype": "float16", "parameters": {"normalize": False},
              "models": [{"model": str(src), "weight": 1.0}, {"model": str(src), "weight": 1.0}]}
    with pytest.raises(dt.MergeError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*float32 or bfloat16"):
        merge(recipe, out)
    _no_output(out)


def test_an_inf_weight_in_a_recipe_is_refused_before_reading_tensors(zoo, tmp_path):
    recipe = {"method": "linear", "models": [{"model": str(zoo["ft0"]), "weight": float("inf")},
                                             {"model": str(zoo["ft2"]), "weight": 1.0}]}
    with pytest.raises(ValueError, match="inf or NaN"):
        merge(recipe, tmp_path / "out")
    _no_output(tmp_path / "out")


def test_an_index_naming_a_shard_outside_the_model_folder_is_refused(zoo, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(zoo["ft1"], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    secret = tmp_path / "secret.safetensors"
    shutil.copy(model / index["weight_map"][first], secret)
    index["weight_map"][first] = "../secret.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the model folder"):
        Checkpoint(model)


def test_a_truncated_shard_is_found_before_the_merge_starts(zoo, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(zoo["ft1"], model)
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{shard.name}: truncated"):
        merge({"method": "linear", "models": [{"model": str(zoo["ft0"]), "weight": 0.5},
                                               {"model": str(model), "weight": 0.5}]}, out)
    _no_output(out)


def test_a_disk_too_small_is_refused_up_front(zoo, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(dt.MergeError, match="GiB free"):
        merge({"method": "linear", "models": [{"model": str(zoo["ft0"]), "weight": 1}]}, out)
    _no_output(out)
    result = CliRunner().invoke(app, ["merge", "--quiet", str(_recipe_file(tmp_path, zoo)), "--out", str(out)])
    assert result.exit_code == 2 and "GiBfree" in "".join(result.output.split())  # a message, not a traceback


def test_a_disk_that_fills_up_mid_merge_fails_cleanly_and_leaves_nothing(zoo, tmp_path, monkeypatch):
    from deltatune.merge import shards as checkpoint

    real, calls = checkpoint.ShardWriter.write, []

    def full_disk(self, name, tensor):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "write", full_disk)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", "--quiet", str(_recipe_file(tmp_path, zoo)), "--out", str(out)])
    assert result.exit_code == 2 and "No space left on device" in result.output and "Traceback" not in result.output
    _no_output(out)


def _recipe_file(tmp_path: Path, zoo) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": str(zoo["ft0"]), "weight": 1}]}))
    return path


# -- command line ---------------------------------------------------------------------------------
def test_cli_merge_prints_a_json_summary_and_fails_cleanly(zoo, tmp_path):
    recipe = {"method": "ties", "base": str(zoo["base"]), "out": str(tmp_path / "out"), "dtype": "bfloat16",
              "models": [{"model": str(zoo["ft0"]), "weight": 0.5, "density": 0.5},
                         {"model": str(zoo["ft1"]), "weight": 0.5, "density": 0.5}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["merge", str(path), "--quiet"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["method"] == "ties" and summary["tensors"] == len(_state(zoo["base"]))
    assert summary["dtype"] == "bfloat16" and (tmp_path / "out" / "model.safetensors").is_file()
    res = CliRunner().invoke(app, ["merge", str(path), "--quiet"])  # out exists now
    assert res.exit_code == 2 and "--force" in "".join(res.stderr.split())
    path.write_text(yaml.safe_dump({**recipe, "method": "nope"}))
    res = CliRunner().invoke(app, ["merge", str(path), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "unknownmergemethod'nope'" in "".join(res.stderr.split())
    assert not (tmp_path / "o2").exists()
