"""One adapter per task (the expansion family: Rusu et al. 2016's progressive idea applied to deltas, as in
"adapter per task" baselines of EASE, Zhou et al. CVPR 2024): task t trains adapter ``task<t>`` and its own classes'
head rows. Without a task id, the task is inferred by key matching: the frozen backbone's nearest class prototype
(SimpleCIL) names the task, whose adapter then classifies among that task's classes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..learner import class_means, cosine_predict
from ..stream import Task
from .base import Strategy, register


@register
class PerTask(Strategy):
    name = "per_task"
    defaults = {"steps": None}

    def learn(self, task: Task) -> None:
        name = f"task{task.index}"
        self.learner.add_adapter(name, seed=self.task_seed(task))
        self.learner.train(name, task.examples, task.classes, steps=self.opts["steps"], seed=self.task_seed(task))
        self.put_rows("keys", class_means(self.learner.features(task.texts), task.labels))

    def infer_tasks(self, texts: Sequence[str], allowed: Sequence[int]) -> list[int]:
        owner = self.stream.task_of_class()
        guess = cosine_predict(self.learner.features(texts), self.tensors["keys"][list(allowed)], allowed)
        return [owner[int(c)] for c in guess]

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        tasks = [task] * len(texts) if task is not None else self.infer_tasks(texts, allowed)
        out = torch.empty(len(texts), dtype=torch.long)
        allowed_set = set(allowed)
        for t in sorted(set(tasks)):
            rows = [i for i, x in enumerate(tasks) if x == t]
            classes = [c for c in self.stream[t].classes if c in allowed_set]
            out[rows] = self.head_predict([texts[i] for i in rows], classes, f"task{t}")
        return out
