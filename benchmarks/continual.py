"""Class-incremental CLINC150 with all-MiniLM-L6-v2: every continual strategy, against a joint-training reference.

150 intents (the out-of-scope rows left out) in 10 tasks of 15 classes in a seeded order; train on ``train``, report
on ``val`` (3,000 rows). Per strategy and seed: last accuracy, average incremental accuracy, forgetting, trainable
parameters and wall time; mean and spread over seeds. ``joint`` is seq_ft on one task holding all 150 classes (the
upper reference). Writes the ``continual`` section of RESULTS.md and ``continual_results.json``.

    python benchmarks/continual.py [--seeds 0 1 2] [--strategies simplecil seq_ft ...] [--steps 100]

Needs ``../shared/data`` (or ``DELTATUNE_SHARED_DATA``) for CLINC150.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch

import deltatune as dt
from deltatune.continual import STRATEGIES, EvalSet, Learner, TaskStream, make_strategy, run_stream
from deltatune.train.trainer import TrainConfig

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("DELTATUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def clinc_files(folder: Path) -> tuple[Path, Path]:
    raw = json.loads((DATA / "clinc150" / "train_val.json").read_text())
    out = []
    for split in ("train", "val"):
        p = folder / f"clinc_{split}.jsonl"
        p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in raw[split]))
        out.append(p)
    return out[0], out[1]


def one(name: str, seed: int, train: Path, val: Path, steps: int, backbone, tok) -> dict:
    joint = name == "joint"
    stream = TaskStream.from_file(train, task_size=150 if joint else 15, seed=seed)
    ev = EvalSet.from_file(val, stream, "val")
    torch.manual_seed(seed)
    method = None if name in ("simplecil", "teen") else dt.config("lora", r=8, alpha=16, targets=["query", "value"])
    learner = Learner(backbone, tok, stream.num_classes, method,
                      TrainConfig(steps=steps * (10 if joint else 1), lr=2e-3, batch_size=32, seed=seed),
                      max_length=64, batch_size=128)
    strategy = make_strategy("seq_ft" if joint else name, learner, stream)
    strategy.seed = seed
    t0 = time.perf_counter()
    m = run_stream(strategy, stream, [ev])["val"]
    seconds = time.perf_counter() - t0
    n = strategy.trainable_parameters()
    if learner.dm is not None:
        learner.dm.unload()
    return {"strategy": name, "seed": seed, **m.summary(), "accuracy": m.accuracy(), "trainable": n,
            "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=["joint", *sorted(STRATEGIES)])
    ap.add_argument("--steps", type=int, default=100, help="training steps per task (joint: 10x)")
    args = ap.parse_args()
    C.setup()
    C.quiet_transformers()
    backbone, tok = dt.load_pretrained("minilm-l6")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train, val = clinc_files(Path(tmp))
        for name in args.strategies:
            for seed in args.seeds:
                r = one(name, seed, train, val, args.steps, backbone, tok)
                print(json.dumps({k: v for k, v in r.items() if k != "accuracy"}), flush=True)
                rows.append(r)
    (HERE / "continual_results.json").write_text(json.dumps(rows, indent=1))

    def cell(name, key, scale=100.0):
        v = [r[key] * scale for r in rows if r["strategy"] == name]
        return f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    table = []
    for name in args.strategies:
        mine = [r for r in rows if r["strategy"] == name]
        table.append([name, cell(name, "last"), cell(name, "average_incremental"), cell(name, "forgetting"),
                      f"{mine[0]['trainable']:,}", cell(name, "seconds", 1.0)])
    body = (f"CLINC150 (150 intents, 10 tasks of 15, class-incremental; train 15,000 rows, reported on val 3,000), "
            f"all-MiniLM-L6-v2, mean pooling; LoRA r=8 on query/value + linear head, {args.steps} steps of 32 per "
            f"task at lr 2e-3 (joint: one task, {10 * args.steps} steps); seeds {args.seeds} (class orders), "
            f"mean ± spread (population sd). {C.machine_info().get('cpu', '')}\n\n"
            + C.markdown_table(["strategy", "last acc (%)", "avg incremental acc (%)", "forgetting (pts)",
                                "trainable params", "wall time (s)"], table))
    C.write_section("continual", body)
    print(body)


if __name__ == "__main__":
    main()
