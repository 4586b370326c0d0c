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
from deltatune.core.registry import config_class
from deltatune.merge import ops
from tiny_models import tiny

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning")  # PEFT on our section
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



def test_a_peft_saved_adapter_combines_with_a_deltatune_one(loras, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft = get_peft_model(tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_A["targets"],
                                                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0},
                                                    init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "peft"), save_embedding_layers=False)
    out = dt.combine([tmp_path / "peft", loras[1]], [1.0, -1.0], out=tmp_path / "c")
    assert_close(logits(loaded(out)), logits(by_hand([tmp_path / "peft", loras[1]], [1.0, -1.0])),
                 logits(tiny("llama")))

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


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_conv_and_gpt2_conv1d_loras_combine_exactly(tmp_path, zoo, combination):
    """Conv LoRA (A carries the kernel) and GPT-2's Conv1D (weight stored (in, out)) through the same code."""
    for kind, cfg in (("conv", dt.LoRAConfig(r=2, targets=["conv1", "conv2", "conv3"])),
                      ("gpt2", dt.LoRAConfig(r=2, targets=["c_attn", "c_fc"]))):
        build = (lambda k=kind: zoo.build(k)) if kind == "conv" else (lambda: tiny("gpt2"))
        a = make(tmp_path / f"{kind}a", cfg, 1, model=build())
        b = make(tmp_path / f"{kind}b", cfg.model_copy(update={"r": 3}), 2, model=build())
        inputs = zoo.inputs("conv") if kind == "conv" else {"input_ids": IDS}
        dm = dt.load_adapter(build(), a, "a")
        dm.load(b, "b")
        dm.activate(["a", "b"])
        out = dt.combine([a, b], [1, 1], out=tmp_path / f"{kind}{combination}", combination=combination,
                         rank=5 if combination == "svd" else None)
        got = zoo.output(dt.load_adapter(build(), out), inputs)
        assert_close(got, zoo.output(dm, inputs), zoo.output(build(), inputs))


# -- IA3 ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ia3s(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ia3")
    return tuple(make(root / n, dt.IA3Config(), s, positive=True) for n, s in (("a", 1), ("b", 2)))


def test_ia3_log_space_is_the_weighted_geometric_mean(ia3s):
    a, b = ia3s
    fa, fb = read_weights(a), read_weights(b)
    res = dt.combine([a, b], [0.6, 0.4])
    for k, t in res["state"].items():
        assert torch.allclose(t, torch.exp(0.6 * fa[k].log() + 0.4 * fb[k].log()), atol=1e-6), k


def test_ia3_linear_space_is_the_papers_form(ia3s):
    a, b = ia3s
    fa, fb = read_weights(a), read_weights(b)
    res = dt.combine([a, b], [0.6, -0.4], ia3_space="linear")
    for k, t in res["state"].items():
        assert torch.allclose(t, 1 + 0.6 * (fa[k] - 1) - 0.4 * (fb[k] - 1), atol=1e-6), k
    neg = dt.negate(a, ia3_space="linear")
    assert all(torch.allclose(t, 2 - fa[k]) for k, t in neg["state"].items())


def test_ia3_log_space_sum_composes_and_negation_undoes(ia3s, tmp_path):
    """Merged IA3 scalings multiply: log-space addition = applying both, log-space negation = 1 / l."""
    a, b = ia3s
    both = tiny("llama")
    for folder in (a, b):  # merged one after the other (IA3 merges one adapter at a time)
        both = dt.load_adapter(both, folder).merge_and_unload()
    combined = loaded(dt.combine([a, b], [1, 1], out=tmp_path / "sum"))
    assert_close(logits(combined), logits(both), logits(tiny("llama")))
    undo = tiny("llama")
    for folder in (a, dt.negate(a, tmp_path / "neg")):
        undo = dt.load_adapter(undo, folder).merge_and_unload()
    assert_close(logits(undo), logits(tiny("llama")))


# -- bottleneck adapters, prompt tuning ----------------------------------------------------------------
def test_houlsby_parameters_average_and_negation_flips_the_up_projection(tmp_path):
    cfg = dt.config("adapter_houlsby")
    a, b = make(tmp_path / "a", cfg, 1), make(tmp_path / "b", cfg, 2)
    fa, fb = read_weights(a), read_weights(b)
    out = dt.combine([a, b], [0.25, 0.75], out=tmp_path / "avg")
    got = read_weights(out)
    assert set(got) == set(fa)
    for k, t in got.items():
        assert torch.allclose(t, 0.25 * fa[k] + 0.75 * fb[k], atol=1e-6), k
    assert not torch.allclose(logits(loaded(out)), logits(tiny("llama")))
    neg = dt.negate(a)["state"]
    for k, t in neg.items():
        assert torch.equal(t, -fa[k] if ".adapter_up." in k else fa[k]), k


def test_prompt_tuning_averages_and_refuses_negation(tmp_path):
    cfg = dt.config("prompt_tuning", num_virtual_tokens=4)
    a, b = make(tmp_path / "a", cfg, 1), make(tmp_path / "b", cfg, 2)
    res = dt.combine([a, b], [0.5, 0.5], out=tmp_path / "avg")
    want = 0.5 * (load_file(str(a / "adapter_model.safetensors"))["prompt_embeddings"]
                  + load_file(str(b / "adapter_model.safetensors"))["prompt_embeddings"])
    assert torch.allclose(load_file(str(res / "adapter_model.safetensors"))["prompt_embeddings"], want)
    logits(loaded(res))  # loads and runs
    with pytest.raises(ValueError, match="negative weights"):
        dt.negate(a, tmp_path / "neg")
    assert not (tmp_path / "neg").exists()


# -- modules_to_save -----------------------------------------------------------------------------------
def _bert_lora(folder: Path, seed: int, labels: int = 3) -> Path:
    model = tiny("bert")
    if labels != 3:
        model.classifier = torch.nn.Linear(32, labels)
    return make(folder, dt.LoRAConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]), seed,
                model=model)


def test_modules_to_save_are_averaged_with_the_weights(tmp_path):
    a, b = _bert_lora(tmp_path / "a", 1), _bert_lora(tmp_path / "b", 2)
    out = dt.combine([a, b], [0.5, 1.5], out=tmp_path / "c")
    fa, fb, got = read_weights(a), read_weights(b), read_weights(out)
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.allclose(got[k], (0.5 * fa[k] + 1.5 * fb[k]) / 2.0, atol=1e-6), k
    mine = logits(loaded(out, "bert"))
    peft = PeftModel.from_pretrained(tiny("bert"), str(out)).eval()
    assert_close(logits(peft), mine, logits(tiny("bert")))


def test_modules_to_save_of_different_shapes(tmp_path):
    a, b = _bert_lora(tmp_path / "a", 1), _bert_lora(tmp_path / "b", 2, labels=2)
    with pytest.raises(ValueError, match=r"'classifier'.*\(3,.*\(2,"):
        dt.combine([a, b], [1, 1], out=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    first = dt.combine([a, b], [1, 1], keep_modules_to_save="first")
    assert torch.equal(first["state"]["classifier.weight"], read_weights(a)["classifier.weight"])
    none = dt.combine([a, b], [1, 1], keep_modules_to_save="none")
    assert none["config"].modules_to_save is None and not any(k.startswith("classifier") for k in none["state"])


# -- errors: a clear message, and nothing written ---------------------------------------------------------
def _tampered(src: Path, dst: Path, key_end: str, shape: tuple[int, ...]) -> Path:
    """A copy of ``src`` whose first tensor ending in ``key_end`` has another shape."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith(key_end))
    tensors[key] = torch.randn(shape)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def zoo_of_adapters(tmp_path_factory, loras, ia3s) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    q2 = dt.LoRAConfig(r=2, targets=["q_proj"])
    f = {"lora": loras[0], "ia3": ia3s[0],
         "q2": make(root / "q2", q2, 1), "q3": make(root / "q3", q2.model_copy(update={"r": 3}), 2),
         "v2": make(root / "v2", dt.LoRAConfig(r=2, targets=["v_proj"]), 3),
         "dora": make(root / "dora", dt.config("dora", r=2, targets=["q_proj"]), 4),
         "houlsby": make(root / "houlsby", dt.config("adapter_houlsby"), 5),
         "mts": _bert_lora(root / "mts", 6)}
    f["q2_wide"] = _tampered(f["q2"], root / "q2_wide", "q_proj.lora_A.weight", (2, 48))
    f["houlsby_wide"] = _tampered(f["houlsby"], root / "houlsby_wide", "adapter_down.weight", (2, 48))
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(f["q2"] / "adapter_config.json", pickled)
    torch.save(load_file(str(f["q2"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    f["pickled"] = pickled
    return f


ERRORS = [
    ([], [], {}, ValueError, "no adapters"),
    (["q2"], [1, 1], {}, ValueError, "2 weights for 1 adapters"),
    (["q2", "ia3"], [1, 1], {}, ValueError, "different methods.*lora.*ia3"),
    (["q2", "v2"], [1, 1], {}, ValueError, r"different target modules.*q_proj.*v_proj"),
    (["q2", "q3"], [1, 1], {"combination": "params"}, ValueError, r"q_proj'.*rank 2.*but 3.*equal ranks"),
    (["q2", "q3"], [1, 1], {"method": "ties", "combination": "cat"}, ValueError, "'cat' is exact .* not 'ties'"),
    (["q2", "q2_wide"], [1, 1], {}, ValueError, r"'model.layers.0.self_attn.q_proj'.*\(2, 32\).*\(2, 48\)"),
    (["houlsby", "houlsby_wide"], [1, 1], {}, ValueError, r"'model.layers.0.mlp.down_proj'.*\(2, 32\).*\(2, 48\)"),
    (["ia3"], [1], {"combination": "svd"}, ValueError, "is for LoRA adapters"),
    (["q2"], [1], {"density": 0.5}, ValueError, r"unknown parameter.*density"),
    (["dora", "dora"], [1, 1], {"combination": "cat"}, ValueError, "DoRA is not additive"),
    (["mts", "mts"], [1, -1], {}, ValueError, "classifier.*sum to zero"),
    (["q2", "missing"], [1, 1], {}, FileNotFoundError, "missing: adapter folder not found"),
    (["pickled"], [1], {}, ValueError, "pickle file"),
    (["q2"], [float("nan")], {}, ValueError, "finite"),
]


@pytest.mark.parametrize(("names", "weights", "kw", "exc", "match"), ERRORS,
                         ids=["empty", "n-weights", "methods", "targets", "params-ranks", "cat-ties", "lora-shape",
                              "houlsby-shape", "svd-ia3", "unknown-param", "dora", "mts-zero-sum", "missing",
                              "pickle", "nan-weight"])
def test_bad_input_is_refused_and_writes_nothing(zoo_of_adapters, tmp_path, names, weights, kw, exc, match):
    folders = [zoo_of_adapters.get(n, tmp_path / n) for n in names]
    kw = dict(kw)
    method = kw.pop("method", "linear")
    with pytest.raises(exc, match=match):
        dt.combine(folders, weights, method, tmp_path / "out", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output folder and no temporary left behind"


def test_pickle_loads_when_allowed_and_existing_output_is_kept(zoo_of_adapters, tmp_path):
    out = dt.combine([zoo_of_adapters["pickled"]], [2.0], out=tmp_path / "c", allow_pickle=True)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        dt.combine([zoo_of_adapters["q2"]], [1.0], out=out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    dt.combine([zoo_of_adapters["q2"]], [1.0], out=out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# -- command line ------------------------------------------------------------------------------------------
def _cli(*args, code: int = 0):
    result = CliRunner().invoke(app, ["combine", *map(str, args)])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_cli_combine_matches_the_library_and_prints_the_report(loras, tmp_path):
    a, b = loras
    res = _cli(a, b, "--weights", "1", "-0.5", "--out", tmp_path / "cli")
    printed = json.loads(res.stdout)
    assert printed["out"] == str(tmp_path / "cli") and printed["weights"] == [1.0, -0.5]
    lib = dt.combine([a, b], [1, -0.5])
    got = read_weights(tmp_path / "cli")
    assert set(got) == set(lib["state"]) and all(torch.equal(got[k], lib["state"][k]) for k in got)
    res = _cli(a, b, "--weights", "0.5,0.5", "--method", "ties", "--param", "density=0.5", "--combination", "svd",
               "--rank", "2", "--out", tmp_path / "svd")
    report = json.loads(res.stdout)
    assert report["combination"] == "svd" and report["params"] == {"density": 0.5}
    assert report["max_rel_error"] > 0 and all(m["rank"] == 2 for m in report["modules"].values())


def test_cli_combine_errors_cleanly(loras, ia3s, tmp_path):
    res = _cli(loras[0], ia3s[0], "--weights", "1", "1", "--out", tmp_path / "x", code=2)
    assert "different methods" in res.stderr
    res = _cli(loras[0], "--weights", "1", "--bogus", "--out", tmp_path / "x", code=2)
    assert "unknown option --bogus" in res.stderr
    assert not (tmp_path / "x").exists()


# -- every method ----------------------------------------------------------------------------------------
METHODS = [m for m in dt.available_methods() if m not in ("union", "fusion")]  # both combine other configs
EXTRA = {"fourierft": {"n_frequency": 100}, "prompt_tuning": {"num_virtual_tokens": 4},
         "prefix_tuning": {"num_virtual_tokens": 4}}
# no delta to negate: every tensor a whole parameter (no tensor_roles: LN tuning, prompts, prefixes, HRA's reflection
# vectors, whose sign does not change the reflection)
WHOLE = {m for m in METHODS if not config_class(m).tensor_roles}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_identity_average_and_double_negation(method, tmp_path):
    """``combine([a], [1]) == a``, ``negate(negate(a)) == a`` (refused where nothing is a delta), and the
    average of two adapters loads and changes the model."""
    cfg = dt.config(method, **EXTRA.get(method, {}))
    a, b = (make(tmp_path / n, cfg, s, positive=method == "ia3") for n, s in (("a", 1), ("b", 2)))
    want = logits(loaded(a))
    assert_close(logits(loaded(dt.combine([a], [1.0], out=tmp_path / "id"))), want)
    avg = logits(loaded(dt.combine([a, b], [0.5, 0.5], out=tmp_path / "avg")))
    assert torch.isfinite(avg).all() and (avg.shape != want.shape or (avg - want).abs().max() > 1e-4)
    if method in WHOLE:
        with pytest.raises(ValueError, match="negative weights"):
            dt.negate(a, tmp_path / "n1")
        return
    twice = dt.negate(dt.negate(a, tmp_path / "n1"), tmp_path / "n2")
    assert_close(logits(loaded(twice)), want)
    assert (logits(loaded(tmp_path / "n1")) - want).abs().max() > 1e-3, "negation changes nothing"
