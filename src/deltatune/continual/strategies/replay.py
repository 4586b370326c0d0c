"""Experience replay with a bounded exemplar buffer (Rebuffi et al. 2017, iCaRL's memory; Chaudhry et al. 2019,
"On Tiny Episodic Memories in Continual Learning"): sequential tuning of one delta, each task trained on its data
plus the buffer; the buffer holds at most ``memory`` examples, split evenly over the classes seen (random choice,
seeded), shrunk as classes arrive."""

from __future__ import annotations

import random

from ..stream import Task
from .base import register
from .seq_ft import SeqFT


@register
class Replay(SeqFT):
    name = "replay"
    defaults = {"steps": None, "memory": 2000}

    def training_examples(self, task: Task) -> list[tuple[str, int]]:
        buffer = [(t, int(y)) for t, y in self.meta.get("buffer", [])]
        return list(task.examples) + buffer

    def learn(self, task: Task) -> None:
        super().learn(task)
        seen = self.stream.seen_classes(task.index)
        per_class = max(1, int(self.opts["memory"]) // len(seen))
        rng = random.Random(self.task_seed(task))
        by_class: dict[int, list[tuple[str, int]]] = {}
        for t, y in [*self.meta.get("buffer", []), *task.examples]:
            by_class.setdefault(int(y), []).append((t, int(y)))
        buffer = []
        for c in sorted(by_class):
            items = by_class[c]
            buffer += items if len(items) <= per_class else rng.sample(items, per_class)
        self.meta["buffer"] = buffer
