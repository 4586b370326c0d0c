"""SimpleCIL (Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability
and Adaptivity are All You Need"): the frozen pretrained backbone, one prototype per class (the mean of its
training features), a cosine nearest-prototype classifier. Training-free: nothing can be forgotten."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..learner import class_means, cosine_predict
from ..stream import Task
from .base import Strategy, register


@register
class SimpleCIL(Strategy):
    name = "simplecil"
    trains = False

    def prototypes_from(self, task: Task, adapters=None) -> None:
        """Add (or replace) the prototypes of ``task``'s classes from its features with ``adapters`` active."""
        self.put_rows("prototypes", class_means(self.learner.features(task.texts, adapters), task.labels))

    def learn(self, task: Task) -> None:
        self.prototypes_from(task)

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        feats = self.learner.features(texts)
        return cosine_predict(feats, self.tensors["prototypes"][list(allowed)], allowed)
