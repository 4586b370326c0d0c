"""The strategy contract: ``learn(task)`` then ``predict(texts, allowed, task)``; its state saved between tasks.

A strategy owns a :class:`~deltatune.continual.learner.Learner` (backbone, method, training recipe, head) and keeps
what it needs beyond the learner's adapters and head in ``tensors`` (prototypes, buffers) and ``meta`` (JSON), both
saved by :meth:`save` and restored by :meth:`load` so that a run resumes between tasks exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ...io.adapter import save_adapter
from ..learner import Learner
from ..stream import Task, TaskStream

STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in STRATEGIES:
        raise ValueError(f"continual strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, learner: Learner, stream: TaskStream, **options: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown continual strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](learner, stream, **options)


class Strategy:
    """Base class. ``options`` are the strategy's own settings (checked against :attr:`defaults`)."""

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}
    trains: ClassVar[bool] = True  # False: needs no method (training-free)

    def __init__(self, learner: Learner, stream: TaskStream, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"strategy {self.name!r}: unknown option(s) {unknown}; it takes "
                             f"{sorted(self.defaults) or 'none'}")
        self.opts = {**self.defaults, **options}
        if self.trains and learner.method is None:
            raise ValueError(f"strategy {self.name!r} trains adapters: the run needs a method (e.g. method: lora)")
        self.learner, self.stream = learner, stream
        self.tensors: dict[str, Tensor] = {}
        self.meta: dict[str, Any] = {}
        self.seed = 0

    # -- what a strategy implements --------------------------------------------------------------------
    def learn(self, task: Task) -> None:
        raise NotImplementedError

    def predict(self, texts: Sequence[str], allowed: Sequence[int], task: int | None = None) -> Tensor:
        """Class ids (N,) chosen among ``allowed``; ``task`` is given in task-incremental evaluation."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------------
    def head_predict(self, texts: Sequence[str], allowed: Sequence[int], adapters) -> Tensor:
        logits = self.learner.logits(texts, adapters)
        idx = torch.as_tensor(list(allowed))
        return idx[logits[:, idx].argmax(-1)]

    def put_rows(self, key: str, rows: dict[int, Tensor]) -> Tensor:
        """Write per-class rows (class id -> vector) into ``tensors[key]``, a (num_classes, width) table created
        with zeros on first use; returns the table."""
        table = self.tensors.get(key)
        if table is None:
            width = next(iter(rows.values())).shape[-1]
            table = self.tensors[key] = torch.zeros(self.stream.num_classes, width)
        for c, v in rows.items():
            table[c] = v
        return table

    def task_seed(self, task: Task) -> int:
        return self.seed * 1000 + task.index

    def trainable_parameters(self) -> int:
        """Parameters trained by the strategy: every adapter's (and the head's rows of the stream's classes)."""
        dm = self.learner.dm
        n = sum(p.numel() for name in self.learner.adapters for d in dm.deltas(name).values()
                for p in d.parameters()) if dm is not None else 0
        return n + (self.learner.model.head.weight.numel() + self.learner.model.head.bias.numel()
                    if self.learner.adapters else 0)

    # -- state -------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Adapters (PEFT files, ``adapters/<name>``), head and ``tensors`` (``state.safetensors``), ``meta``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.learner.adapters:
            save_adapter(self.learner.dm, name, folder / "adapters" / name)
        head = self.learner.model.head
        tensors = {"head.weight": head.weight.detach(), "head.bias": head.bias.detach(),
                   **{f"state.{k}": v.detach().contiguous() for k, v in self.tensors.items()}}
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"))
        (folder / "strategy.json").write_text(json.dumps(
            {"strategy": self.name, "options": self.opts, "adapters": self.learner.adapters, "meta": self.meta},
            indent=1))

    def load(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        info = json.loads((folder / "strategy.json").read_text())
        if info["strategy"] != self.name:
            raise ValueError(f"{folder}: saved by strategy {info['strategy']!r}, not {self.name!r}")
        for name in info["adapters"]:
            if name in self.learner.adapters:
                self.learner.dm.delete(name)
            self.learner.load_adapter(folder / "adapters" / name, name)
        tensors = load_file(str(folder / "state.safetensors"))
        with torch.no_grad():
            self.learner.model.head.weight.copy_(tensors["head.weight"])
            self.learner.model.head.bias.copy_(tensors["head.bias"])
        self.tensors = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        self.meta = info["meta"]
