"""(IA)^3 (Liu et al. 2022): learned vectors that rescale inner activations.

    keys, values:   y' = l ⊙ (W x + b)              l: (out, 1), saved as ``ia3_l``
    FFN (down):     y' = W (l ⊙ x) + b              l: (1, in)   ("feedforward" modules)

l = 1 at init (the identity). Which targets are feedforward follows PEFT's ``feedforward_modules``: their
*input* (the FFN's intermediate activation) is scaled, every other target's output. Defaults follow PEFT's
per-architecture table: Llama/Mistral ``k_proj, v_proj, down_proj`` (ff: ``down_proj``), GPT-2 ``c_attn``
(the whole fused q/k/v output, as PEFT does) and ``mlp.c_proj`` (ff), BERT/RoBERTa ``key, value,
output.dense`` (ff: ``output.dense``, which also matches ``attention.output.dense``, as in PEFT).

On a feedforward module the delta is computed as ``y + W ((l - 1) ⊙ x)`` (the same function as
``W (l ⊙ x) + b``, without recomputing the base), so several IA3 adapters active at once add their
feedforward effects while their output scalings multiply (PEFT multiplies both). Merging:
``W' = diag(l) W, b' = l ⊙ b`` (output) or ``W' = W diag(l)`` (input); unmerging divides, so merging is
refused (``MergeError``) while l has zero entries. Not additive. The file format is PEFT's ``IA3``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig, TargetSpec
from ..core.delta import Delta, MergeError
from ..core.modules import check_finite_vec, current_bias, in_features, is_conv1d, out_features, scale_weight
from ..core.registry import register
from ..core.targeting import is_linear, matches

# PEFT's TRANSFORMERS_MODELS_TO_IA3_*_MAPPING for the architectures deltatune is tested on, as one list
# (suffix matching makes a model use the entries that name its modules)
DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj", "c_attn", "mlp.c_proj", "key", "value", "output.dense",
                   "query_key_value", "dense_4h_to_h"]
DEFAULT_FEEDFORWARD = ["down_proj", "mlp.c_proj", "output.dense", "dense_4h_to_h"]


def _suffix_regex(names: list[str], dotted: bool = True) -> str:
    """A regex (full match) equivalent to list matching: exact or dotted suffix (``dotted``), or plain
    ``endswith`` (PEFT's rule for list ``feedforward_modules``)."""
    alts = "|".join(re.escape(n) for n in names)
    return rf"(?:.*\.)?(?:{alts})" if dotted else rf".*(?:{alts})"


@register
class IA3Config(DeltaConfig):
    """(IA)^3. ``feedforward_modules``: which targets get their input scaled (same forms as ``targets``;
    ``None``: PEFT's per-architecture defaults)."""

    type: ClassVar[str] = "ia3"
    tensor_roles: ClassVar[dict[str, str]] = {"ia3_l": "log_scale"}
    combine_loose: ClassVar[frozenset[str]] = frozenset({"feedforward_modules"})
    peft_type: ClassVar[str] = "IA3"
    peft_layers: ClassVar[bool] = False
    peft_constants: ClassVar[dict[str, Any]] = {"fan_in_fan_out": False, "init_ia3_weights": True}
    default_targets: ClassVar[list[str]] = DEFAULT_TARGETS

    feedforward_modules: TargetSpec = None

    @field_validator("feedforward_modules")
    @classmethod
    def _ff(cls, v: TargetSpec) -> TargetSpec:
        if isinstance(v, str):
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"feedforward_modules {v!r} is not a valid regex: {e}") from None
        return v

    def is_feedforward(self, path: str) -> bool:
        spec = self.feedforward_modules if self.feedforward_modules is not None else DEFAULT_FEEDFORWARD
        return matches(spec, path)

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not self.supports(module):
            raise ValueError(f"{path}: IA3 adapts linear layers (nn.Linear, GPT-2 Conv1D), not {type(module).__name__}")
        ff = self.is_feedforward(path)
        return IA3(in_features(module) if ff else out_features(module), ff, is_conv1d(module))

    # -- PEFT format ---------------------------------------------------------------------------
    def peft_extra(self) -> dict[str, Any]:
        ff = self.feedforward_modules if self.feedforward_modules is not None else DEFAULT_FEEDFORWARD
        if isinstance(ff, list):  # PEFT matches list entries with a bare endswith; a regex keeps our rule exactly
            ff = _suffix_regex(ff)
        return {"feedforward_modules": ff}

    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        ff = d.get("feedforward_modules")
        if isinstance(ff, (list, tuple, set)):
            ff = _suffix_regex(sorted(ff), dotted=False) if ff else None
        return {"feedforward_modules": ff}


class IA3(Delta):
    """Per-feature rescaling. ``ia3_l``: (out, 1) scaling the output, or (1, in) scaling the input (ff)."""

    mergeable = True

    def __init__(self, features: int, feedforward: bool, conv1d: bool):
        super().__init__()
        self.feedforward = feedforward
        self.conv1d = conv1d
        self.ia3_l = nn.Parameter(torch.ones((1, features) if feedforward else (features, 1)))

    @property
    def additive(self) -> bool:
        return False

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        l = self.ia3_l.reshape(-1)  # noqa: E741 - the paper's name
        if not self.feedforward:
            return (y * l).to(y.dtype)
        # W (l * x) + b  =  y + W ((l - 1) * x): the base output is reused, not recomputed
        xs = (x.to(l.dtype) * (l - 1)).to(base.weight.dtype)
        dy = torch.matmul(xs, base.weight) if self.conv1d else F.linear(xs, base.weight)
        return y + dy.to(y.dtype)

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, base: nn.Module) -> Tensor:
        where = type(self).__name__
        check_finite_vec(self.ia3_l, where)
        if (self.ia3_l == 0).any():
            raise MergeError(f"{where}: ia3_l has zero entries; merging could not be undone (unmerge divides by "
                             f"it), so it is refused")
        w = base.weight.detach()
        return scale_weight(w, self.ia3_l.detach(), self.conv1d, on_input=self.feedforward).to(w.dtype)

    def merge_into(self, base: nn.Module) -> None:
        new = self.merged_weight(base)
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data.copy_((current_bias(base) * self.ia3_l.detach().float().reshape(-1)).to(base.bias.dtype))
        base.weight.data.copy_(new)

    def unmerge_from(self, base: nn.Module) -> None:
        l = self.ia3_l.detach()  # noqa: E741
        w = scale_weight(base.weight.detach(), l, self.conv1d, on_input=self.feedforward, inverse=True)
        base.weight.data.copy_(w.to(base.weight.dtype))
        if not self.feedforward and getattr(base, "bias", None) is not None:
            base.bias.data.copy_((current_bias(base) / l.float().reshape(-1)).to(base.bias.dtype))
