"""Sequential fine-tuning of one delta (and the head), task after task: the forgetting baseline every
continual-learning paper reports (e.g. Zhou et al. 2023's "Finetune" row). With the whole stream as one task it is
the joint-training upper reference."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..stream import Task
from .base import Strategy, register


@register
class SeqFT(Strategy):
    name = "seq_ft"
    defaults = {"steps": None}  # training steps per task (None: the run's train.steps)

    def training_examples(self, task: Task) -> list[tuple[str, int]]:
        return list(task.examples)

    def learn(self, task: Task) -> None:
        if "shared" not in self.learner.adapters:
            self.learner.add_adapter("shared", seed=self.task_seed(task))
        allowed = self.stream.seen_classes(task.index)
        self.learner.train("shared", self.training_examples(task), allowed, steps=self.opts["steps"],
                           seed=self.task_seed(task))

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        return self.head_predict(texts, allowed, "shared")
