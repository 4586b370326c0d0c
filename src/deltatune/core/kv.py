"""The KV cache in a wrapped model's forward arguments and outputs, under either of its names.

transformers up to 5.24 calls it ``past_key_values``; 5.25 renamed it ``cache`` in every forward signature, in
``generate``'s calls and in model outputs (the old name is still accepted, with a deprecation warning). Code that
reads or replaces the cache of a call (input-level deltas, the positions ``Split`` needs, the server's decode loop)
goes through these helpers, so a call under the other name is never silently taken for a call without a cache, and
a model whose forward takes neither name fails loudly instead of ignoring the cache it is handed.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

NAMES = ("cache", "past_key_values")  # the current name first


def cache_of(kwargs: dict) -> Any:
    """The cache passed in ``kwargs`` under either name (None when there is none); both at once is an error."""
    given = [n for n in NAMES if kwargs.get(n) is not None]
    if len(given) > 1:
        raise ValueError(f"a KV cache was passed twice, as {' and '.join(given)}; pass only one")
    return kwargs[given[0]] if given else None


def cache_name(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its KV cache, read from its signature.

    A forward that takes neither name but passes ``**kwargs`` on to its backbone (transformers' task heads,
    e.g. ``BertForSequenceClassification``) is answered by the backbone (``model.base_model``). Raises TypeError
    naming the class when neither takes ``cache`` nor ``past_key_values``: a transformers that renames it again
    must fail here, not run without the cache.
    """
    seen = []
    while model is not None and model not in seen:
        seen.append(model)
        params = inspect.signature(model.forward).parameters
        for n in NAMES:
            if n in params:
                return n
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
        model = getattr(model, "base_model", None)
    names = " nor ".join(type(m).__name__ for m in seen)
    raise TypeError(f"{names}.forward takes no KV cache argument ({' or '.join(NAMES)}); deltatune needs one to "
                    f"prepend prefixes or to decode with a cache (is this transformers version supported?)")


def output_cache(out: Any) -> Any:
    """The KV cache a model returned: the ``cache`` or ``past_key_values`` field its output class declares."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    for n in NAMES:
        if n in fields:
            return getattr(out, n)
    raise TypeError(f"{type(out).__name__} has no KV cache field ({' or '.join(NAMES)}); "
                    f"call the model with use_cache=True")
