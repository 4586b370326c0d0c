"""Input-level adapters (prompt and prefix tuning): the wrapped model's forward pre-hook that lets the active one
rewrite the forward's arguments (prepend virtual tokens, extend the KV cache). DeltaModel installs it exactly while
such an adapter exists (``DeltaModel._sync_inputs``)."""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING

from torch import nn

from . import kv

if TYPE_CHECKING:
    from .model import DeltaModel


class InputHook:
    """The wrapped model's forward pre-hook: the active input-level delta rewrites the forward's arguments.

    Holds the DeltaModel weakly (the model must not keep its DeltaModel alive, nor copy it when deep-copied).
    """

    def __init__(self, dm: DeltaModel):
        self.dm = weakref.ref(dm)
        self._params: list[str] | None = None
        self._cache_name: str | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        dm = self.dm()
        found = dm._active_input() if dm is not None else None
        if found is None:
            return None
        site, delta = found
        if args:  # positional arguments by the forward's parameter names
            if self._params is None:
                self._params = [n for n, p in inspect.signature(module.forward).parameters.items()
                                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(args) > len(self._params):
                raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
            kwargs = {**dict(zip(self._params, args)), **kwargs}
        # the delta sees the cache as inputs["cache"] whatever this transformers calls it; the model gets its own name
        inputs = {k: v for k, v in kwargs.items() if k not in kv.NAMES}
        inputs = delta.prepare_inputs({**inputs, "cache": kv.cache_of(kwargs)}, site)
        cache = inputs.pop("cache")
        if cache is not None:
            if self._cache_name is None:
                self._cache_name = kv.cache_name(module)
            inputs[self._cache_name] = cache
        return (), inputs
