"""Operations on a transformers ``DynamicCache`` that continuous batching needs: rows join and leave between steps.

The cache holds, per layer, keys and values of shape ``[batch, heads, time, head_dim]``; the batch's attention mask
``[batch, time]`` says which positions are real (1) or left padding (0). Rows that join are left-padded to the
longer of the two time axes (padding is masked, so its zero keys and values are never attended to); rows that leave
are dropped by index; time columns that are padding for every remaining row are trimmed from the left.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


def check_cache(cache) -> None:
    """Raise unless ``cache`` is a plain dynamic KV cache (what this module knows how to splice)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(la) is not DynamicLayer for la in layers):
        kinds = sorted({type(la).__name__ for la in layers or []})
        raise NotImplementedError(f"the server batches rows through a plain DynamicCache; this model uses "
                                  f"{type(cache).__name__} ({', '.join(kinds)}): sliding-window or static caches "
                                  f"are not supported")


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def join(cache: DynamicCache, mask: Tensor, other: DynamicCache, other_mask: Tensor) -> Tensor:
    """Append ``other``'s rows to ``cache`` (in place); returns the joined attention mask."""
    t, u = mask.shape[1], other_mask.shape[1]
    width = max(t, u)
    for la, lb in zip(cache.layers, other.layers):
        la.keys = torch.cat([_pad_left(la.keys, width - t, -2), _pad_left(lb.keys, width - u, -2)], dim=0)
        la.values = torch.cat([_pad_left(la.values, width - t, -2), _pad_left(lb.values, width - u, -2)], dim=0)
    return torch.cat([_pad_left(mask, width - t, 1), _pad_left(other_mask, width - u, 1)], dim=0)


def select(cache: DynamicCache, mask: Tensor, rows: list[int]) -> Tensor:
    """Keep only ``rows`` (in place); trims the leading time columns no remaining row uses. Returns the mask."""
    idx = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for la in cache.layers:
        la.keys = la.keys.index_select(0, idx)[..., start:, :]
        la.values = la.values.index_select(0, idx)[..., start:, :]
    return mask[:, start:]
