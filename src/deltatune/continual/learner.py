"""What every continual strategy works with: a backbone (any deltatune-adapted model), pooled features, a linear
head over every class of the stream, and training through deltatune's own Trainer.

``ClassifierModel`` is a plain ``nn.Module``: the backbone's pooled features, then ``head``. Deltas attach to its
backbone only (the head is excluded from targeting); the head is the strategy's state, trained beside the delta
(``requires_grad`` on) with the logits of classes outside ``allowed`` masked to -inf, so a task's training moves
only its own classes' rows when ``allowed`` is that task's classes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.hooks import TrainingHook
from ..core.model import DeltaModel
from ..train.data import Collator, DataStats, Example, TokenizedDataset
from ..train.trainer import TrainConfig, Trainer


@dataclass
class ClassifierOutput:
    loss: Tensor | None
    logits: Tensor
    features: Tensor


class ClassifierModel(nn.Module):
    """``backbone`` (a transformers model: encoder, or decoder whose last hidden state is used) pooled by
    ``pooling`` ("mean" over the attention mask, "cls" the first position, "last" the last real token), then
    ``head`` (hidden -> num_classes)."""

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        self.backbone, self.pooling = backbone, pooling
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{type(backbone).__name__}: no config.hidden_size; cannot size the head")
        self.hidden = int(hidden)
        self.head = nn.Linear(self.hidden, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("allowed", torch.ones(num_classes, dtype=torch.bool), persistent=False)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        h = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        mask = attention_mask.to(h.dtype)
        if self.pooling == "mean":
            return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        if self.pooling == "cls":
            return h[:, 0]
        last = attention_mask.long().cumsum(1).argmax(1)  # right padding: the last 1 of each row
        return h[torch.arange(h.shape[0]), last]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        f = self.features(input_ids, attention_mask).float()
        logits = self.head(f).masked_fill(~self.allowed, float("-inf"))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ClassifierOutput(loss, logits, f)


class Learner:
    """A backbone with its tokenizer, the method config every adapter of the run uses, and the training recipe.

    ``dm`` (the DeltaModel over :class:`ClassifierModel`) exists from the first :meth:`add_adapter`; before that,
    and under :meth:`features` with ``adapters=None``, the backbone is exactly the pretrained model.
    """

    def __init__(self, backbone: nn.Module, tokenizer, num_classes: int, method: DeltaConfig | None,
                 train: TrainConfig | None = None, *, pooling: str = "mean", max_length: int = 128,
                 batch_size: int = 64, progress: bool = False):
        self.model = ClassifierModel(backbone, num_classes, pooling).eval()
        self.model.requires_grad_(False)
        self.tok, self.method = tokenizer, method
        self.train_cfg = train or TrainConfig()
        self.max_length, self.batch_size, self.progress = max_length, batch_size, progress
        self.collate = Collator(tokenizer)
        self.dm: DeltaModel | None = None

    # -- adapters ------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return [] if self.dm is None else list(self.dm.configs)

    def _config(self, cfg: DeltaConfig | None) -> DeltaConfig:
        cfg = cfg or self.method
        if cfg is None:
            raise ValueError("this run has no method: give one (method: lora, ...) to train adapters")
        excl = cfg.exclude
        excl = ["head"] if excl is None else ([excl] if isinstance(excl, str) else list(excl)) + ["head"]
        return cfg.model_copy(update={"exclude": excl})

    def add_adapter(self, name: str, cfg: DeltaConfig | None = None, *, seed: int | None = None) -> None:
        """A fresh adapter ``name`` of the run's method (or ``cfg``) on the backbone, trainable. With ``seed`` its
        initialisation depends on nothing else (the global RNG is left as it was): a resumed run re-creates it."""
        cfg = self._config(cfg)
        if self.dm is None:
            self.dm = DeltaModel(self.model)
        if seed is None:
            self.dm.add(cfg, name)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.dm.add(cfg, name)
        self.model.head.requires_grad_(False)

    def load_adapter(self, folder: str | Path, name: str) -> None:
        if self.dm is None:
            self.dm = DeltaModel(self.model)
        self.dm.load(folder, name)

    def activate(self, names: str | list[str] | None) -> Any:
        """A context in which ``names`` (one adapter, several summed, or None: the bare backbone) are active."""
        if names is None or (isinstance(names, list) and not names):
            return self.dm.disabled() if self.dm is not None and self.dm.configs else nullcontext()
        self.dm.activate(names)
        return nullcontext()

    # -- training ------------------------------------------------------------------------------------
    def dataset(self, examples: Sequence[tuple[str, int]]) -> TokenizedDataset:
        enc = self.tok([t for t, _ in examples], truncation=True, max_length=self.max_length)["input_ids"]
        return TokenizedDataset([Example(list(ids), label=y) for ids, (_, y) in zip(enc, examples)],
                                "classification", DataStats(rows=len(examples), examples=len(examples)))

    def train(self, adapter: str, examples: Sequence[tuple[str, int]], allowed: Iterable[int], *,
              active: list[str] | None = None, steps: int | None = None, seed: int = 0, train_head: bool = True,
              hooks: Sequence[TrainingHook] = (), lr: float | None = None) -> float:
        """Train ``adapter`` (and the head's rows of the ``allowed`` classes, unless not ``train_head``) on
        ``examples`` with deltatune's Trainer (a fresh optimizer each call); ``active`` adapters (default: just
        ``adapter``) are in the forward, only ``adapter`` learns. Returns the final loss."""
        cfg = self.train_cfg.model_copy(update={"seed": seed, **({"steps": steps} if steps else {}),
                                                **({"lr": lr} if lr else {})})
        self._allow(allowed)
        self.model.head.requires_grad_(train_head)
        for n in self.adapters:
            self.dm.set_trainable(n, n == adapter)
        self.dm.activate(active or adapter)
        try:
            with tempfile.TemporaryDirectory(prefix="deltatune-continual-") as tmp:
                trainer = Trainer(self.dm, self.dataset(examples), cfg, Path(tmp), task="classification",
                                  adapter=adapter, collate=self.collate, callbacks=hooks, progress=self.progress)
                result = trainer.train()
        finally:
            self.model.head.requires_grad_(False)
            for n in self.adapters:
                self.dm.set_trainable(n, False)
            self._allow(None)
            self.model.eval()
        return result.final_loss

    def _allow(self, classes: Iterable[int] | None) -> None:
        mask = self.model.allowed
        if classes is None:
            mask.fill_(True)
        else:
            mask.fill_(False)
            mask[list(classes)] = True

    # -- inference -----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, texts: Sequence[str], adapters: str | list[str] | None = None) -> Tensor:
        """Pooled float32 features (N, hidden) of ``texts`` with ``adapters`` active (None: the bare backbone)."""
        return self._run(texts, adapters, lambda out: out.features)

    @torch.no_grad()
    def logits(self, texts: Sequence[str], adapters: str | list[str] | None = None) -> Tensor:
        """The head's logits (N, num_classes) over the features of ``texts`` with ``adapters`` active."""
        return self._run(texts, adapters, lambda out: out.logits)

    def _run(self, texts: Sequence[str], adapters, pick) -> Tensor:
        if not texts:
            return torch.zeros(0, self.model.hidden)
        self.model.eval()
        self._allow(None)
        enc = self.tok(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        out: list[Tensor | None] = [None] * len(enc)
        with self.activate(adapters):
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                batch = self.collate([Example(list(enc[i])) for i in idx])
                res = pick(self.model(batch["input_ids"], batch["attention_mask"])).float()
                for j, i in enumerate(idx):
                    out[i] = res[j]
        return torch.stack(out)  # type: ignore[arg-type]


# -- prototype classifiers (SimpleCIL, APER, per-task inference) ------------------------------------------

def class_means(features: Tensor, labels: Sequence[int] | Tensor) -> dict[int, Tensor]:
    """The mean feature of each class present in ``labels``."""
    y = torch.as_tensor(labels)
    return {int(c): features[y == c].mean(0) for c in torch.unique(y)}


def cosine_predict(features: Tensor, prototypes: Tensor, classes: Sequence[int]) -> Tensor:
    """The class (from ``classes``, the rows of ``prototypes``) whose prototype is nearest by cosine similarity."""
    sim = F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return torch.as_tensor(list(classes))[sim.argmax(-1)]
