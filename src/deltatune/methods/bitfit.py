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
from ..core.delta import Delta
from ..core.modules import (
    check_finite_vec,
    current_bias,
    is_norm,
    merge_bias_,
    out_features,
    unmerge_bias_,
)
from ..core.registry import register
from ..core.targeting import HEAD_NAMES, is_linear

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
