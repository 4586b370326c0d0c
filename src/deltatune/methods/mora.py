"""MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (Jiang et al. 2024).

    y = W x + f_decomp(M f_comp(dropout(x))),    M: (r_hat, r_hat), trainable, M = 0 at init

One square matrix instead of LoRA's pair, with the parameter budget of a rank-``r`` LoRA on the same layer:
r_hat = round(sqrt((in + out) * r)) (r_hat^2 ~ r (in + out)); so dW can reach rank r_hat instead of r.
The input is first extended cyclically to n * r_hat entries, n = ceil(in / r_hat) (x'_p = x_{p mod in}, the
reference implementation's padding with the first entries), and cut into n chunks x'_1..x'_n of size r_hat.
Two non-parametric compress/decompress pairs (``mora_type``; the reference code's types 1 and 6):

- ``"sharing"`` (paper Eq. 6; for large r): f_comp sums the chunks, f_comp(x)_j = sum_{p = j mod r_hat} x'_p
  (input rows in one group share a row of M); f_decomp repeats, f_decomp(h)_o = h_{o mod r_hat}.
  dW = D M C with C (r_hat, in) the grouping and D (out, r_hat) the repetition.
- ``"rope"`` (paper Eq. 9; for small r, the default): each chunk is rotated as in RoPE by its chunk index t,
  R_t x = x * cos(t theta) + rotate_half(x) * sin(t theta), theta_i = 10000^(-2i / r_hat) (r_hat made even),
  then M maps every chunk: f(x) = [M R_1 x'_1; ...; M R_n x'_n] (n r_hat entries), truncated to out, or
  repeated cyclically when out > n r_hat. dW = D blockdiag(M R_1, ..., M R_n) P.

dW is linear in M and computable as a matrix, so MoRA merges. Not a PEFT method: its file holds ``mora_M``
per module, readable by deltatune only. Sites: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import out_in
from ..core.registry import register
from ..core.targeting import is_linear


def mora_rank(in_f: int, out_f: int, r: int, mora_type: str) -> int:
    """r_hat for a layer with LoRA-rank budget ``r``: round(sqrt((in + out) r)), even for the rope variant."""
    r_hat = int(math.sqrt((in_f + out_f) * r) + 0.5)
    return r_hat // 2 * 2 if mora_type == "rope" else r_hat


@register
class MoRAConfig(DeltaConfig):
    """MoRA. ``r`` the rank of the LoRA whose parameter count MoRA matches (r_hat is derived per layer),
    ``mora_type`` "rope" (rotated chunks, paper's choice for small r) or "sharing" (grouped rows and columns,
    for large r), ``dropout`` on the input of the update, ``init="random"`` a non-zero M (for tests)."""

    type: ClassVar[str] = "mora"
    tensor_roles: ClassVar[dict[str, str]] = {"mora_M": "delta"}

    r: int = Field(8, gt=0)
    mora_type: Literal["rope", "sharing"] = "rope"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["zero", "random"] = "zero"

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        out_f, in_f = out_in(module)
        r_hat = mora_rank(in_f, out_f, self.r, self.mora_type)
        if r_hat < (2 if self.mora_type == "rope" else 1):
            raise ValueError(f"{path}: r={self.r} gives r_hat={r_hat} for a {out_f} x {in_f} weight; "
                             f"the rope variant needs r_hat >= 2 (raise r)")
        return MoRA(module, r_hat, self.mora_type, self.dropout, self.init)


class MoRA(Delta):
    """``y + f_decomp(M f_comp(x))`` (see the module doc).

    Shapes: mora_M (r_hat, r_hat); buffers in_index (n r_hat,) for the cyclic extension of x, out_index (out,)
    for the decompression, and for "rope" cos, sin (n, r_hat).
    """

    mergeable = True

    def __init__(self, base: nn.Module, r_hat: int, mora_type: str = "rope", dropout: float = 0.0,
                 init: str = "zero"):
        super().__init__()
        self.out_features, self.in_features = out_in(base)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # GPT-2 Conv1D
        self.r_hat, self.mora_type = r_hat, mora_type
        self.chunks = -(-self.in_features // r_hat)  # n = ceil(in / r_hat)
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat))
        if init == "random":
            nn.init.kaiming_uniform_(self.mora_M, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        width = r_hat if mora_type == "sharing" else self.chunks * r_hat  # length of M's output before f_decomp
        self.register_buffer("in_index", torch.arange(self.chunks * r_hat) % self.in_features, persistent=False)
        self.register_buffer("out_index", torch.arange(self.out_features) % width, persistent=False)
        if mora_type == "rope":
            inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2).float() / r_hat))
            angles = torch.outer(torch.arange(self.chunks).float(), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # (n, r_hat)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

    @staticmethod
    def _rotate_half(v: Tensor) -> Tensor:
        h = v.shape[-1] // 2
        return torch.cat([-v[..., h:], v[..., :h]], dim=-1)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        m = self.mora_M
        xd = x if x.dtype == m.dtype else x.to(m.dtype)
        if self.dropout is not None:
            xd = self.dropout(xd)
        if self.in_index.numel() != self.in_features:
            xd = xd.index_select(-1, self.in_index)
        chunks = xd.view(*xd.shape[:-1], self.chunks, self.r_hat)
        if self.mora_type == "sharing":
            h = F.linear(chunks.sum(dim=-2), m)  # (..., r_hat)
        else:
            rotated = chunks * self.cos + self._rotate_half(chunks) * self.sin
            h = F.linear(rotated, m).flatten(-2)  # (..., n r_hat)
        if h.shape[-1] != self.out_features:
            h = h.index_select(-1, self.out_index)
        return y + h.to(y.dtype)

    # -- the update as a matrix ----------------------------------------------------------------------
    def rotations(self) -> Tensor:
        """R_t for every chunk t, (n, r_hat, r_hat): R_t = diag(cos_t) + diag(sin_t) J, J x = rotate_half(x)."""
        r, h = self.r_hat, self.r_hat // 2
        j = torch.zeros(r, r, dtype=torch.float32, device=self.mora_M.device)
        j[torch.arange(h), torch.arange(h) + h] = -1.0
        j[torch.arange(h) + h, torch.arange(h)] = 1.0
        cos, sin = self.cos.float(), self.sin.float()
        return torch.diag_embed(cos) + sin[:, :, None] * j

    def update_matrix(self) -> Tensor:
        """dW (out, in) in float32: D (M acting on the compressed input) P, built from its factors."""
        m, r, n = self.mora_M.float(), self.r_hat, self.chunks
        cols = self.in_index.view(n, r)  # chunk t, position j -> input column
        if self.mora_type == "sharing":
            # M C, with C[j, i] = number of p = j (mod r_hat) with p mod in = i: add M's columns into theirs
            mc = torch.zeros(r, self.in_features, dtype=torch.float32, device=m.device)
            mc.index_add_(1, cols.reshape(-1), m.repeat(1, n))
            return mc[self.out_index]
        blocks = m @ self.rotations()  # (n, r_hat, r_hat): M R_t
        full = torch.zeros(n, r, self.in_features, dtype=torch.float32, device=m.device)
        full.scatter_add_(2, cols[:, None, :].expand(n, r, r), blocks)  # block t reads the columns of chunk t
        return full.view(n * r, self.in_features)[self.out_index]

    def delta_weight(self, base: nn.Module) -> Tensor:
        dw = self.update_matrix()
        return dw.T if self.fan_in_fan_out else dw
