"""What methods need to know about the modules they adapt: shapes and layouts, bias handling, pattern lookups.

One place for the helpers several method files share (``methods/`` import ``core`` only): the (out, in) sizes of
a linear, GPT-2 ``Conv1D`` or convolutional site, its weight layout, normalisation layers, merging a bias into a
base that may have none, and the per-module ``rank_pattern`` / ``alpha_pattern`` lookups.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from .delta import MergeError
from .targeting import is_linear

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BIAS_REFS = "_deltatune_created_bias"  # on a base module: how many merged deltas share a bias created by merging


# -- shapes and layouts -----------------------------------------------------------------------------
def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return is_linear(m) and not isinstance(m, nn.Linear)


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a per-feature weight: ``nn.LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``...

    Recognised by class name (ending in ``Norm``, e.g. ``LayerNorm``, ``RMSNorm``) and a 1-d ``weight``.
    """
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("Norm") and isinstance(w, nn.Parameter) and w.dim() == 1


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear layer, GPT-2's Conv1D (weight (in, out)) or a convolution (channels)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, CONV):
        return module.out_channels, module.in_channels
    return module.weight.shape[1], module.weight.shape[0]


def site_shape(module: nn.Module, path: str) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a site, in the (out, in, *kernel) layout of its effective weight.

    For a grouped convolution ``in`` is the per-group input width (the weight's second dimension)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    if isinstance(module, CONV):
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    if is_linear(module):  # GPT-2 Conv1D: weight (in, out)
        return module.weight.shape[1], module.weight.shape[0], ()
    raise ValueError(f"{path}: {type(module).__name__} is not supported (Linear, GPT-2 Conv1D, Conv1d, Conv2d are)")


def out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if is_conv1d(m):
        return m.weight.shape[1]
    return m.weight.shape[-1]


def in_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    if is_conv1d(m):
        return m.weight.shape[0]
    raise TypeError(f"{type(m).__name__} has no input features")


def scale_weight(w: Tensor, s: Tensor, conv1d: bool, on_input: bool = False, inverse: bool = False) -> Tensor:
    """``diag(s) W`` (per output feature) or ``W diag(s)`` (``on_input``), whatever the storage layout;
    ``inverse`` divides by ``s`` instead (unmerging).

    nn.Linear stores W as (out, in), GPT-2 Conv1D as (in, out), norms as (hidden,). Returns float32.
    """
    w, s = w.float(), s.float().reshape(-1)
    if w.dim() > 1:
        along_rows = on_input == conv1d  # Linear/out or Conv1D/in: the first dimension
        s = s[:, None] if along_rows else s[None, :]
    return w / s if inverse else w * s


# -- biases and merging -----------------------------------------------------------------------------
def merge_bias_(base: nn.Module, new: Tensor) -> None:
    """Set the base's bias to ``new`` (float32), creating the parameter if the layer has none."""
    b = getattr(base, "bias", None)
    if b is None:
        w = base.weight
        base.bias = nn.Parameter(new.to(device=w.device, dtype=w.dtype), requires_grad=False)
        base.__dict__[_BIAS_REFS] = 1
        return
    b.data.copy_(new.to(b.dtype))
    if _BIAS_REFS in base.__dict__:
        base.__dict__[_BIAS_REFS] += 1


def unmerge_bias_(base: nn.Module, old: Tensor) -> None:
    """Undo :func:`merge_bias_`: restore ``old``, or remove the bias if merging created it (last one out)."""
    refs = base.__dict__.get(_BIAS_REFS)
    if refs is not None:
        if refs <= 1:
            base.bias = None
            del base.__dict__[_BIAS_REFS]
            return
        base.__dict__[_BIAS_REFS] = refs - 1
    base.bias.data.copy_(old.to(base.bias.dtype))


def current_bias(base: nn.Module) -> Tensor:
    """The base's bias in float32, zeros when it has none."""
    b = getattr(base, "bias", None)
    if b is None:
        w = base.weight
        return torch.zeros(out_features(base), device=w.device, dtype=torch.float32)
    return b.detach().float()


def check_finite_vec(t: Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise MergeError(f"{where}: the delta holds NaN or inf values; nothing was merged")


# -- per-module patterns (rank_pattern, alpha_pattern) ---------------------------------------------
def check_patterns(rank_pattern: dict[str, int], alpha_pattern: dict[str, float]) -> None:
    """Validate per-module ``rank_pattern`` / ``alpha_pattern`` (regex keys, positive ranks)."""
    for k, v in rank_pattern.items():
        if v <= 0:
            raise ValueError(f"rank_pattern[{k!r}] must be > 0, got {v}")
    for k in list(rank_pattern) + list(alpha_pattern):
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"pattern {k!r} is not a valid regex: {e}") from None


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern whose regex matches ``path`` or one of its dotted suffixes."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default
