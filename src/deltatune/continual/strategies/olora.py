"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP
Findings): a new low-rank adapter per task, trained with every earlier one active and frozen, its down-projection
kept orthogonal to theirs at every site:

    L = CE + lambda_orth * sum_{i < t} sum_sites || A_t A_i^T ||_F^2  (+ lambda_l2 * ||theta_t||^2)

so task t writes into a subspace the earlier tasks do not read. Works for methods with a plain low-rank pair
(the Config's ``low_rank_pairs``: LoRA, DoRA); others are refused. Prediction: all adapters summed, the head over
every class seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...core.hooks import TrainingHook
from ..stream import Task
from .base import Strategy, register


class _Orthogonal(TrainingHook):
    def __init__(self, pairs: list[tuple[Tensor, list[Tensor]]], new_params: list[Tensor], lam: float, l2: float):
        self.pairs, self.new_params, self.lam, self.l2 = pairs, new_params, lam, l2

    def extra_loss(self, ctx, step: int) -> Tensor | None:
        terms = [((a.flatten(1) @ old.detach().flatten(1).T) ** 2).sum() for a, olds in self.pairs for old in olds]
        total = self.lam * torch.stack(terms).sum() if terms else None
        if self.l2:
            reg = self.l2 * sum((p ** 2).sum() for p in self.new_params)
            total = reg if total is None else total + reg
        return total


@register
class OLoRA(Strategy):
    name = "olora"
    defaults = {"steps": None, "lambda_orth": 0.5, "lambda_l2": 0.0}

    def __init__(self, learner, stream, **options):
        super().__init__(learner, stream, **options)
        if not type(learner.method).low_rank_pairs:
            raise ValueError(f"olora keeps low-rank down-projections orthogonal: method {learner.method.type!r} has "
                             f"none (use lora or dora)")

    def _down(self, name: str) -> dict[str, Tensor]:
        a_name = type(self.learner.method).low_rank_pairs[0][0]
        return {path: dict(d.named_parameters())[a_name] for path, d in self.learner.dm.deltas(name).items()
                if a_name in dict(d.named_parameters())}

    def learn(self, task: Task) -> None:
        name = f"task{task.index}"
        old = [f"task{i}" for i in range(task.index)]
        self.learner.add_adapter(name, seed=self.task_seed(task))
        new = self._down(name)
        olds = [self._down(o) for o in old]
        pairs = [(a, [o[p] for o in olds if p in o]) for p, a in new.items()]
        params = [p for d in self.learner.dm.deltas(name).values() for p in d.parameters()]
        hook = _Orthogonal(pairs, params, float(self.opts["lambda_orth"]), float(self.opts["lambda_l2"]))
        self.learner.train(name, task.examples, self.stream.seen_classes(task.index), active=[*old, name],
                           steps=self.opts["steps"], seed=self.task_seed(task), hooks=[hook])

    def orthogonality(self) -> float:
        """sum_{i<j} sum_sites ||A_j A_i^T||_F^2 over the adapters learnt (0: fully orthogonal)."""
        downs = [self._down(n) for n in self.learner.adapters]
        with torch.no_grad():
            return float(sum(float(((b[p].flatten(1) @ a[p].flatten(1).T) ** 2).sum())
                             for j, b in enumerate(downs) for a in downs[:j] for p in b if p in a))

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        return self.head_predict(texts, allowed, list(self.learner.adapters))
