"""Training hooks: how a method (or a user) drives part of its training without knowing the training loop.

Some methods are more than their forward: AdaLoRA reallocates its rank budget from gradient importance, DyLoRA
samples a rank per step, GPS (sparse fine-tuning) picks its entries from the first batches' gradients. Their
Config returns hooks from ``training_callbacks(dm, name)``; a training loop (deltatune's Trainer, or your own)
calls them at fixed points of every step and hands them a :class:`TrainingContext`, never itself::

    on_train_begin(ctx)                       once, after a resumed run's checkpoint is restored
    for each step (ctx.step = 1, 2, ...):
        loss = task loss + sum(extra_loss(ctx, step))   per micro-batch
        loss.backward()
        on_after_backward(ctx, step)          gradients present (before clipping and the optimizer step)
        optimizer step, scheduler step, zero_grad
        on_step_end(ctx, step, metrics)       may add entries to this step's logged metrics
        on_evaluate(ctx, step, metrics)       after an evaluation, when one ran at this step
        (checkpoint: state_dict() of every hook is saved with it)
    resumed from a checkpoint: on_train_begin(ctx), then load_state_dict(saved) with what state_dict returned

A hook whose state changes while training (AdaLoRA's importance averages, DyLoRA's sampled rank) returns it from
``state_dict`` (tensors and JSON values) so that a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from .model import DeltaModel


@runtime_checkable
class TrainingContext(Protocol):
    """What a training loop tells its hooks (deltatune's Trainer provides one; an own loop can too).

    ``dm``: the DeltaModel being trained; ``adapter``: the name of the adapter trained; ``step``: the last
    finished optimizer step (0 before the first); ``start_step``: the step this run started from (0 on a fresh run,
    the checkpoint's step on a resumed one); ``total_steps``: the run's length in optimizer steps.
    """

    dm: DeltaModel
    adapter: str
    step: int
    start_step: int
    total_steps: int

    def batches(self, n: int) -> list[Any]:
        """The run's first ``n`` training batches, in training order, ready for :meth:`loss`."""
        ...

    def loss(self, batch: Any) -> Tensor:
        """The training loss of one batch (a differentiable scalar), as the loop computes it."""
        ...


class TrainingHook(Protocol):
    """Points of the training loop a method can act at; every one is optional (no-op by default).

    Subclass it (``class MyHook(TrainingHook): ...``) and override what you need.
    """

    def on_train_begin(self, ctx: TrainingContext) -> None:
        return None

    def extra_loss(self, ctx: TrainingContext, step: int) -> Tensor | None:
        """A term added to the loss of every micro-batch of ``step`` (e.g. AdaLoRA's orthogonality regulariser)."""
        return None

    def on_after_backward(self, ctx: TrainingContext, step: int) -> None:
        return None

    def on_step_end(self, ctx: TrainingContext, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_evaluate(self, ctx: TrainingContext, step: int, metrics: dict[str, float]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """What must survive a restart: tensors and JSON values by name (saved with each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on a resumed run (after :meth:`on_train_begin`)."""
        return None
