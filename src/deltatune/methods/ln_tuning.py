"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train the normalisation layers only.

    y' = norm'(x) = n(x) ⊙ g' (+ b'),     g', b': (hidden,), a trainable copy of the norm's g (and b)

The delta holds a trained copy of the whole norm module (``nn.LayerNorm``, ``LlamaRMSNorm``, any class
named ``...Norm`` with a 1-d weight) and computes the site's output with it, as PEFT's ``LN_TUNING``
does; the copy starts equal to the base (the identity). Saved as PEFT saves it:
``<module>.ln_tuning_layers.weight`` (and ``.bias``). Default targets: every norm layer of the model
(PEFT's per-architecture tables list exactly those for Llama and GPT-2).

Merging follows PEFT: the copy takes the base's place, i.e. its weight (and bias) are written into the
base; unmerging restores the originals exactly (they are kept while merged). Not additive: one LN-tuning
adapter replaces the norm's output, so at most one per module can be merged (PEFT also allows only one
active); with several active the last one wins.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import check_finite_vec, is_norm
from ..core.registry import register


@register
class LNTuningConfig(DeltaConfig):
    """LN tuning: a trainable copy of each targeted normalisation layer (default: all of them)."""

    type: ClassVar[str] = "ln_tuning"
    peft_type: ClassVar[str] = "LN_TUNING"
    peft_layers: ClassVar[bool] = False
    default_targets: ClassVar[str] = r".+"  # every module; ``supports`` keeps the norm layers

    def supports(self, module: nn.Module) -> bool:
        return is_norm(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not self.supports(module):
            raise ValueError(f"{path}: LN tuning adapts normalisation layers (a class named ...Norm with a 1-d "
                             f"weight), not {type(module).__name__}")
        return LNTuning(module)

class LNTuning(Delta):
    """``norm'(x)``: ``ln_tuning_layers`` is a trainable copy of the base norm (weight (hidden,), bias (hidden,))."""

    mergeable = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(base)
        for p in self.ln_tuning_layers.parameters():
            p.requires_grad_(True)
        self._stash: dict[str, Tensor] | None = None

    @property
    def additive(self) -> bool:
        return False

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.ln_tuning_layers.weight.dtype
        return self.ln_tuning_layers(x if x.dtype == dt else x.to(dt)).to(y.dtype)

    # -- merging: the copy's parameters replace the base's ---------------------------------------
    def _params(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.ln_tuning_layers.named_parameters()}

    def merged_weight(self, base: nn.Module) -> Tensor:
        for k, v in self._params().items():
            check_finite_vec(v, f"{type(self).__name__}.{k}")
        return self.ln_tuning_layers.weight.detach().to(base.weight.dtype)

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        own = dict(base.named_parameters())
        self._stash = {k: own[k].detach().clone() for k in self._params()}
        for k, v in self._params().items():
            own[k].copy_(v.to(own[k].dtype))

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module) -> None:
        own = dict(base.named_parameters())
        for k, v in (self._stash or {}).items():
            own[k].copy_(v)
        self._stash = None
