"""SSIAT (Tan et al. 2024, "Semantically-Shifted Incremental Adapter-Tuning is A Continual ViTransformer",
CVPR 2024): one shared delta tuned on every task (on that task's classes), the old classes' prototypes moved by
the semantic shift estimated from the current data (the drift of its features between the delta before and after
the task, weighted by closeness to each old prototype: Yu et al. 2020's SDC), and the classifier re-fit after every
task from features sampled around every prototype (a Gaussian with the class's per-dimension variance).

    shift_c = sum_i w_ic (f_new_i - f_old_i) / sum_i w_ic,   w_ic = exp(-||f_old_i - p_c||^2 / (2 sigma^2 d2))

with d2 the mean squared distance of the current features to the old prototypes (sigma is relative to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..stream import Task
from .base import Strategy, register


@register
class SSIAT(Strategy):
    name = "ssiat"
    defaults = {"steps": None, "later_lr": None, "sigma": 0.5, "samples": 64, "head_steps": 200, "head_lr": 1e-2}

    def learn(self, task: Task) -> None:
        L = self.learner
        first = task.index == 0
        if first:
            L.add_adapter("shared", seed=self.task_seed(task))
        old_classes = self.stream.seen_classes(task.index - 1) if not first else []
        f_old = None if first else L.features(task.texts, "shared")
        L.train("shared", task.examples, task.classes, steps=self.opts["steps"], seed=self.task_seed(task),
                lr=None if first else self.opts["later_lr"])
        f_new = L.features(task.texts, "shared")
        protos = self.tensors.get("prototypes", torch.zeros(self.stream.num_classes, L.model.hidden))
        var = self.tensors.get("variances", torch.zeros(self.stream.num_classes, L.model.hidden))
        if f_old is not None and old_classes:
            drift = f_new - f_old
            old = protos[old_classes]
            d2 = torch.cdist(f_old, old) ** 2  # (N, C_old)
            w = torch.exp(-d2 / (2 * float(self.opts["sigma"]) ** 2 * d2.mean().clamp_min(1e-12)))
            shift = (w.T @ drift) / w.sum(0)[:, None].clamp_min(1e-12)
            protos[old_classes] = old + shift
        y = torch.tensor(task.labels)
        for c in task.classes:
            f = f_new[y == c]
            protos[c] = f.mean(0)
            var[c] = f.var(0, unbiased=False) if len(f) > 1 else torch.zeros_like(f[0])
        self.tensors["prototypes"], self.tensors["variances"] = protos, var
        self._refit(self.stream.seen_classes(task.index), self.task_seed(task))

    def _refit(self, classes: list[int], seed: int) -> None:
        """Train the head's rows of ``classes`` on features sampled around their prototypes (the head only)."""
        g = torch.Generator().manual_seed(seed)
        n = int(self.opts["samples"])
        protos, var = self.tensors["prototypes"], self.tensors["variances"]
        feats = torch.cat([protos[c] + var[c].sqrt() * torch.randn(n, protos.shape[1], generator=g) for c in classes])
        labels = torch.tensor(classes).repeat_interleave(n)
        head = self.learner.model.head
        idx = torch.tensor(classes)
        head.requires_grad_(True)
        opt = torch.optim.AdamW(head.parameters(), lr=float(self.opts["head_lr"]), weight_decay=0.0)
        remap = torch.full((self.stream.num_classes,), -1, dtype=torch.long)
        remap[idx] = torch.arange(len(classes))
        try:
            for _ in range(int(self.opts["head_steps"])):
                logits = F.linear(feats, head.weight[idx], head.bias[idx])
                loss = F.cross_entropy(logits, remap[labels])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            opt.zero_grad(set_to_none=True)  # no stale gradient may reach the next task's first step
            head.requires_grad_(False)

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        return self.head_predict(texts, allowed, "shared")
