"""The ``deltatune`` command line end to end, in-process (typer's CliRunner), on a tiny Llama folder.

Every command loads the tiny model from disk, so each call costs a fraction of a second; the trained
adapter the generate/eval/merge tests use is trained once per module, through the CLI itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.generation import generate as lib_generate
from deltatune.train.data import Collator, load_dataset
from deltatune.train.trainer import evaluate_dataset
from tiny_lm import make_tiny_lm_folder

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "birds sing in the morning",
]
PROMPT = "Describe: name: Aromi, food: Thai"


def _squash(s: str) -> str:
    """``s`` without whitespace: rich hard-wraps error messages (and long paths) at the console width."""
    return "".join(s.split())


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stdout[-2000:], result.stderr[-2000:],
                                      result.exception)
    return result


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _write_pc(path: Path, rows=None) -> Path:
    rows = rows if rows is not None else [(f"Q{i}: ", s) for i, s in enumerate(SENTENCES)]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def _write_run(tmp_path: Path, model, data: Path, name: str = "run", **train) -> Path:
    cfg = {
        "model": str(model), "task": "causal-lm",
        "method": {"type": "lora", "r": 4, "alpha": 8, "targets": "all-linear", "dropout": 0.1},
        "data": {"train": str(data), "eval": str(data), "max_length": 32},
        "train": {"steps": 8, "batch_size": 2, "lr": 1e-2, "seed": 1, **train},
        "output": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_lm_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """An adapter trained through ``deltatune train`` (its LoRA B matrices are far from zero)."""
    root = tmp_path_factory.mktemp("adapter")
    path = _write_run(root, tiny, _write_pc(root / "pc.jsonl"), steps=8)
    out = Path(json.loads(_cli("train", path, "--quiet").stdout.splitlines()[-1])["adapter"])
    assert out == root / "run"
    return out


@pytest.fixture()
def pc(tmp_path) -> Path:
    return _write_pc(tmp_path / "pc.jsonl")


# -- train ------------------------------------------------------------------------------------------
def test_train_writes_adapter_and_prints_json(tmp_path, tiny, pc):
    path = _write_run(tmp_path, tiny, pc, steps=40, eval_every=2)
    result = _cli("train", path, "--set", "train.steps=3")  # progress bar on: the JSON is still the last line
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    out = tmp_path / "run"
    assert Path(summary["adapter"]) == out and summary["steps"] == 3
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _steps(out) == [1, 2, 3]  # --set won over the file's 40 steps
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["eval"]["eval_loss"] == pytest.approx(rows[-1]["eval_loss"])
    assert yaml.safe_load((out / "run.yaml").read_text())["train"]["steps"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert load_file(out / "adapter_model.safetensors")  # non-empty, loadable


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny, pc):
    # constant lr: continuing 3 -> 5 must equal an uninterrupted 5-step run (data order, RNG, optimizer state)
    path = _write_run(tmp_path, tiny, pc, steps=5, save_every=3, schedule="constant")
    out = tmp_path / "run"
    _cli("train", path, "--quiet", "--set", "train.steps=3")
    first = (out / "metrics.jsonl").read_text().splitlines()
    result = _cli("train", path, "--quiet", "--resume", "--set", "train.steps=5")
    assert json.loads(result.stdout.splitlines()[-1])["steps"] == 5
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert _steps(out) == [1, 2, 3, 4, 5]
    assert lines[:3] == first  # appended to, not rewritten

    ref = tmp_path / "ref"
    _cli("train", path, "--quiet", "--set", f"output={ref}")
    assert _steps(ref) == [1, 2, 3, 4, 5]
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(x)["loss"] for x in lines] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-5)
    a, b = load_file(out / "adapter_model.safetensors"), load_file(ref / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_resume_from_an_older_checkpoint_logs_each_step_once(tmp_path, tiny, pc):
    path = _write_run(tmp_path, tiny, pc, steps=5, save_every=2)
    _cli("train", path, "--quiet", "--set", "train.steps=3")  # checkpoint at step 2, finished at 3
    _cli("train", path, "--quiet", "--resume")
    assert _steps(tmp_path / "run") == [1, 2, 3, 4, 5]


def test_resume_without_a_checkpoint_does_not_duplicate_metrics(tmp_path, tiny, pc):
    path = _write_run(tmp_path, tiny, pc, steps=5)  # no save_every: no checkpoint
    _cli("train", path, "--quiet", "--set", "train.steps=3")
    result = CliRunner().invoke(app, ["train", str(path), "--quiet", "--resume"])
    steps = _steps(tmp_path / "run")
    assert len(steps) == len(set(steps)), steps
    assert result.exit_code != 0 or steps == [1, 2, 3, 4, 5]


def test_train_stdout_is_only_the_json_summary(tmp_path, tiny, pc):
    result = _cli("train", _write_run(tmp_path, tiny, pc, steps=2))
    assert len(result.stdout.strip().splitlines()) == 1
    json.loads(result.stdout)


@pytest.mark.parametrize(("section", "overrides", "expect"), [
    ({"train": {"stepz": 3}}, [], "train.stepz"),
    ({"train": {"lr": -1}}, [], "train.lr"),
    ({"method": {"type": "lora", "r": 0}}, [], "method.r"),
    ({}, ["train.batch_size=zero"], "train.batch_size"),
    ({}, ["train.steps"], "expectedkey=value"),
    ({}, ["data.train=missing.jsonl"], "datafilenotfound:missing.jsonl"),
], ids=["unknown-key", "bad-value", "bad-method-value", "bad-set-value", "bad-set-syntax", "missing-data"])
def test_config_errors_exit_2_before_the_model_loads(tmp_path, pc, section, overrides, expect):
    # the model does not exist: an error about the config proves the config was checked first
    path = _write_run(tmp_path, tmp_path / "no-such-model", pc)
    raw = yaml.safe_load(path.read_text())
    for k, v in section.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and k != "method" else v
    path.write_text(yaml.safe_dump(raw))
    result = _cli("train", path, *[x for o in overrides for x in ("--set", o)], code=2)
    err = _squash(result.stderr)
    assert _squash(expect) in err
    assert "no-such-model" not in err and "nomodel" not in err
    assert not (tmp_path / "run").exists()  # nothing written either


def test_missing_data_file_is_named(tmp_path, pc):
    path = _write_run(tmp_path, tmp_path / "no-such-model", tmp_path / "absent" / "train.jsonl")
    err = _squash(_cli("train", path, code=2).stderr)
    assert _squash(str(tmp_path / "absent" / "train.jsonl")) in err and "no-such-model" not in err


def test_a_valid_config_reaches_the_model_and_names_it(tmp_path, pc):
    # the control for the tests above: the same config, valid, fails on the model
    path = _write_run(tmp_path, tmp_path / "no-such-model", pc)
    err = _squash(_cli("train", path, code=2).stderr)
    assert "nomodel" in err and "no-such-model" in err


def test_missing_config_file(tmp_path):
    err = _squash(_cli("train", tmp_path / "nope.yaml", code=2).stderr)
    assert "nope.yaml:configfilenotfound" in err


# -- generate ---------------------------------------------------------------------------------------
def test_generate_without_adapter_matches_the_library(tiny):
    out = _cli("generate", "--model", tiny, "--max-new-tokens", "8", PROMPT).stdout.rstrip("\n")
    model, tok = dt.load_pretrained(tiny)
    assert out and out == lib_generate(model, tok, [PROMPT], max_new_tokens=8)[0]


@pytest.mark.parametrize("no_chat", [False, True], ids=["chat", "no-chat"])
def test_generate_with_adapter_matches_the_library(tiny, adapter, no_chat):
    flags = ["--no-chat"] if no_chat else []
    out = _cli("generate", "--model", tiny, "--adapter", adapter, "--max-new-tokens", "8", *flags,
               PROMPT).stdout.rstrip("\n")
    model, tok = dt.load_pretrained(tiny)
    base = lib_generate(model, tok, [PROMPT], max_new_tokens=8, chat=False if no_chat else None)[0]
    dm = dt.load_adapter(model, adapter)
    want = lib_generate(dm, tok, [PROMPT], max_new_tokens=8, chat=False if no_chat else None)[0]
    assert out == want
    assert want != base  # the adapter changes the output, so the comparison above means something


def test_generate_refuses_a_pickle_adapter_unless_allowed(tmp_path, tiny, adapter):
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    shutil.copy(adapter / "adapter_config.json", pkl)
    torch.save(load_file(adapter / "adapter_model.safetensors"), pkl / "adapter_model.bin")
    err = _squash(_cli("generate", "--model", tiny, "--adapter", pkl, "--max-new-tokens", "4", PROMPT,
                       code=2).stderr)
    assert "--allow-pickle" in err and "adapter_model.bin" in err
    allowed = _cli("generate", "--model", tiny, "--adapter", pkl, "--allow-pickle", "--max-new-tokens", "4", PROMPT)
    safe = _cli("generate", "--model", tiny, "--adapter", adapter, "--max-new-tokens", "4", PROMPT)
    assert allowed.stdout == safe.stdout


def test_generate_with_a_missing_adapter_names_it(tmp_path, tiny):
    err = _squash(_cli("generate", "--model", tiny, "--adapter", tmp_path / "gone", PROMPT, code=2).stderr)
    assert _squash(str(tmp_path / "gone")) in err


# -- eval -------------------------------------------------------------------------------------------
def test_eval_loss_and_bleu(tmp_path, tiny, adapter):
    model, tok = dt.load_pretrained(tiny)
    dm = dt.load_adapter(model, adapter)
    prompts = ["Q0: ", "Q1: ", "name: Aromi"]
    # references are the adapted model's own greedy outputs (so BLEU is 100), plus a wrong second
    # reference for one prompt: rows sharing a prompt are one multi-reference item
    hyps = lib_generate(dm, tok, prompts, max_new_tokens=12, chat=False, batch_size=8)
    assert all(len(h.split()) >= 4 for h in hyps), hyps
    data = _write_pc(tmp_path / "eval.jsonl", [*zip(prompts, hyps), (prompts[0], "completely different words here")])
    result = _cli("eval", "--model", tiny, "--adapter", adapter, "--data", data, "--max-new-tokens", "12")
    metrics = json.loads(result.stdout)
    ds = load_dataset(data, tok, max_length=512)
    want = evaluate_dataset(dm.model, ds, Collator(tok), batch_size=8)["eval_loss"]
    assert metrics["rows"] == 4 and metrics["bleu_prompts"] == 3
    assert metrics["eval_loss"] == pytest.approx(want, abs=1e-5)
    # sacrebleu's exp(mean log precision) can land a rounding error above 100 (here 100.00000000000004)
    assert isinstance(metrics["bleu"], float) and 0.0 <= metrics["bleu"] <= 100.0 + 1e-9
    assert metrics["bleu"] == pytest.approx(100.0)
    # without the adapter the loss differs (the adapter was applied for the loss too)
    plain = json.loads(_cli("eval", "--model", tiny, "--data", data, "--max-new-tokens", "12").stdout)
    assert abs(plain["eval_loss"] - metrics["eval_loss"]) > 1e-3 and plain["bleu"] < 100.0


def test_eval_of_text_data_has_no_bleu(tmp_path, tiny):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    metrics = json.loads(_cli("eval", "--model", tiny, "--data", data).stdout)
    assert "bleu" not in metrics and metrics["rows"] == len(SENTENCES) and metrics["eval_loss"] > 0


# -- inspect ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "layers"), [([], (0, 1)), (["--exclude", r".*layers\.0\..*"], (1,))],
                         ids=["all", "exclude-layer-0"])
def test_inspect_lists_the_selected_modules(tiny, extra, layers):
    out = _cli("inspect", tiny, "--targets", "q_proj,v_proj", *extra).stdout
    model, _ = dt.load_pretrained(tiny)
    mods = dict(model.named_modules())
    names = [f"model.layers.{i}.self_attn.{p}" for i in layers for p in ("q_proj", "v_proj")]
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == names
    for r in rows:
        n = mods[r[0]].weight.numel()
        assert r[1] == "Linear" and r[-1] == f"{n:,}"
        assert "".join(r[2:-1]) == str(list(mods[r[0]].weight.shape)).replace(" ", "")
    selected = sum(mods[n].weight.numel() for n in names)
    total = sum(p.numel() for p in model.parameters())
    assert out.splitlines()[0] == f"{len(names)} modules selected, {selected:,} of {total:,} parameters"


def test_inspect_target_matching_nothing_names_the_spec(tiny):
    err = _squash(_cli("inspect", tiny, "--targets", "nothing_proj", code=2).stderr)
    assert "targets=['nothing_proj']" in err and "selectednomodule" in err


def test_inspect_single_name_is_a_suffix_not_a_regex(tiny):
    out = _cli("inspect", tiny, "--targets", "q_proj").stdout
    assert out.splitlines()[0].startswith("2 modules selected")


def test_error_messages_are_not_read_as_markup(tiny):
    err = _squash(_cli("inspect", tiny, "--targets", "[kz]_nothing", code=2).stderr)
    assert "targets='[kz]_nothing'" in err


# -- merge-adapter ----------------------------------------------------------------------------------
def test_merge_adapter_writes_a_plain_model_with_the_adapted_logits(tmp_path, tiny, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert json.loads(_cli("merge-adapter", "--model", tiny, "--adapter", adapter, "--out", out).stdout) == {
        "out": str(out)}
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    model, tok = dt.load_pretrained(tiny)
    ids = tok(["the cat sat on the mat", "birds sing"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits
        dm = dt.load_adapter(model, adapter)
        adapted = dm(**ids).logits
        got = merged(**ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter matters
    # float32 rounding: the adapted and the merged logits (up to ~10 in size) are each ~5e-6 from a float64
    # reference, so they can differ by a hair over 1e-5 absolute; the adapter's effect is 1e5 times larger
    torch.testing.assert_close(got, adapted, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]
    assert tok2.chat_template == tok.chat_template


# -- help -------------------------------------------------------------------------------------------
def test_every_command_has_help_with_an_example():
    commands = typer.main.get_command(app).commands
    assert {"train", "generate", "eval", "inspect", "merge-adapter", "demo"} <= set(commands)
    for name in commands:
        result = _cli(name, "--help")
        assert "Example" in result.stdout and "deltatune " + name in result.stdout, name
