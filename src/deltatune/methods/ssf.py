"""SSF: Scaling & Shifting your Features (Lian et al. 2022).

    y' = gamma ⊙ y + beta,        gamma: (out,) = 1 at init,  beta: (out,) = 0 at init

applied to the output of each chosen module (by default every linear layer but the output head; a
LayerNorm-style layer may be targeted explicitly). Since the module is linear in its parameters the
scale and shift fold into it (the paper's re-parameterisation):

    W' = diag(gamma) W,    b' = gamma ⊙ b + beta

(GPT-2 ``Conv1D`` stores W as (in, out): its columns are scaled.) On a layer without a bias, merging
creates one (``b' = beta``) and unmerging removes it again. Unmerging divides by gamma, so merging is
refused (``MergeError``) while any gamma is zero. SSF is not additive: two SSF adapters active at the same
module compose (the second scales the first's output), they do not add. Saved as ``ssf_scale`` and
``ssf_shift`` (the names of the reference implementation; PEFT has no SSF).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, MergeError
from ..core.modules import (
    check_finite_vec,
    current_bias,
    is_conv1d,
    is_norm,
    merge_bias_,
    out_features,
    scale_weight,
    unmerge_bias_,
)
from ..core.registry import register
from ..core.targeting import is_linear


@register
class SSFConfig(DeltaConfig):
    """SSF: a per-feature scale and shift after each target module."""

    type: ClassVar[str] = "ssf"
    tensor_roles: ClassVar[dict[str, str]] = {"ssf_shift": "delta", "ssf_scale": "scale"}
    default_targets: ClassVar[str] = "all-linear"

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or (is_norm(module) and hasattr(module, "bias"))

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not self.supports(module):
            raise ValueError(f"{path}: SSF adapts linear layers (nn.Linear, GPT-2 Conv1D) and LayerNorm-style "
                             f"layers with a bias attribute, not {type(module).__name__}")
        return SSF(out_features(module), is_conv1d(module))


class SSF(Delta):
    """``gamma * y + beta`` over the last (feature) dimension; ``ssf_scale``, ``ssf_shift``: (out,)."""

    mergeable = True

    def __init__(self, out: int, conv1d: bool = False):
        super().__init__()
        self.conv1d = conv1d
        self.ssf_scale = nn.Parameter(torch.ones(out))
        self.ssf_shift = nn.Parameter(torch.zeros(out))

    @property
    def additive(self) -> bool:
        return False

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.ssf_scale.dtype
        out = torch.addcmul(self.ssf_shift, y.to(dt), self.ssf_scale)
        return out.to(y.dtype)

    # -- merging -------------------------------------------------------------------------------
    def _check(self, where: str) -> None:
        check_finite_vec(self.ssf_scale, where)
        check_finite_vec(self.ssf_shift, where)
        if (self.ssf_scale == 0).any():
            raise MergeError(f"{where}: SSF scale has zero entries; merging could not be undone (unmerge divides "
                             f"by the scale), so it is refused")

    def merged_weight(self, base: nn.Module) -> Tensor:
        self._check(type(self).__name__)
        return scale_weight(base.weight.detach(), self.ssf_scale.detach(), self.conv1d).to(base.weight.dtype)

    def merge_into(self, base: nn.Module) -> None:
        g, b = self.ssf_scale.detach().float(), self.ssf_shift.detach().float()
        old = current_bias(base)
        self._merged_bias = old.clone()
        base.weight.data.copy_(self.merged_weight(base))
        merge_bias_(base, old * g + b)

    def unmerge_from(self, base: nn.Module) -> None:
        # the weight is divided back (exact to rounding); the bias is restored from the value kept at merge
        # time, since (b' - beta) / gamma would amplify rounding where gamma is small
        g = self.ssf_scale.detach()
        base.weight.data.copy_(scale_weight(base.weight.detach(), g, self.conv1d, inverse=True).to(base.weight.dtype))
        unmerge_bias_(base, self.__dict__.pop("_merged_bias"))
