"""The training loop: one adapter of a DeltaModel, on tokenized data, safe to interrupt.

AdamW over the trainable parameters only; linear/cosine/constant schedule with warmup; gradient
accumulation and clipping; optional bfloat16 autocast and gradient checkpointing; periodic evaluation;
a live progress bar; ``metrics.jsonl``; a loss-curve PNG; atomic checkpoints with exact resume.

For causal LMs the loss is computed on the labelled positions only: the backbone runs once, and the
output head (the largest matmul of a small LM) runs only on the hidden states whose next token carries
a label. For prompt/completion and chat data, where most positions are unlabelled, this is most of the
head's cost and memory saved, with the same loss.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..core.hooks import TrainingHook
from ..core.model import DeltaModel, owner_of
from ..io.adapter import save_adapter
from .checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .data import bucket_batches
from .loss import linear_cross_entropy
from .plots import plot_loss_curve


class TrainConfig(BaseModel):
    """Training hyper-parameters (the ``train:`` section of a run's YAML)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    save_every: int | None = Field(None, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_batches: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    bf16: bool = False
    gradient_checkpointing: bool = False
    log_every: int = Field(1, gt=0)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


Callback = TrainingHook  # the hooks' protocol (core/hooks.py), by the name the Trainer has always used


class _Context:
    """The :class:`~deltatune.core.hooks.TrainingContext` a Trainer hands its hooks: what they may read or call."""

    def __init__(self, trainer: Trainer):
        self._trainer = trainer
        self.dm, self.adapter = trainer.dm, trainer.adapter
        self.total_steps = trainer.cfg.steps
        self.step = self.start_step = 0

    def batches(self, n: int) -> list[Any]:
        t = self._trainer
        return [t.collate([t.train_data[j] for j in idx]) for idx in t._batches(0)[:n]]

    def loss(self, batch: Any) -> torch.Tensor:
        return self._trainer.loss(batch)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens: int
    eval: dict[str, float] = field(default_factory=dict)
    adapter_dir: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def make_schedule(opt: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if kind == "constant":
        return get_constant_schedule_with_warmup(opt, warmup)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(opt, warmup, total)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, running the output head only where needed.

    Equal to the model's own ``labels=`` loss; falls back to it when the model is not a plain
    backbone + linear head (e.g. logit soft-capping).
    """
    labels = batch["labels"]
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    special = any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_multiplier"))
    dm = owner_of(model)
    inputs = dm is not None and dm.transforms_inputs  # prompt/prefix tuning: only the whole model's forward applies it
    if backbone is None or backbone is model or head is None or special or inputs:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels).loss
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    h = hidden[:, :-1][keep]
    if type(head) is torch.nn.Linear:
        return linear_cross_entropy(h, head.weight, head.bias, targets[keep])
    return F.cross_entropy(head(h).float(), targets[keep])


@torch.no_grad()
def evaluate_dataset(model: torch.nn.Module, data, collate, *, task: str = "causal-lm", batch_size: int = 8,
                     max_batches: int | None = None, bf16: bool = False) -> dict[str, float]:
    """Token-weighted loss (causal LM) or mean loss and accuracy (classification) over ``data``."""
    was_training = model.training
    model.eval()
    order = bucket_batches(data.lengths, batch_size, seed=0, shuffle=False)[:max_batches]
    total, n, correct, seen = 0.0, 0, 0, 0
    for idx in order:
        batch = collate([data[j] for j in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if task == "causal-lm":
                loss = causal_lm_loss(model, batch)
                k = int((batch["labels"][:, 1:] != -100).sum())
            else:
                out = model(**batch)
                loss, k = out.loss, len(idx)
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                seen += len(idx)
        total += float(loss) * k
        n += k
    model.train(was_training)
    metrics = {"eval_loss": total / max(n, 1)}
    if seen:
        metrics["eval_accuracy"] = correct / seen
    return metrics


class Trainer:
    """Train adapter ``adapter`` of ``dm`` on ``train_data`` (a tokenized dataset) into ``output``."""

    def __init__(self, dm: DeltaModel, train_data, cfg: TrainConfig, output: str | Path, *, eval_data=None,
                 task: str = "causal-lm", adapter: str | None = None, collate=None,
                 callbacks: Sequence[TrainingHook] = (), progress: bool = True):
        self.dm, self.cfg, self.output = dm, cfg, Path(output)
        self.train_data, self.eval_data = train_data, eval_data
        self.task = task
        self.adapter = adapter or dm.active[0]
        self.collate = collate
        # a method may drive part of its training itself (AdaLoRA's rank budget): its config supplies hooks
        self.callbacks = list(callbacks) + list(dm.configs[self.adapter].training_callbacks(dm, self.adapter))
        self.context = _Context(self)
        self.progress = progress
        self.params = [p for p in dm.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"adapter {self.adapter!r} has no trainable parameters (loaded with trainable=False?)")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = make_schedule(self.opt, cfg.schedule, cfg.warmup, cfg.steps)
        self.ckpt_root = self.output / "checkpoints"
        self.metrics_file = self.output / "metrics.jsonl"

    def _hook_keys(self) -> list[tuple[str, TrainingHook]]:
        """Each hook with the key its checkpointed state is saved under: class name and occurrence (``AdaLoRAHook#0``)."""
        seen: dict[str, int] = {}
        out = []
        for cb in self.callbacks:
            name = type(cb).__qualname__
            out.append((f"{name}#{seen.get(name, 0)}", cb))
            seen[name] = seen.get(name, 0) + 1
        return out

    # -- data ----------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list[list[int]]:
        return bucket_batches(self.train_data.lengths, self.cfg.batch_size, seed=self.cfg.seed + epoch)

    def _stream(self, epoch: int, index: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Micro-batches from data position (epoch, index) onwards, forever."""
        while True:
            order = self._batches(epoch)
            for i in range(index, len(order)):
                yield epoch, i + 1, self.collate([self.train_data[j] for j in order[i]])
            epoch, index = epoch + 1, 0

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            if self.task == "causal-lm":
                return causal_lm_loss(self.dm.model, batch)
            return self.dm(**batch).loss

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        return evaluate_dataset(self.dm.model, self.eval_data, self.collate, task=self.task,
                                batch_size=self.cfg.batch_size, max_batches=self.cfg.eval_batches, bf16=self.cfg.bf16)

    # -- the output folder ---------------------------------------------------------------------
    RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png", "adapter_config.json", "adapter_model.safetensors")

    def claim_output(self, resume: bool = False, overwrite: bool = False) -> None:
        """Make ``output`` this run's. A fresh run (not ``resume``) refuses a folder holding an earlier run (its
        checkpoints would be pruned among the new ones, and a later resume would continue the old run), unless
        ``overwrite``, which removes that run's files (only those: ``RUN_FILES``)."""
        if resume:
            return
        found = [n for n in self.RUN_FILES if (self.output / n).exists()]
        if found and not overwrite:
            raise FileExistsError(f"{self.output} already holds a training run ({', '.join(found)}); resume it "
                                  f"(--resume) or start over (--overwrite removes {', '.join(found)})")
        for n in found:
            f = self.output / n
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()

    # -- the loop ------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        cfg = self.cfg
        self.claim_output(resume, overwrite)
        self.output.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        state = {"step": 0, "epoch": 0, "index": 0, "tokens": 0, "seconds": 0.0}
        hook_states: dict[str, dict[str, Any]] = {}
        if resume:
            ckpt = latest_checkpoint(self.ckpt_root)
            if ckpt is not None:
                state, hook_states = load_checkpoint(ckpt, self.dm, self.adapter, self.opt, self.sched)
                # the schedule may be longer now (more steps): continue on it, not at the old end's lr
                for g, base, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
                    g["lr"] = base * fn(self.sched.last_epoch)
        self._keep_metrics_upto(state["step"])  # steps after the checkpoint are re-run and re-logged
        if cfg.gradient_checkpointing:
            self._enable_checkpointing()
        self.dm.train()
        ctx = self.context
        ctx.step = ctx.start_step = state["step"]  # 0 on a fresh run
        for cb in self.callbacks:
            cb.on_train_begin(ctx)
        for key, cb in self._hook_keys():
            if key in hook_states:
                cb.load_state_dict(hook_states.pop(key))
        if lost := [k for k, v in hook_states.items() if v]:
            warnings.warn(f"the checkpoint holds the state of training hooks this run does not have ({', '.join(lost)}); "
                          "it is ignored", stacklevel=2)
        stream = self._stream(state["epoch"], state["index"])
        self.opt.zero_grad(set_to_none=True)  # gradients left by the caller would join the first step
        losses: list[float] = []
        last_eval: dict[str, float] = {}
        t0 = time.perf_counter() - state["seconds"]
        with _Progress(cfg.steps, state["step"], self.progress) as bar:
            for step in range(state["step"] + 1, cfg.steps + 1):
                step_loss, step_tokens = 0.0, 0
                for _ in range(cfg.grad_accum):
                    epoch, index, batch = next(stream)
                    loss = self.loss(batch)
                    if not torch.isfinite(loss.detach()):
                        raise TrainingDiverged(
                            f"loss is {float(loss.detach())} at step {step}; stopped. The last good checkpoint is kept in "
                            f"{latest_checkpoint(self.ckpt_root) or '(none yet)'}; try a lower lr or max_grad_norm."
                        )
                    extra = [t for cb in self.callbacks if (t := cb.extra_loss(ctx, step)) is not None]
                    ((loss + sum(extra)) / cfg.grad_accum if extra else loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                    step_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                for cb in self.callbacks:
                    cb.on_after_backward(ctx, step)
                grad_norm = None
                if cfg.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                lr = self.opt.param_groups[0]["lr"]
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                state.update(step=step, epoch=epoch, index=index, tokens=state["tokens"] + step_tokens,
                             seconds=time.perf_counter() - t0)
                ctx.step = step
                losses.append(step_loss)
                metrics = {"step": step, "loss": step_loss, "lr": lr,
                           "tokens_per_s": state["tokens"] / max(state["seconds"], 1e-9)}
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                    for cb in self.callbacks:
                        cb.on_evaluate(ctx, step, last_eval)
                for cb in self.callbacks:
                    cb.on_step_end(ctx, step, metrics)
                if step % cfg.log_every == 0 or step == cfg.steps or "eval_loss" in metrics:
                    self._log(metrics)
                bar.update(step, metrics)
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint(self.ckpt_root / f"step-{step}", self.dm, self.adapter, self.opt, self.sched,
                                    dict(state), {k: st for k, cb in self._hook_keys() if (st := cb.state_dict())})
                    prune_checkpoints(self.ckpt_root, cfg.keep_checkpoints)
        self.dm.eval()
        save_adapter(self.dm, self.adapter, self.output)
        self._plot()
        return TrainResult(steps=state["step"], final_loss=losses[-1] if losses else math.nan,
                           seconds=state["seconds"], tokens=state["tokens"], eval=last_eval, adapter_dir=self.output)

    def _enable_checkpointing(self) -> None:
        model = self.dm.model
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _keep_metrics_upto(self, step: int) -> None:
        if not self.metrics_file.exists():
            return
        rows = [x for x in self.metrics_file.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
        self.metrics_file.write_text("".join(x + "\n" for x in rows))

    def _log(self, metrics: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def _plot(self) -> None:
        if self.metrics_file.exists():
            plot_loss_curve(self.metrics_file, self.output / "loss.png")


class _Progress:
    """A rich progress bar with loss, learning rate, tokens/s and ETA (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))  # stdout stays for results
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def __enter__(self) -> _Progress:
        if self.enabled:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.enabled:
            info = f"loss {m['loss']:.4f}  lr {m['lr']:.2e}  {m['tokens_per_s']:.0f} tok/s"
            if "eval_loss" in m:
                info += f"  eval {m['eval_loss']:.4f}"
            self.bar.update(self.task, completed=step, info=info)
