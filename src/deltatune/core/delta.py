"""Delta: one adapter's parameters at one site.

A Delta is an ``nn.Module`` with one required method::

    forward(x, y, base) -> y'      # x: the site's input, y: the output so far, base: the wrapped module

Weight-level deltas also say what they do to the weight, for merging:

    delta_weight(base) -> dW       # same shape as base.weight; merge adds it, unmerge subtracts it

and may override ``merge_into`` / ``unmerge_from`` when the merged weight is not ``W + dW`` (DoRA).
A delta that replaces the base computation altogether (a trained copy of a module) sets
``replaces_base``. Deltas keep their parameters under the names the Hugging Face PEFT format uses, so
``state_dict()`` is the file format; ``export_state`` / ``import_state`` exist for methods that need to
translate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from typing import ClassVar

import torch
from torch import Tensor, nn


class MergeError(RuntimeError):
    """A merge or unmerge that cannot be done (non-finite values, unmergeable method)."""


class Delta(nn.Module):
    mergeable: ClassVar[bool] = False
    replaces_base: ClassVar[bool] = False
    input_level: ClassVar[bool] = False  # an InputDelta: it changes the model's inputs, not a module's output
    frozen: tuple[str, ...] = ()  # parameter names that never train (e.g. LoRA-FA's A)

    @property
    def additive(self) -> bool:
        """True when the effect adds to the output independently of other deltas (merging commutes)."""
        return True

    def set_trainable(self, flag: bool) -> None:
        for n, p in self.named_parameters():
            p.requires_grad_(flag and n not in self.frozen)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- per-row routing (optional) ---------------------------------------------------------------
    @property
    def route_group(self) -> Hashable | None:
        """Deltas at one site with the same class and an equal, non-None ``route_group`` serve a mixed batch
        together, in one pass built by ``type(self).router``. None (the default): the Site runs this delta
        on its own rows, one adapter after another."""
        return None

    @classmethod
    def router(cls, rows: list[Delta | None]) -> Callable[[Tensor, Tensor, nn.Module], Tensor]:
        """``f(x, y, base) -> y'`` applying ``rows[i]`` to row i of a batch (None: row i left as it is).

        Built once per routing per site; it must read the deltas' parameters when called, so in-place
        updates show. ``y`` is the base's fresh output: ``f`` may update it in place when autograd is off.
        """
        raise NotImplementedError(f"{cls.__name__} has a route_group but no router")

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        raise MergeError(f"{type(self).__name__} cannot be merged into the weights")

    def merged_weight(self, base: nn.Module) -> Tensor:
        """The base weight with this delta folded in (in the weight's dtype), not yet assigned."""
        w = base.weight
        return (w.detach().to(torch.float32) + self.delta_weight(base).to(torch.float32)).to(w.dtype)

    def merge_into(self, base: nn.Module) -> None:
        base.weight.data.copy_(self.merged_weight(base))

    def unmerge_from(self, base: nn.Module) -> None:
        w = base.weight
        w.data.copy_((w.detach().to(torch.float32) - self.delta_weight(base).to(torch.float32)).to(w.dtype))

    # -- file format ---------------------------------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        """Tensors to save, keyed as in the PEFT format (relative to the site's module path)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        """Load tensors saved by ``export_state``; raise naming ``where`` and the key on any mismatch."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        for k, t in state.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"{where}.{k}: shape {tuple(t.shape)} in the file, but the model needs {tuple(own[k].shape)}"
                )
        self.load_state_dict({k: t.to(own[k].dtype) for k, t in state.items()})


class InputDelta(Delta):
    """An input-level delta (prompt tuning's virtual tokens, prefix tuning's key/value prefixes).

    It does not change a module's output: it changes what the wrapped model receives. It lives at the
    model's input-embedding site, like any delta (so saving, counting, deleting, trainable flags and dtype
    placement need nothing special), where it leaves the embedding's output as it is, and it contributes

        prepare_inputs(inputs, embed) -> inputs     # the wrapped model's forward keyword arguments

    which the DeltaModel applies (through a forward pre-hook on the wrapped model) to every call of the
    wrapped model while the adapter is active: direct calls and every step of ``generate``. ``embed`` is
    the input-embedding module (its Site, so weight-level deltas there still apply). The KV cache is always
    ``inputs["cache"]`` (None when there is none), whatever the installed transformers calls it (``core/kv.py``).
    Not mergeable.
    """

    input_level = True

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return y

    def prepare_inputs(self, inputs: dict, embed: nn.Module) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class ModuleCopy(Delta):
    """A full trainable copy of a module (``modules_to_save``): it replaces the base at its site.

    Saved under the module's own keys (``<module>.weight``), as PEFT does.
    """

    replaces_base = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, x: Tensor, y: Tensor | None, base: nn.Module, *args, **kwargs) -> Tensor:
        return self.module(x, *args, **kwargs)

    def export_state(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        Delta.import_state(self, {f"module.{k}": v for k, v in state.items()}, where)


def check_finite(t: Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise MergeError(f"{where}: the delta holds NaN or inf values; nothing was merged")
