"""APER (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models", the ADAM / APER
framework): adapt the backbone on the first task only, with any deltatune method, then freeze it; every class's
prototype is the concatenation of the frozen and the adapted backbone's mean features, and classification is
cosine nearest-prototype (SimpleCIL on the concatenated features)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..learner import class_means, cosine_predict
from ..stream import Task
from .base import Strategy, register


@register
class APER(Strategy):
    name = "aper"
    defaults = {"steps": None}

    def _features(self, texts: Sequence[str]) -> Tensor:
        frozen = self.learner.features(texts)
        adapted = self.learner.features(texts, "first")
        return torch.cat([torch.nn.functional.normalize(frozen, dim=-1),
                          torch.nn.functional.normalize(adapted, dim=-1)], dim=-1)

    def learn(self, task: Task) -> None:
        if task.index == 0:
            self.learner.add_adapter("first", seed=self.task_seed(task))
            self.learner.train("first", task.examples, task.classes, steps=self.opts["steps"],
                               seed=self.task_seed(task))
        self.put_rows("prototypes", class_means(self._features(task.texts), task.labels))

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        return cosine_predict(self._features(texts), self.tensors["prototypes"][list(allowed)], allowed)
