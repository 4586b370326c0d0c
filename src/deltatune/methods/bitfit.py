"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

    y' = W x + (b + db)  =  y + db,       db: (out,), zero at init

The delta is kept apart from the frozen bias ``b`` so that several adapters, disabling and unloading stay
exact. A layer without a bias (Llama's projections) gets a bias delta too (the identity at init); merging
then *creates* the layer's bias parameter, and unmerging / unloading removes it again, so the unloaded
model has exactly the original parameters and state-dict keys. (``merge_and_unload`` on such a layer
returns a model that carries the new bias: the base library's config may not know it has one.)

Sites: ``nn.Linear``, GPT-2 ``Conv1D`` (every linear layer but the output head by default) and, with
``include_norms=True``, the biases of normalisation layers that have one (``nn.LayerNorm``; RMSNorm has
none and its forward would ignore one, so it is skipped). Saved as ``<module>.bitfit_bias`` (the delta,
not the absolute bias: PEFT has no BitFit format).

The small helpers at the top (output features, GPT-2 ``Conv1D`` layout, creating/removing a bias on
merge) are shared with the other per-channel methods (SSF, IA3).
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, MergeError
from ..core.registry import register
from ..core.targeting import HEAD_NAMES, is_linear

# -- shared helpers --------------------------------------------------------------------------------
_BIAS_REFS = "_deltatune_created_bias"  # on a base module: how many merged deltas share a bias created by merging


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return is_linear(m) and not isinstance(m, nn.Linear)


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer with a per-feature weight: ``nn.LayerNorm``, ``LlamaRMSNorm``, ``T5LayerNorm``...

    Recognised by class name (ending in ``Norm``, e.g. ``LayerNorm``, ``RMSNorm``) and a 1-d ``weight``.
    """
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("Norm") and isinstance(w, nn.Parameter) and w.dim() == 1


def out_features(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if is_conv1d(m):
        return m.weight.shape[1]
    return m.weight.shape[-1]  # norms: (hidden,)


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


# regex for "every module except the output heads" (norm targets are filtered by ``supports``)
NO_HEADS = r"(?!(?:.*\.)?(?:" + "|".join(sorted(map(re.escape, HEAD_NAMES))) + r")$).+"


# -- BitFit ----------------------------------------------------------------------------------------
@register
class BitFitConfig(DeltaConfig):
    """BitFit: only biases train. ``include_norms`` also trains the biases of LayerNorm-style layers."""

    type: ClassVar[str] = "bitfit"
    tensor_roles: ClassVar[dict[str, str]] = {"bitfit_bias": "delta"}
    include_norms: bool = False

    @property
    def default_targets(self) -> str:  # type: ignore[override]
        return NO_HEADS if self.include_norms else "all-linear"

    def supports(self, module: nn.Module) -> bool:
        if is_linear(module):
            return True
        return self.include_norms and is_norm(module) and isinstance(getattr(module, "bias", None), nn.Parameter)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not self.supports(module):
            raise ValueError(f"{path}: BitFit adapts linear layers (and norms with a bias when include_norms=True), "
                             f"not {type(module).__name__}")
        return BitFit(out_features(module))


class BitFit(Delta):
    """``y + db``: a trainable bias delta ``bitfit_bias`` of shape (out,), zero at init."""

    mergeable = True

    def __init__(self, out: int):
        super().__init__()
        self.bitfit_bias = nn.Parameter(torch.zeros(out))

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return y + self.bitfit_bias.to(y.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        check_finite_vec(self.bitfit_bias, type(self).__name__)
        return base.weight.detach()  # the weight is untouched; only the bias changes

    def merge_into(self, base: nn.Module) -> None:
        merge_bias_(base, current_bias(base) + self.bitfit_bias.detach().float())

    def unmerge_from(self, base: nn.Module) -> None:
        unmerge_bias_(base, current_bias(base) - self.bitfit_bias.detach().float())
