"""LoRA extraction from full fine-tunes (``merge.extract``) and adapter compression (``merge.compress``).

Fine-tunes are tiny models (tests/tiny_models.py) plus deltas of known singular values, so the right
ranks and errors are known in closed form.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.merge.compress import compress_adapter
from deltatune.merge.extract import extract_lora
from tiny_models import tiny

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
Q0 = "model.layers.0.self_attn.q_proj"
D1 = "model.layers.1.mlp.down_proj"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def spectral(out: int, inp: int, s: list[float], seed: int) -> torch.Tensor:
    """An (out, in) matrix with exactly the singular values ``s``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, len(s), generator=g))[0]
    v = torch.linalg.qr(torch.randn(inp, len(s), generator=g))[0]
    return u @ torch.diag(torch.tensor(s)) @ v.T


def fine_tune(kind: str, deltas: dict[str, torch.Tensor]):
    """A tiny model whose named weights (``path`` -> dW (out, in)) moved by ``dW``."""
    model = tiny(kind)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for path, dw in deltas.items():
            w = mods[path].weight
            w += dw if isinstance(mods[path], torch.nn.Linear) else dw.T  # GPT-2 Conv1D stores (in, out)
    return model


@pytest.fixture
def rank2(tmp_path):
    """Base and tuned folders of a Llama whose q_proj (layer 0) and down_proj (layer 1) got exact rank-2 deltas."""
    deltas = {Q0: spectral(32, 32, [0.8, 0.3], 1), D1: spectral(32, 64, [0.5, 0.2], 2)}
    tiny("llama").save_pretrained(tmp_path / "base")
    fine_tune("llama", deltas).save_pretrained(tmp_path / "tuned")
    return tmp_path, deltas


# -- extract-lora -----------------------------------------------------------------------------------
def test_exact_rank2_delta_is_reproduced_at_rank2(rank2):
    root, deltas = rank2
    report = extract_lora(root / "base", root / "tuned", root / "lora", rank=2)
    assert set(report["modules"]) == set(deltas)  # untouched layers are not in the adapter
    assert report["max_rel_error"] <= 1e-5 and report["unrepresented_rel_norm"] <= 1e-5
    assert len(report["unchanged_modules"]) == 12
    assert json.loads((root / "lora" / "extract_report.json").read_text())["modules"].keys() == report["modules"].keys()
    assert report["adapter_bytes"] == (root / "lora" / "adapter_model.safetensors").stat().st_size
    dm = dt.load_adapter(tiny("llama"), root / "lora")
    torch.testing.assert_close(logits(dm), logits(fine_tune("llama", deltas)), atol=1e-5, rtol=0)


def test_rank1_error_is_the_best_rank1_error(rank2):
    root, _ = rank2
    report = extract_lora(root / "base", root / "tuned", root / "lora", rank=1)
    assert report["modules"][Q0]["rel_error"] == pytest.approx(0.3 / math.hypot(0.8, 0.3), rel=1e-4)
    assert report["modules"][D1]["rel_error"] == pytest.approx(0.2 / math.hypot(0.5, 0.2), rel=1e-4)
    a = load_file(root / "lora" / "adapter_model.safetensors")[f"base_model.model.{Q0}.lora_A.weight"]
    assert a.shape == (1, 32)


@pytest.mark.parametrize("energy,rank,expected", [(0.9, None, {Q0: 2, D1: 1}), (0.95, None, {Q0: 3, D1: 2}),
                                                  (0.95, 2, {Q0: 2, D1: 2})])
def test_energy_threshold_picks_the_smallest_rank_keeping_it(tmp_path, energy, rank, expected):
    # Q0 squared spectrum 9, 4, 1 (cumulative 0.64, 0.93, 1); D1: 25, 1.5 (0.943, 1)
    deltas = {Q0: spectral(32, 32, [3.0, 2.0, 1.0], 3), D1: spectral(32, 64, [5.0, math.sqrt(1.5)], 4)}
    tiny("llama").save_pretrained(tmp_path / "base")
    fine_tune("llama", deltas).save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", energy=energy, rank=rank)
    assert {p: m["rank"] for p, m in report["modules"].items()} == expected
    cfg = dt.load_adapter(tiny("llama"), tmp_path / "lora").configs["default"]
    assert {p: cfg.rank(p) for p in expected} == expected
    assert all(cfg.scaling(p) == 1.0 for p in expected)  # alpha = r per module


def test_peft_loads_an_extracted_gpt2_adapter_with_equal_outputs(tmp_path):
    from peft import PeftModel

    deltas = {"transformer.h.0.attn.c_attn": spectral(96, 32, [0.6, 0.4, 0.05], 5),  # Conv1D
              "transformer.h.1.mlp.c_fc": spectral(128, 32, [0.7], 6)}
    tiny("gpt2").save_pretrained(tmp_path / "base")
    tuned = fine_tune("gpt2", deltas)
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", energy=0.999)
    assert {m["rank"] for m in report["modules"].values()} == {3, 1}  # rank_pattern in use
    ours = logits(dt.load_adapter(tiny("gpt2"), tmp_path / "lora"))
    theirs = logits(PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "lora"))
    torch.testing.assert_close(ours, logits(tuned), atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_sharded_checkpoints_give_the_same_adapter(rank2):
    root, deltas = rank2
    fine_tune("llama", deltas).save_pretrained(root / "sharded", max_shard_size="20KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    extract_lora(root / "base", root / "tuned", root / "one", rank=2)
    extract_lora(root / "base", root / "sharded", root / "many", rank=2)
    one, many = (load_file(root / d / "adapter_model.safetensors") for d in ("one", "many"))
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_changed_tensors_outside_the_lora_are_reported(tmp_path):
    tiny("llama").save_pretrained(tmp_path / "base")
    tuned = fine_tune("llama", {Q0: spectral(32, 32, [1.0], 7)})
    with torch.no_grad():
        tuned.model.norm.weight += 0.5
    tuned.save_pretrained(tmp_path / "tuned")
    report = extract_lora(tmp_path / "base", tmp_path / "tuned", tmp_path / "lora", rank=1)
    assert list(report["changed_not_represented"]) == ["model.norm.weight"]
    missed = math.sqrt(32 * 0.25)  # ||0.5 * ones(32)||
    assert report["unrepresented_rel_norm"] == pytest.approx(missed / math.hypot(missed, 1.0), rel=1e-4)


def _edit(folder: Path, fn) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{Q0}.weight"), f"missing from .*: \\['{Q0}.weight'\\]"),
    (lambda t: t.update({f"{D1}.weight": torch.zeros(32, 60)}), f"{D1}.weight' has shape \\[32, 64\\] in .* but \\[32, 60\\]"),
])
def test_mismatched_checkpoints_fail_clearly_and_write_nothing(rank2, edit, message):
    root, _ = rank2
    _edit(root / "tuned", edit)
    with pytest.raises(ValueError, match=message):
        extract_lora(root / "base", root / "tuned", root / "lora", rank=2)
    assert not (root / "lora").exists()


def test_extract_cli_prints_the_report_and_refuses_no_rank(rank2):
    root, _ = rank2
    res = CliRunner().invoke(app, ["extract-lora", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                                   "--rank", "2", "--targets", "q_proj,down_proj", "--out", str(root / "lora")])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["modules"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    res = CliRunner().invoke(app, ["extract-lora", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                                   "--out", str(root / "other")])
    assert res.exit_code == 2 and "rank" in res.stderr and not (root / "other").exists()


# -- compress -----------------------------------------------------------------------------------------
@pytest.fixture
def lora(tmp_path):
    """A random (non-zero B) LoRA r=8 on every linear of a tiny Llama, with one module at rank 4."""
    dm = dt.attach(tiny("llama"), dt.LoRAConfig(r=8, alpha=16, init="random", rank_pattern={"up_proj": 4}))
    dm.save(tmp_path / "lora")
    return tmp_path / "lora"


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def loaded(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors a fresh model gets from ``dt.load_adapter`` (saved back by deltatune in plain form)."""
    dm = dt.load_adapter(tiny("llama"), folder)
    return {f"base_model.model.{p}.{k}": t for p, s in dm.adapter_state("default").items() for k, t in s.items()}


def test_compeft_keeps_top_entries_as_sign_times_std(lora, tmp_path):
    compress_adapter(lora, tmp_path / "c", method="compeft", density=0.1, alpha=2.0)
    orig, got = saved(lora), loaded(tmp_path / "c")
    for k, x in orig.items():
        y, k_kept = got[k], int(0.1 * x.numel())
        scale = 2.0 * float(x.std(correction=0))
        assert int((y != 0).sum()) == k_kept
        assert torch.equal(y != 0, x.abs() >= x.abs().flatten().kthvalue(x.numel() - k_kept + 1).values)
        assert torch.allclose(y[y != 0].abs(), torch.tensor(scale)) and torch.equal(y.sign()[y != 0], x.sign()[y != 0])


def test_compeft_density_one_is_exactly_sign_times_scale(lora, tmp_path):
    compress_adapter(lora, tmp_path / "c", method="compeft", density=1.0, alpha=1.5)
    orig, got = saved(lora), loaded(tmp_path / "c")
    for k, x in orig.items():
        assert torch.equal(got[k], x.sign() * torch.tensor(1.5 * float(x.std(correction=0))))


def test_dare_drops_and_rescales_reproducibly(lora, tmp_path):
    compress_adapter(lora, tmp_path / "d", method="dare", density=0.3, seed=4)
    compress_adapter(lora, tmp_path / "e", method="dare", density=0.3, seed=4)
    compress_adapter(lora, tmp_path / "f", method="dare", density=0.3, seed=5)
    orig, got = saved(lora), loaded(tmp_path / "d")
    assert saved(tmp_path / "d").keys() == saved(tmp_path / "e").keys()
    assert all(torch.equal(a, b) for a, b in zip(saved(tmp_path / "d").values(), saved(tmp_path / "e").values()))
    assert not all(torch.equal(a, b) for a, b in zip(saved(tmp_path / "d").values(), saved(tmp_path / "f").values()))
    kept = sum(int((v != 0).sum()) for v in got.values()) / sum(v.numel() for v in got.values())
    assert 0.25 < kept < 0.35
    for k, x in orig.items():
        keep = got[k] != 0
        torch.testing.assert_close(got[k][keep], x[keep] / 0.3)


def test_int8_error_is_at_most_half_a_step(lora, tmp_path):
    for per_channel, out in ((True, "channel"), (False, "tensor")):
        compress_adapter(lora, tmp_path / out, method="int8", per_channel=per_channel)
        orig, got = saved(lora), loaded(tmp_path / out)
        for k, x in orig.items():
            # one scale per rank channel: rows of A (r, in), columns of B (out, r)
            absmax = x.abs().amax(1 if "lora_A" in k else 0, keepdim=True) if per_channel else x.abs().max()
            assert ((got[k] - x).abs() <= absmax / 127 / 2 * (1 + 1e-5)).all(), k
        scales = {k: v for k, v in saved(tmp_path / out).items() if k.endswith("int8_scale")}
        assert all(v.numel() == (8 if per_channel and "up_proj" not in k else 4 if per_channel else 1)
                   for k, v in scales.items())


def test_rank_truncation_is_the_best_rank_k_approximation_and_loads_in_peft(lora, tmp_path):
    from peft import PeftModel

    report = compress_adapter(lora, tmp_path / "r", method="rank", rank=2)
    old, new = saved(lora), saved(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["rank_pattern"] == {"up_proj": 2} and "compression" not in cfg
    for ka in [k for k in old if k.endswith("lora_A.weight")]:
        kb = ka.replace("lora_A", "lora_B")
        dw = 2.0 * (old[kb] @ old[ka]) if "up_proj" not in ka else 4.0 * (old[kb] @ old[ka])  # alpha / r
        u, s, vh = torch.linalg.svd(dw.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert new[ka].shape[0] == 2
        torch.testing.assert_close((8.0 * new[kb] @ new[ka]).double(), best, atol=1e-5, rtol=1e-5)  # 16 / 2
    assert 0 < report["delta_rel_change"] < 1 and report["size_ratio"] < 0.5
    ours = logits(dt.load_adapter(tiny("llama"), tmp_path / "r"))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny("llama"), tmp_path / "r")), ours,
                               atol=1e-5, rtol=0)


def test_size_shrinks_and_outputs_are_measured(lora, tmp_path):
    for method in ("compeft", "int8"):
        report = compress_adapter(lora, tmp_path / method, method=method, density=0.1, model=tiny("llama"))
        assert report["size_ratio"] < 0.5, report["size_ratio"]  # tiny tensors: the file header weighs
        assert report["bytes_after"] == (tmp_path / method / "adapter_model.safetensors").stat().st_size
        assert json.loads((tmp_path / method / "compress_report.json").read_text())["size_ratio"] == report["size_ratio"]
    assert report["logits"]["max_abs_diff"] < 0.05 and report["delta_rel_change"] < 0.02  # int8: nearly exact
    exact = compress_adapter(lora, tmp_path / "dare1", method="dare", density=1.0, model=tiny("llama"))
    assert exact["logits"]["max_abs_diff"] == 0 and exact["delta_rel_change"] == 0


@pytest.mark.parametrize("method,bound", [("compeft", 0.05), ("int8", 0.27), ("dare", 0.16)])
def test_size_ratio_on_a_wider_layer_is_near_the_bits_per_entry(tmp_path, method, bound):
    # r=16 on 512 x 512: compeft 1 mask bit + 0.1 sign bit per entry ~ 0.034 of float32 (+ header); int8 1/4;
    # dare 1 mask bit + 0.1 float32 per entry ~ 0.131
    dt.attach(torch.nn.Sequential(torch.nn.Linear(512, 512)), dt.LoRAConfig(r=16, init="random")).save(tmp_path / "a")
    report = compress_adapter(tmp_path / "a", tmp_path / "c", method=method, density=0.1)
    assert bound - 0.03 < report["size_ratio"] < bound, report["size_ratio"]


def test_dora_magnitudes_are_kept_as_they_are(tmp_path):
    dm = dt.attach(tiny("llama"), dt.LoRAConfig(r=4, init="random", use_dora=True, targets=["q_proj"]))
    dm.save(tmp_path / "dora")
    compress_adapter(tmp_path / "dora", tmp_path / "c", method="compeft", density=0.5)
    got = dt.load_adapter(tiny("llama"), tmp_path / "c").adapter_state("default")
    for p, s in dm.adapter_state("default").items():
        assert torch.equal(got[p]["lora_magnitude_vector"], s["lora_magnitude_vector"])


def test_a_compressed_folder_loads_in_a_fresh_process_without_flags(lora, tmp_path):
    compress_adapter(lora, tmp_path / "c", method="compeft", density=0.2)
    script = ("import sys, torch, deltatune as dt; sys.path.insert(0, sys.argv[3]); from tiny_models import tiny; "
              "ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)); "
              "torch.save(dt.load_adapter(tiny('llama'), sys.argv[1])(input_ids=ids).logits.detach(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c"), str(tmp_path / "out.pt"),
                    str(Path(__file__).parent)], check=True, capture_output=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), logits(dt.load_adapter(tiny("llama"), tmp_path / "c")),
                               atol=0, rtol=0)


def test_peft_refuses_a_compressed_folder(lora, tmp_path):
    from peft import PeftConfig

    compress_adapter(lora, tmp_path / "c", method="int8")
    with pytest.raises(Exception, match="DELTATUNE_COMPRESSED"):
        PeftConfig.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "zip"}, "unknown compression method 'zip'"),
    ({"method": "compeft", "density": 0.0}, r"density must be in \(0, 1\]"),
    ({"method": "dare", "density": 1.5}, r"density must be in \(0, 1\]"),
    ({"method": "rank", "rank": 9}, "rank 9 is larger than the adapter's \\(its largest rank is 8\\)"),
])
def test_bad_arguments_fail_before_writing(lora, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress_adapter(lora, tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_rank_truncation_refuses_a_non_lora_adapter(tmp_path):
    dt.attach(tiny("llama"), dt.config("ia3")).save(tmp_path / "ia3")
    with pytest.raises(ValueError, match="rank truncation needs a LoRA adapter; this is a 'ia3' adapter"):
        compress_adapter(tmp_path / "ia3", tmp_path / "c", method="rank", rank=1)
    assert not (tmp_path / "c").exists()


def _corrupt(folder: Path, config=None, tensors=None) -> None:
    if config:
        data = json.loads((folder / "adapter_config.json").read_text())
        config(data)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        t = saved(folder)
        tensors(t)
        save_file(t, folder / "adapter_model.safetensors")


KEY = f"base_model.model.{Q0}.lora_A.weight"


@pytest.mark.parametrize("config,tensors,message", [
    (lambda d: d["compression"].update(method="zip"), None, "unknown compression method 'zip'"),
    (lambda d: d.update(compression="compeft"), None, "malformed 'compression' entry"),
    (lambda d: d["compression"].update(format=99), None, "compression format 99"),
    (None, lambda t: t.pop(f"{KEY}.compeft_sign"), f"'{KEY}': part 'compeft_sign' is missing"),
    (None, lambda t: t.update({f"{KEY}.compeft_mask": t[f"{KEY}.compeft_mask"][:-1]}),
     f"'{KEY}' \\(compeft\\) cannot be decoded: compeft_mask has 31 values, expected 32"),
    (lambda d: d["compression"]["tensors"].pop(KEY), None, "look encoded but the 'compression' entry does not"),
])
def test_a_corrupt_compression_entry_is_a_clear_error(lora, tmp_path, config, tensors, message):
    compress_adapter(lora, tmp_path / "c", method="compeft", density=0.5)
    _corrupt(tmp_path / "c", config, tensors)
    with pytest.raises(dt.AdapterFileError, match=message):
        dt.load_adapter(tiny("llama"), tmp_path / "c")


def test_compress_cli_prints_json_and_fails_cleanly(lora, tmp_path):
    res = CliRunner().invoke(app, ["compress", str(lora), "--method", "int8", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["size_ratio"] < 1 and (tmp_path / "c" / "compress_report.json").is_file()
    res = CliRunner().invoke(app, ["compress", str(lora), "--method", "zip", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "unknown compression method" in res.stderr and not (tmp_path / "d").exists()
