"""Run a strategy over a stream: learn task after task, fill one accuracy matrix per evaluation set, save the
strategy's state after every task so that a run killed between (or during) tasks resumes from the last task done.

Layout of ``out``: ``tasks/task-<t>/`` (the strategy's state after task t: adapters in the PEFT format, head and
prototypes in safetensors, ``strategy.json``, ``matrices.json``; written under a temporary name, renamed when
complete), and at the end ``<eval name>.json`` + heatmap and curve PNGs per evaluation set, ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .metrics import AccuracyMatrix
from .strategies import Strategy
from .stream import EvalSet, TaskStream


def evaluate(strategy: Strategy, stream: TaskStream, ev: EvalSet, t: int) -> list[float]:
    """Accuracies after task t on parts 0..t of ``ev``: class-incremental over every class seen, task-incremental
    with the task id given (its classes only), domain-incremental over the whole label set."""
    row = []
    for i in range(t + 1):
        part = ev.parts[i]
        if not part:
            row.append(float("nan"))
            continue
        texts, y = [x for x, _ in part], torch.tensor([c for _, c in part])
        if stream.setting == "task":
            pred = strategy.predict(texts, stream[i].classes, task=i)
        elif stream.setting == "domain":
            pred = strategy.predict(texts, list(range(stream.num_classes)))
        else:
            pred = strategy.predict(texts, stream.seen_classes(t))
        row.append(float((pred == y).float().mean()))
    return row


def _done(out: Path) -> list[int]:
    root = out / "tasks"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir()
                  if p.name.startswith("task-") and p.name.split("-")[1].isdigit() and (p / "matrices.json").exists())


def run_stream(strategy: Strategy, stream: TaskStream, evals: Sequence[EvalSet], out: str | Path | None = None, *,
               resume: bool = False, progress=None) -> dict[str, AccuracyMatrix]:
    """Learn every task of ``stream`` with ``strategy``; returns one :class:`AccuracyMatrix` per eval set.

    With ``out``, the state after each task is saved there; ``resume`` continues from the last task saved (the
    strategy must be built the same way: same backbone, method, options), refusing a folder from another stream.
    ``progress(t, seconds)`` is called after each task.
    """
    if not evals:
        raise ValueError("give at least one evaluation set")
    if len({e.name for e in evals}) != len(evals):
        raise ValueError(f"evaluation sets need distinct names, got {[e.name for e in evals]}")
    out = Path(out) if out is not None else None
    matrices = {e.name: AccuracyMatrix([len(p) for p in e.parts], name=e.name) for e in evals}
    seconds: list[float] = []
    start = 0
    if out is not None:
        done = _done(out)
        if done and not resume:
            raise FileExistsError(f"{out} already holds a continual run (tasks {done[0]}..{done[-1]} done); resume "
                                  f"it or choose another folder")
        if done and resume:
            last = out / "tasks" / f"task-{done[-1]}"
            saved = json.loads((last / "matrices.json").read_text())
            if saved.get("stream") != stream.meta:
                raise ValueError(f"{out}: saved by a run over another stream ({saved.get('stream')}), not "
                                 f"{stream.meta}")
            strategy.load(last)
            matrices = {n: AccuracyMatrix.from_dict(d) for n, d in saved["matrices"].items()}
            seconds = saved.get("seconds", [])
            start = done[-1] + 1
    for task in stream.tasks[start:]:
        t0 = time.perf_counter()
        strategy.learn(task)
        for ev in evals:
            matrices[ev.name].add_row(evaluate(strategy, stream, ev, task.index))
        seconds.append(time.perf_counter() - t0)
        if out is not None:
            final = out / "tasks" / f"task-{task.index}"
            tmp = out / "tasks" / f".task-{task.index}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            strategy.save(tmp)
            (tmp / "matrices.json").write_text(json.dumps(
                {"stream": stream.meta, "matrices": {n: m.to_dict() for n, m in matrices.items()},
                 "seconds": seconds}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        if progress is not None:
            progress(task.index, seconds[-1])
    if out is not None:
        for m in matrices.values():
            m.save(out)
        (out / "summary.json").write_text(json.dumps(
            {"strategy": strategy.name, "options": strategy.opts, "stream": stream.meta,
             "trainable_parameters": strategy.trainable_parameters(), "seconds": sum(seconds),
             **{n: m.summary() for n, m in matrices.items()}}, indent=1))
    return matrices
