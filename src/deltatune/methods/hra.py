"""HRA: Householder Reflection Adaptation (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal
Adaptation via Householder Reflection Adaptation", NeurIPS 2024).

The frozen weight W (out, in) is multiplied on its input side by a chain of r Householder reflections:

    W' = W H,   H = H_1 H_2 ... H_r,   H_i = I - 2 u_i u_i^T / ||u_i||^2,   u_i in R^in

H is orthogonal, so HRA is an orthogonal fine-tuning (the angles between W's neurons are kept), and ``W H - W`` has
rank at most r, so it is also a low-rank update. With ``apply_GS`` the u_i are first made orthonormal by
Gram-Schmidt (in order), and then H = I - 2 U U^T, one reflection of the r-dimensional span.

Forward: ``y' = x (W H)^T + b = y + (x H^T - x) W^T``, where ``x H^T = x H_r ... H_1`` is applied reflection by
reflection (O(r in) per row, no (in, in) matrix). Merge: ``W <- W H``; unmerge: ``W <- W H^T`` (H^{-1} = H^T).

Init (PEFT's): for even r the columns come in equal pairs (u_1 = u_2, u_3 = u_4, ...), each pair's reflections
cancel and H = I; the distinct half is Kaiming-uniform. Odd r cannot pair up: a warning, and a random start (the
adapted model then differs from the base at init), as in PEFT; so does ``apply_GS`` (after Gram-Schmidt the second
vector of a pair is the rounding residue of its first, normalised: a random direction), as in PEFT too.
``init_weights=False``: every column random.

File: PEFT's HRA format, ``base_model.model.<module>.hra_u`` of shape (in, r). Sites: ``nn.Linear`` (and GPT-2
``Conv1D``, which PEFT cannot adapt; the file format is the same).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import out_in
from ..core.registry import register
from ..core.targeting import is_linear


@register
class HRAConfig(DeltaConfig):
    """HRA. ``r`` Householder reflections per layer (even, so that the start is the identity), ``apply_GS``
    orthonormalises them (Gram-Schmidt) before use, ``init_weights=False`` starts from random reflections."""

    type: ClassVar[str] = "hra"
    peft_type: ClassVar[str] = "HRA"
    peft_fields: ClassVar[dict[str, str]] = {"r": "r", "apply_GS": "apply_GS", "init_weights": "init_weights"}
    peft_constants: ClassVar[dict[str, Any]] = {"bias": "none"}

    r: int = Field(8, gt=0)
    apply_GS: bool = False  # noqa: N815 - PEFT's name
    init_weights: bool = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not is_linear(module):
            raise ValueError(f"{path}: HRA adapts linear layers (and GPT-2 Conv1D), not {type(module).__name__}")
        out_f, in_f = out_in(module)
        if self.r > in_f:
            raise ValueError(f"{path}: r={self.r} reflections exceed the input width {in_f}")
        if self.r % 2 and self.init_weights:
            warnings.warn(f"{path}: HRA with odd r={self.r} cannot start as the identity (its reflections pair up "
                          f"only for even r); starting from random reflections", stacklevel=3)
        elif self.apply_GS and self.init_weights and self.r > 1:
            warnings.warn(f"{path}: HRA with apply_GS and init_weights=True (PEFT's default): Gram-Schmidt leaves "
                          f"every second vector of the paired start as rounding noise, whose direction is random and "
                          f"hard to train; use init_weights=False", stacklevel=3)
        return HRA(module, self.r, self.apply_GS, self.init_weights)


class HRA(Delta):
    """``y + (x H^T - x) W^T`` with H the product of the reflections of ``hra_u``'s columns (see module doc).

    Shapes: hra_u (in, r); W (out, in) (GPT-2 Conv1D stores (in, out)).
    """

    mergeable = True

    def __init__(self, base: nn.Module, r: int, apply_gs: bool, init_weights: bool):
        super().__init__()
        self.out_f, self.in_f = out_in(base)
        self.r, self.apply_gs = r, apply_gs
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # GPT-2 Conv1D: weight (in, out)
        if init_weights and r % 2 == 0:
            half = torch.empty(self.in_f, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)  # u_1 = u_2, u_3 = u_4, ...: H = I
        else:
            u = torch.empty(self.in_f, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u = nn.Parameter(u)

    @property
    def additive(self) -> bool:
        return False  # multiplicative: two at one module do not add

    def _directions(self) -> Tensor:
        """The unit reflection vectors as columns (in, r), float32; orthonormalised in order with ``apply_GS``."""
        u = self.hra_u.float()
        if not self.apply_gs:
            return u / u.norm(dim=0).clamp_min(1e-12)
        cols: list[Tensor] = []
        for i in range(self.r):
            v = u[:, i]
            for q in cols:
                v = v - (q @ v) * q
            cols.append(v / v.norm().clamp_min(1e-12))  # a zero residue (exactly equal pair) stays finite
        return torch.stack(cols, dim=1)

    def _reflect(self, x: Tensor, reverse: bool) -> Tensor:
        """``x H^T`` (``reverse``: x H_r ... H_1), or ``x H`` (x H_1 ... H_r), for row vectors x (..., in)."""
        u = self._directions().to(x.dtype)
        if self.apply_gs:  # H = I - 2 U U^T is symmetric: the same both ways
            return x - 2 * (x @ u) @ u.T
        for i in (range(self.r - 1, -1, -1) if reverse else range(self.r)):
            ui = u[:, i]
            x = x - 2 * (x @ ui)[..., None] * ui
        return x

    def rotation(self) -> Tensor:
        """H = H_1 ... H_r as a dense (in, in) float32 matrix."""
        eye = torch.eye(self.in_f, device=self.hra_u.device, dtype=torch.float32)
        return self._reflect(eye, reverse=False)  # rows of I times H_1 ... H_r = H

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        xf = x.to(torch.float32) if x.dtype != self.hra_u.dtype else x
        moved = self._reflect(xf, reverse=True) - xf  # x H^T - x
        w = base.weight.T if self.fan_in_fan_out else base.weight
        return y + F.linear(moved.to(w.dtype), w).to(y.dtype)

    def _w(self, base: nn.Module) -> Tensor:
        w = base.weight.T if self.fan_in_fan_out else base.weight
        return w.detach().float()

    def _back(self, w: Tensor, base: nn.Module) -> Tensor:
        return (w.T if self.fan_in_fan_out else w).to(base.weight.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        return self._back(self._w(base) @ self.rotation(), base)

    def unmerge_from(self, base: nn.Module) -> None:
        base.weight.data.copy_(self._back(self._w(base) @ self.rotation().T, base))
