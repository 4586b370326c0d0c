"""LyCORIS-style structured weight deltas: LoHa (Hadamard product) and LoKr (Kronecker product).

Both are weight-level deltas, ``W' = W + dW``, whose dW is built from small factors each forward:

- **LoHa** (FedPara, Hyeon-Woo et al. 2022)::

      dW = s * (W1a W1b) ⊙ (W2a W2b),    W1a, W2a: (out, r),  W1b, W2b: (r, in),  s = alpha / r

  so a rank-r budget per factor reaches rank up to r² through the Hadamard product. One factor (W2b) is
  zero at init, so the adapted model starts as the base. On convolutions the factors act on the flattened
  (out, in * k) weight, or, with ``use_effective_conv2d`` (FedPara's Proposition 3, CP/Tucker form), each
  factor is ``T ×_1 A ×_2 B`` with a core T: (r, r, *k), A: (r, out), B: (r, in).
- **LoKr** (LyCORIS; Kronecker adapters, Edalati et al. 2022)::

      dW = s * W1 ⊗ W2,    W1: (a, c),  W2: (b, d),  out = a b,  in = c d,  s = alpha / r

  with (a, b) and (c, d) the factorizations of out and in of PEFT's ``factorization`` rule (the two
  divisors nearest to the square root, or ``decompose_factor``). W2 is itself low rank ``W2a W2b`` when
  ``r < max(b, d) / 2`` and W1 is low rank ``W1a W1b`` when ``decompose_both`` and ``r < max(a, c) / 2``.
  W1 is zero at init (PEFT's default; ``init_weights="lycoris"`` zeroes W2 instead).

Options shared by both: ``rank_dropout`` (training only: each output row of dW is dropped with that
probability), ``module_dropout`` (training only: the whole delta is skipped with that probability),
``rank_pattern``/``alpha_pattern`` (regex per module). Sites: ``nn.Linear``, GPT-2 ``Conv1D`` (weight
stored (in, out); PEFT itself cannot adapt it), ``nn.Conv1d``, ``nn.Conv2d``. Parameter names, shapes and
numerics are PEFT's (``hada_w1_a`` ... ``hada_t2``, ``lokr_w1`` ... ``lokr_t2``), so files cross both ways.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import check_patterns, pattern_value, site_shape
from ..core.registry import register
from ..core.targeting import is_linear

_CONV = (nn.Conv1d, nn.Conv2d)


def _kaiming(t: Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class _LycorisConfig(DeltaConfig):
    """Fields LoHa and LoKr share (PEFT's ``LycorisConfig`` names)."""

    peft_fields: ClassVar[dict[str, str]] = {
        "r": "r", "alpha": "alpha", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
        "use_effective_conv2d": "use_effective_conv2d", "rank_pattern": "rank_pattern",
        "alpha_pattern": "alpha_pattern", "init_weights": "init_weights"}

    r: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_patterns(self):
        check_patterns(self.rank_pattern, self.alpha_pattern)
        return self

    def rank(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling(self, path: str) -> float:
        return pattern_value(self.alpha_pattern, path, self.alpha) / self.rank(path)

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, _CONV)


class _StructuredDelta(Delta):
    """A delta whose dW is rebuilt from factors: ``y + conv_or_linear(x, dW)``; merge adds dW."""

    mergeable = True

    def __init__(self, base: nn.Module, path: str, scaling: float, rank_dropout: float, module_dropout: float,
                 rank_dropout_scale: bool):
        super().__init__()
        self.out_f, self.in_f, self.kernel = site_shape(base, path)
        self.conv = isinstance(base, _CONV)
        self.fan_in_fan_out = not self.conv and not isinstance(base, nn.Linear)  # GPT-2 Conv1D
        self.weight_shape = (self.out_f, self.in_f, *self.kernel)
        self.scaling = scaling
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.rank_dropout_scale = rank_dropout_scale

    def _product(self) -> Tensor:  # pragma: no cover - abstract
        """s * (the structured product), reshaped to (out, in, *kernel)."""
        raise NotImplementedError

    def _dw(self, rank_dropout: bool = False) -> Tensor:
        w = self._product()
        if rank_dropout:
            keep = (torch.rand(w.shape[0]) > self.rank_dropout).to(device=w.device, dtype=w.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean()
            w = w * keep.view(-1, *[1] * (w.dim() - 1))
        return w

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        if self.training and self.module_dropout > 0 and torch.rand(1).item() <= self.module_dropout:
            return y
        dw = self._dw(rank_dropout=self.training and self.rank_dropout > 0)
        xd = x if x.dtype == dw.dtype else x.to(dw.dtype)
        h = base._conv_forward(xd, dw, None) if self.conv else F.linear(xd, dw)
        return y + h.to(y.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        dw = self._dw()
        return dw.T if self.fan_in_fan_out else dw


def _cp(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker/CP rebuild of a conv weight: ``T ×_1 A^T ×_2 B^T``, T: (r, r, k1, k2), A: (r, out), B: (r, in)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


# -- LoHa ----------------------------------------------------------------------------------------
@register
class LoHaConfig(_LycorisConfig):
    """LoHa: ``dW = alpha/r * (W1a W1b) ⊙ (W2a W2b)``. ``init_weights=False`` gives a random (non-identity) start."""

    type: ClassVar[str] = "loha"
    tensor_roles: ClassVar[dict[str, str]] = {"hada_w1_a": "delta", "hada_w1_b": "factor", "hada_w2_a": "factor",
                                              "hada_w2_b": "factor"}
    peft_type: ClassVar[str] = "LOHA"

    init_weights: bool = True

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return LoHa(module, path, self.rank(path), self.scaling(path), self)

class LoHa(_StructuredDelta):
    """``y + x dW^T`` with ``dW = s (W1a W1b) ⊙ (W2a W2b)`` (FedPara).

    Linear / flattened conv: hada_w1_a, hada_w2_a (out, r); hada_w1_b, hada_w2_b (r, in * prod(kernel)).
    Effective conv (kernel > 1): hada_t1, hada_t2 (r, r, k1, k2 or 1); hada_w*_a (r, out); hada_w*_b (r, in);
    each factor is the CP rebuild ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)``.
    Init (PEFT's): Kaiming-uniform everywhere except hada_w2_b = 0, so dW = 0.
    """

    def __init__(self, base: nn.Module, path: str, r: int, scaling: float, cfg: LoHaConfig):
        super().__init__(base, path, scaling, cfg.rank_dropout, cfg.module_dropout, rank_dropout_scale=True)
        k = self.kernel
        effective = cfg.use_effective_conv2d and self.conv and math.prod(k) != 1
        if effective:
            core = (r, r, *k) if len(k) == 2 else (r, r, k[0], 1)
            self.hada_t1 = nn.Parameter(torch.empty(core))
            self.hada_t2 = nn.Parameter(torch.empty(core))
            a, b = (r, self.out_f), (r, self.in_f)
        else:
            self.hada_t1 = self.hada_t2 = None
            a, b = (self.out_f, r), (r, self.in_f * math.prod(k))
        self.hada_w1_a = nn.Parameter(torch.empty(a))
        self.hada_w1_b = nn.Parameter(torch.empty(b))
        self.hada_w2_a = nn.Parameter(torch.empty(a))
        self.hada_w2_b = nn.Parameter(torch.empty(b))
        with torch.no_grad():
            for p in self.parameters():
                _kaiming(p)
            if cfg.init_weights:
                nn.init.zeros_(self.hada_w2_b)

    def _product(self) -> Tensor:
        s = torch.tensor(self.scaling)
        if self.hada_t1 is not None:
            w = _cp(self.hada_t1, self.hada_w1_a, self.hada_w1_b) * _cp(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            w = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (w * s.to(w.dtype)).reshape(self.weight_shape)


# -- LoKr ----------------------------------------------------------------------------------------
def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m * n = dimension: PEFT's (and LyCORIS') rule.

    ``factor > 0`` dividing ``dimension`` gives (factor, dimension / factor). Otherwise m walks up the
    divisors of ``dimension`` while m < n and m <= factor (``-1``: no bound, so the pair nearest the square
    root). The result is ordered so that m <= n."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt > bound:
            break
        m, n = nxt, dimension // nxt
    return (n, m) if m > n else (m, n)


@register
class LoKrConfig(_LycorisConfig):
    """LoKr: ``dW = alpha/r * W1 ⊗ W2``; ``decompose_both`` makes W1 low rank too; ``decompose_factor`` sets
    the Kronecker split (-1: nearest the square root). ``init_weights``: True (W1 = 0), "lycoris" (W2 = 0),
    False (random, non-identity)."""

    type: ClassVar[str] = "lokr"
    tensor_roles: ClassVar[dict[str, str]] = {"lokr_w1": "delta", "lokr_w1_a": "delta", "lokr_w1_b": "factor",
                                              "lokr_w2": "factor", "lokr_w2_a": "factor", "lokr_w2_b": "factor"}
    peft_type: ClassVar[str] = "LOKR"
    peft_fields: ClassVar[dict[str, str]] = {
        **_LycorisConfig.peft_fields, "decompose_both": "decompose_both", "decompose_factor": "decompose_factor",
        "rank_dropout_scale": "rank_dropout_scale"}

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | Literal["lycoris"] = True

    @model_validator(mode="after")
    def _check_factor(self) -> LoKrConfig:
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 (automatic) or a positive integer, got {self.decompose_factor}")
        return self

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return LoKr(module, path, self.rank(path), self.scaling(path), self)

class LoKr(_StructuredDelta):
    """``y + x dW^T`` with ``dW = s * W1 ⊗ W2`` (reshaped to the weight's shape), out = a b, in = c d.

    lokr_w1 (a, c), or lokr_w1_a (a, r) and lokr_w1_b (r, c) with ``decompose_both`` and r < max(a, c)/2.
    lokr_w2 (b, d, *kernel) when r >= max(b, d)/2; else lokr_w2_a (b, r), lokr_w2_b (r, d * prod(kernel));
    or, effective conv, lokr_t2 (r, r, k1, k2 or 1), lokr_w2_a (r, b), lokr_w2_b (r, d).
    Init (PEFT's default): W1 = 0 (W1a = 0), the rest Kaiming-uniform, so dW = 0.
    """

    def __init__(self, base: nn.Module, path: str, r: int, scaling: float, cfg: LoKrConfig):
        super().__init__(base, path, scaling, cfg.rank_dropout, cfg.module_dropout, cfg.rank_dropout_scale)
        k = self.kernel
        a, b = factorization(self.out_f, cfg.decompose_factor)
        c, d = factorization(self.in_f, cfg.decompose_factor)
        self.factors = ((a, b), (c, d))
        use_w1 = not (cfg.decompose_both and r < max(a, c) / 2)
        use_w2 = r >= max(b, d) / 2
        effective = cfg.use_effective_conv2d and self.conv and math.prod(k) != 1
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = None
        self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = self.lokr_t2 = None
        if use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
        if use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *k))
        elif effective:
            self.lokr_t2 = nn.Parameter(torch.empty((r, r, *k) if len(k) == 2 else (r, r, k[0], 1)))
            self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(k)))
        with torch.no_grad():
            for p in self.parameters():
                _kaiming(p)
            if cfg.init_weights == "lycoris":
                nn.init.zeros_(self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_b)
            elif cfg.init_weights:
                nn.init.zeros_(self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a)

    def _product(self) -> Tensor:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2
        elif self.lokr_t2 is not None:
            w2 = _cp(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # exactly PEFT's product; for a Conv1d with a full W2 (b, d, k) torch.kron broadcasts W1 as (1, a, c)
        # and the reshape below interleaves the factors: that is the layout PEFT's files hold
        return (torch.kron(w1, w2.contiguous()) * self.scaling).reshape(self.weight_shape)
