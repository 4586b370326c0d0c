"""The training loop, run files and resume, on a tiny Llama that uses SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.train.checkpoint import MANIFEST, damage, latest_checkpoint
from deltatune.train.data import Collator, load_dataset
from deltatune.train.run import load_run_config, run
from deltatune.train.trainer import Callback, TrainConfig, Trainer, TrainingDiverged, causal_lm_loss
from tiny_lm import make_tiny_lm_folder

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "birds sing in the morning",
    "we read a good book", "the river flows to the sea", "she plays the piano well", "rain falls on the roof",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_lm_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def data_files(tmp_path) -> dict[str, Path]:
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"Q{i}: ", "completion": s}) + "\n" for i, s in enumerate(SENTENCES)))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return {"pc": pc, "text": text}


def _write_run(tmp_path: Path, folder: Path, data: Path, **train) -> Path:
    cfg = {
        "model": str(folder), "task": "causal-lm",
        "method": {"type": "lora", "r": 4, "alpha": 8, "targets": "all-linear", "dropout": 0.1},
        "data": {"train": str(data), "eval": str(data), "max_length": 32},
        "train": {"steps": 12, "batch_size": 4, "lr": 1e-2, "seed": 3, **train},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_lowers_loss_and_writes_outputs(tmp_path, tiny_folder, data_files):
    cfg = load_run_config(_write_run(tmp_path, tiny_folder, data_files["pc"], steps=30, save_every=10, eval_every=10))
    result = run(cfg, progress=False)
    out = cfg.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert "eval_loss" in rows[9] and "eval_loss" in rows[29] and "eval_loss" not in rows[10]
    assert result.eval["eval_loss"] == pytest.approx(rows[-1]["eval_loss"])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep 2
    # the final adapter loads onto a fresh base and reproduces the trained model's eval loss
    model, tok = dt.load_pretrained(tiny_folder)
    dm = dt.load_adapter(model, out)
    ds = load_dataset(data_files["pc"], tok, max_length=32)
    from deltatune.train.trainer import evaluate_dataset

    assert evaluate_dataset(dm.model, ds, Collator(tok), batch_size=4)["eval_loss"] == pytest.approx(
        result.eval["eval_loss"], abs=1e-5)


def test_fast_loss_equals_the_models_own_loss(tiny_folder, data_files):
    model, tok = dt.load_pretrained(tiny_folder)
    for kind in ("pc", "text"):
        ds = load_dataset(data_files[kind], tok, max_length=32)
        batch = Collator(tok)([ds[i] for i in range(len(ds))])
        ours = causal_lm_loss(model, batch)
        theirs = model(**batch).loss
        assert torch.allclose(ours, theirs, atol=1e-5), kind
    # and the same gradients for the delta parameters (the fused head pushes them through itself)
    dm = dt.attach(model, dt.LoRAConfig(r=2, targets="all-linear", init="random"))
    params = [p for p in dm.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(causal_lm_loss(dm.model, batch), params)
    g_theirs = torch.autograd.grad(dm(**batch).loss, params)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_run_config_errors_name_the_key(tmp_path, tiny_folder, data_files):
    path = _write_run(tmp_path, tiny_folder, data_files["pc"])
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_run_config(path, ["train.lr=-1"])
    with pytest.raises(ValueError, match=r"train\.stepz"):
        load_run_config(path, ["train.stepz=3"])
    with pytest.raises(ValueError, match=r"method.*r"):
        load_run_config(path, ["method.r=0"])
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        load_run_config(path, ["method.type=lorax"])
    cfg = load_run_config(path, ["train.lr=3e-4", "method.r=2"])
    assert cfg.train.lr == 3e-4 and cfg.method_config().r == 2


class _Poison(Callback):
    """Writes NaN into a delta after the given step's backward: the next loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, step, metrics):
        if step == self.at:
            with torch.no_grad():
                next(iter(trainer.dm.deltas(trainer.adapter).values())).lora_B.weight.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_folder, data_files):
    model, tok = dt.load_pretrained(tiny_folder)
    dm = dt.attach(model, dt.LoRAConfig(r=4))
    ds = load_dataset(data_files["text"], tok, max_length=32)
    trainer = Trainer(dm, ds, TrainConfig(steps=10, batch_size=4, save_every=2), tmp_path / "out",
                      collate=Collator(tok), callbacks=[_Poison(5)], progress=False)
    with pytest.raises(TrainingDiverged, match="step 6"):
        trainer.train()
    ckpt = latest_checkpoint(tmp_path / "out" / "checkpoints")
    assert ckpt.name == "step-4"
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


_CHILD = """
import sys, time, torch
from deltatune.train.run import load_run_config, run
from deltatune.train import trainer as T

class Slow(T.Callback):  # leaves time to kill the process between checkpoints
    def on_step_end(self, trainer, step, metrics):
        if step > 6:
            time.sleep(0.3)

orig = T.Trainer.__init__
def init(self, *a, **k):
    orig(self, *a, **k)
    self.callbacks.append(Slow())
T.Trainer.__init__ = init
run(load_run_config(sys.argv[1], sys.argv[2:]), resume="--resume" in sys.argv, progress=False)
"""


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_folder, data_files):
    path = _write_run(tmp_path, tiny_folder, data_files["text"], steps=30, save_every=3, grad_accum=2)
    ref = run(load_run_config(path, [f"output={tmp_path / 'ref'}"]), progress=False)
    assert ref.steps == 30
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(_CHILD))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(child), str(path), f"output={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-9" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    resumed = run(load_run_config(path, [f"output={out}"]), resume=True, progress=False)
    assert resumed.steps == 30
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # the metrics file holds each step once even across the kill (steps after the checkpoint are re-run)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 30 and set(steps) == set(range(1, 31))


def test_classification_trains_head_through_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from deltatune.models import resolve_model_path

    folder = tmp_path / "bert"
    tok = BertTokenizerFast.from_pretrained(resolve_model_path("minilm-l6")[0], local_files_only=True)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)
                                  ).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = tmp_path / "cls.tsv"
    rows = [("good great fine", 1), ("bad awful poor", 0), ("great good", 1), ("poor bad", 0)] * 4
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "model": str(folder), "task": "classification", "num_labels": 2,
        "method": {"type": "lora", "r": 4, "targets": ["query", "value"]},
        "data": {"train": str(data), "eval": str(data)},
        "train": {"steps": 25, "batch_size": 8, "lr": 1e-2, "eval_every": 25},
        "output": str(tmp_path / "out"),
    }))
    result = run(load_run_config(tmp_path / "c.yaml"), progress=False)
    assert result.eval["eval_accuracy"] == 1.0
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved


def test_one_step_under_transformers_trainer(tmp_path, tiny_folder, data_files):
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    model, tok = dt.load_pretrained(tiny_folder)
    dm = dt.attach(model, dt.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    ds = load_dataset(data_files["text"], tok, max_length=32)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], remove_unused_columns=False, use_cpu=True,
                             save_strategy="no", logging_strategy="no")
    HFTrainer(model=dm, args=args, train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in ds],
              data_collator=lambda feats: Collator(tok)([type(ds[0])(f["input_ids"], f["labels"]) for f in feats])
              ).train()
    after = dm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".deltas.default.lora_" in k for k in changed)


@pytest.mark.slow
def test_real_smollm2_lora_loss_falls_in_20_steps():
    model, tok = dt.load_pretrained("smollm2-135m")
    dm = dt.attach(model, dt.LoRAConfig(r=8, alpha=16, targets="all-linear"))
    enc = tok(["The E2E restaurant Aromi serves Thai food in the city centre.",
               "Blue Spice is a family friendly coffee shop near the river."], return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-3)
    dm.train()
    losses = []
    for _ in range(20):
        loss = dm(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for n, p in dm.named_parameters() if ".deltas." not in n)


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path, tiny_folder, data_files):
    """Both options change how the step is computed, not what is learned: same first loss, still learning."""
    losses = {}
    for opts in ({}, {"gradient_checkpointing": True}, {"bf16": True}):
        cfg = load_run_config(_write_run(tmp_path, tiny_folder, data_files["pc"], steps=15, **opts),
                              [f"output={tmp_path / str(sorted(opts))}", "method.dropout=0.0"])
        run(cfg, progress=False)
        rows = [json.loads(x)["loss"] for x in (cfg.output / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1] < 0.9 * rows[0], opts
        losses[str(sorted(opts))] = rows
    plain, ckpt, bf16 = losses.values()
    assert ckpt == pytest.approx(plain, abs=1e-4)  # checkpointing recomputes the same numbers
    assert bf16[0] == pytest.approx(plain[0], rel=0.02) and bf16[0] != plain[0]  # bfloat16 really was used


def test_sparse_ft_gradient_mask_is_calibrated_by_the_trainer_on_a_fresh_run(tmp_path, tiny_folder, data_files):
    """mask="gradient" (GPS) under the Trainer: the first batches choose the indices, as calibrate_sparse would."""
    from deltatune.methods.sparse_ft import calibrate_sparse

    cfg = dt.config("sparse_ft", mask="gradient", density=0.05, calibration_batches=2)
    model, tok = dt.load_pretrained(tiny_folder)
    dm = dt.attach(model, cfg)
    before = {p: d.sparse_ft_indices.clone() for p, d in dm.deltas("default").items()}
    ds = load_dataset(data_files["pc"], tok, max_length=32)
    trainer = Trainer(dm, ds, TrainConfig(steps=2, batch_size=2, lr=1e-3), tmp_path / "out", collate=Collator(tok),
                      progress=False)
    # the same calibration by hand, on an identical model and the trainer's first two batches
    ref_model, _ = dt.load_pretrained(tiny_folder)
    ref = dt.attach(ref_model, cfg)
    batches = [Collator(tok)([ds[j] for j in b]) for b in trainer._batches(0)[:2]]
    ref.train()
    expected = calibrate_sparse(ref, "default", batches, loss_fn=lambda m, b: causal_lm_loss(ref.model, b))
    trainer.train()
    after = {p: d.sparse_ft_indices for p, d in dm.deltas("default").items()}
    assert any(not torch.equal(before[p], after[p]) for p in after)  # not the magnitude mask any more
    for p in after:
        assert torch.equal(after[p], expected[p]), p


# -- faults: a fresh run never mixes with an earlier one; a damaged newest checkpoint is detected on resume, which
# falls back to the newest intact one (and still ends where an uninterrupted run ends) ------------------------------
class _Crash(Callback):
    """The process dies at the end of step ``at`` (before that step's checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, step, metrics):
        if step == self.at:
            raise KeyboardInterrupt(f"killed at step {step}")


def _trainer(folder, data, out: Path, steps: int = 10, crash_at: int | None = None) -> Trainer:
    model, tok = dt.load_pretrained(folder)
    torch.manual_seed(0)
    dm = dt.attach(model, dt.LoRAConfig(r=4, init="random"))
    ds = load_dataset(data, tok, max_length=32)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, save_every=2, keep_checkpoints=3, seed=1)
    return Trainer(dm, ds, cfg, out, collate=Collator(tok), progress=False,
                   callbacks=[_Crash(crash_at)] if crash_at else [])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


# -- a fresh run into a folder holding an earlier run ------------------------------------------------------------
def test_a_fresh_run_refuses_a_folder_with_an_earlier_run_and_changes_nothing(tmp_path, tiny_folder, data_files):
    path = _write_run(tmp_path, tiny_folder, data_files["pc"], steps=4, save_every=2)
    run(load_run_config(path), progress=False)
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError) as err:
        run(load_run_config(path, ["train.lr=1e-3"]), progress=False)
    msg = str(err.value)
    assert str(out) in msg and "checkpoints" in msg and "--resume" in msg and "--overwrite" in msg
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # run.yaml too


def test_overwrite_starts_over_and_keeps_files_that_are_not_the_runs(tmp_path, tiny_folder, data_files):
    path = _write_run(tmp_path, tiny_folder, data_files["pc"], steps=6, save_every=2)
    run(load_run_config(path), progress=False)
    out = tmp_path / "run"
    (out / "notes.txt").write_text("mine")
    result = run(load_run_config(path, ["train.steps=2", "train.save_every=1"]), overwrite=True, progress=False)
    assert result.steps == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # none of the old run
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_the_command_line_says_how_to_go_on(tmp_path, tiny_folder, data_files):
    path = _write_run(tmp_path, tiny_folder, data_files["pc"], steps=2, save_every=1)
    assert CliRunner().invoke(app, ["train", str(path), "--quiet"]).exit_code == 0
    again = CliRunner().invoke(app, ["train", str(path), "--quiet"])
    assert again.exit_code == 2 and "--overwrite" in "".join(again.output.split())
    assert CliRunner().invoke(app, ["train", str(path), "--quiet", "--overwrite"]).exit_code == 0
    assert CliRunner().invoke(app, ["train", str(path), "--quiet", "--resume"]).exit_code == 0


# -- damaged checkpoints -----------------------------------------------------------------------------------------
def test_checkpoints_carry_a_manifest_of_every_file(tmp_path, tiny_folder, data_files):
    _trainer(tiny_folder, data_files["text"], tmp_path / "out", steps=2).train()
    ckpt = tmp_path / "out" / "checkpoints" / "step-2"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert {"adapter_model.safetensors", "optimizer.safetensors", "delta_state.safetensors"} <= set(manifest)
    assert all(manifest[n]["size"] == (ckpt / n).stat().st_size for n in manifest)
    assert damage(ckpt) is None
    assert not list((tmp_path / "out" / "checkpoints").glob(".*tmp"))  # no temporary folder left


@pytest.mark.parametrize("how", ["flipped-byte", "truncated", "missing-file", "no-state-file"])
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, tiny_folder,
                                                                                     data_files, how):
    ref = tmp_path / "ref"
    _trainer(tiny_folder, data_files["text"], ref).train()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _trainer(tiny_folder, data_files["text"], out, crash_at=9).train()  # checkpoints 4, 6, 8 written
    newest = out / "checkpoints" / "step-8"
    opt = newest / "optimizer.safetensors"
    data = bytearray(opt.read_bytes())
    if how == "flipped-byte":
        data[-1] ^= 0xFF
        opt.write_bytes(bytes(data))
    elif how == "truncated":
        opt.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "missing-file":
        opt.unlink()
    else:
        (newest / "trainer_state.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"step-8 is damaged"):
        assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step-6"
    with pytest.warns(RuntimeWarning, match=r"step-8 is damaged"):
        result = _trainer(tiny_folder, data_files["text"], out).train(resume=True)
    assert result.steps == 10
    want, got = _weights(ref), _weights(out)
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)  # exact resume from step 6


@pytest.mark.parametrize("method", [
    # AdaLoRA: importance averages and the masking schedule run through the kill (masking every 2 steps from 4)
    {"type": "adalora", "init_r": 6, "target_r": 2, "tinit": 4, "tfinal": 6, "deltaT": 2, "alpha": 8,
     "targets": "all-linear"},
    # DyLoRA: the rank sampled for each step continues as in the uninterrupted run
    {"type": "dylora", "r": 6, "r_min": 1, "alpha": 8, "targets": "all-linear"},
])
def test_sigkill_then_resume_is_exact_for_methods_with_training_hooks(tmp_path, tiny_folder, data_files, method):
    import yaml

    path = _write_run(tmp_path, tiny_folder, data_files["text"], steps=24, save_every=3)
    cfg = yaml.safe_load(path.read_text())
    cfg["method"] = method
    path.write_text(yaml.safe_dump(cfg))
    run(load_run_config(path, [f"output={tmp_path / 'ref'}"]), progress=False)
    (tmp_path / "child.py").write_text(textwrap.dedent(_CHILD))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(path), f"output={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-9" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    run(load_run_config(path, [f"output={out}"]), resume=True, progress=False)
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)  # AdaLoRA's pruned ranks (some modules keep none) alike
    assert max(((a[k] - b[k]).abs().max().item() for k in a if a[k].numel()), default=0.0) <= 1e-5
    ca = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    cb = json.loads((out / "adapter_config.json").read_text())
    ca["deltatune"].pop("save_id"), cb["deltatune"].pop("save_id")  # unique per save
    assert ca == cb  # AdaLoRA's final rank pattern too
