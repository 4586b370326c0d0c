"""TEEN (Wang et al. 2023, "Few-Shot Class-Incremental Learning via Training-Free Prototype Calibration",
NeurIPS 2023): prototypes as SimpleCIL, but the prototype of a class learnt from few shots (every task after the
first) is moved toward the base classes it resembles:

    p_c' = alpha p_c + (1 - alpha) sum_b w_cb p_b,   w_cb = softmax_b(tau cos(p_c, p_b))   over the first task's classes

Training-free. With ``adapt_first`` (and a method) the backbone is first adapted on the first (base) task, as
TEEN's base-session training; the features then come from that adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..learner import class_means, cosine_predict
from ..stream import Task
from .base import Strategy, register


@register
class TEEN(Strategy):
    name = "teen"
    trains = False
    defaults = {"alpha": 0.5, "tau": 16.0, "adapt_first": False, "steps": None}

    def _adapters(self):
        return "first" if self.opts["adapt_first"] else None

    def learn(self, task: Task) -> None:
        if not 0.0 <= float(self.opts["alpha"]) <= 1.0:
            raise ValueError(f"teen: alpha must be in [0, 1], got {self.opts['alpha']}")
        if task.index == 0 and self.opts["adapt_first"]:
            if self.learner.method is None:
                raise ValueError("teen: adapt_first needs a method (e.g. method: lora)")
            self.learner.add_adapter("first", seed=self.task_seed(task))
            self.learner.train("first", task.examples, task.classes, steps=self.opts["steps"],
                               seed=self.task_seed(task))
        means = class_means(self.learner.features(task.texts, self._adapters()), task.labels)
        if task.index > 0:
            base = self.tensors["prototypes"][self.stream[0].classes]
            new = torch.stack([means[c] for c in sorted(means)])
            w = (float(self.opts["tau"]) * F.normalize(new, dim=-1) @ F.normalize(base, dim=-1).T).softmax(-1)
            new = float(self.opts["alpha"]) * new + (1 - float(self.opts["alpha"])) * (w @ base)
            means = dict(zip(sorted(means), new))
        self.put_rows("prototypes", means)

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        feats = self.learner.features(texts, self._adapters())
        return cosine_predict(feats, self.tensors["prototypes"][list(allowed)], allowed)
