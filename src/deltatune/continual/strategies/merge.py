"""Merging per-task deltas (model merging as continual learning: task arithmetic, Ilharco et al. 2023; TIES,
Yadav et al. 2023; as studied for continual learning by e.g. "MagMax", Marczak et al. 2024): task t trains its
own delta from the base (and its classes' head rows); after each task all task deltas are combined into one
adapter ``merged`` with any ``dt.combine`` operator, which answers for every class seen."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ...io.adapter import save_adapter
from ...merge.combine import combine
from ..stream import Task
from .base import Strategy, register


@register
class Merge(Strategy):
    name = "merge"
    # operator: a deltatune.merge.ops name; weight: each task's weight ("mean": 1/T, or a number); params: the
    # operator's own (density, lambda_, ...)
    defaults = {"steps": None, "operator": "linear", "weight": "mean", "params": {}}

    def learn(self, task: Task) -> None:
        name = f"task{task.index}"
        self.learner.add_adapter(name, seed=self.task_seed(task))
        self.learner.train(name, task.examples, task.classes, steps=self.opts["steps"], seed=self.task_seed(task))
        tasks = [f"task{i}" for i in range(task.index + 1)]
        w = self.opts["weight"]
        weights = [1.0 / len(tasks) if w == "mean" else float(w)] * len(tasks)
        dm = self.learner.dm
        with tempfile.TemporaryDirectory(prefix="deltatune-merge-") as tmp:
            folders = []
            for n in tasks:
                save_adapter(dm, n, Path(tmp) / n)
                folders.append(Path(tmp) / n)
            res = combine(folders, weights, self.opts["operator"], **dict(self.opts["params"]))
        if "merged" in dm.configs:
            dm.delete("merged")
        dm.add(res["config"], "merged", state=res["state"])
        dm.set_trainable("merged", False)
        self.meta["merge_report"] = {k: v for k, v in (res.get("report") or {}).items()
                                     if isinstance(v, int | float | str)}

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        return self.head_predict(texts, allowed, "merged")
