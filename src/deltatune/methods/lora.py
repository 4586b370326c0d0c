"""LoRA and its family: rsLoRA, DoRA, PiSSA init, LoRA-FA (frozen A).

    y = W x + s * B A dropout(x),    A: (r, in), B: (out, r),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

B = 0 at init (Hu et al. 2021), A Kaiming-uniform as in the reference implementation, so the adapted
model starts exactly as the base. Options:

- DoRA (Liu et al. 2024): ``W' = m * (W + s B A) / ||W + s B A||`` with the norm taken per output
  row and treated as a constant in backward; ``m`` is initialised to ``||W||`` so the start is exact.
  Computed on activations as ``y + (m/n - 1) (W x) + (m/n) s B A x``.
- PiSSA (Meng et al. 2024): A, B start from the principal singular vectors of W,
  ``s B0 A0 = U_r S_r V_r^T``. Instead of rewriting the base weight to its residual, the delta keeps
  frozen copies B0, A0 and computes ``s (B A - B0 A0) x``: the same function and gradients, while the base
  stays untouched (so ``disabled()``, several adapters and merging keep working). It saves as a plain
  rank-2r LoRA ``[B, -B0] [A; A0]`` relative to the original base, exactly as PEFT converts PiSSA.
- ``freeze_a``: only B trains (LoRA-FA; asymmetric LoRA).
- ``init="random"``: B random too: a non-identity start, for tests.

Sites: ``nn.Linear``, GPT-2 ``Conv1D`` (weight stored (in, out)), ``nn.Conv1d/2d/3d``, ``nn.Embedding``.
Parameter names follow the PEFT format (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``,
``lora_embedding_A``, ``lora_embedding_B``), so the state dict is the file.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import check_patterns, out_in, pattern_value
from ..core.registry import register
from ..core.targeting import is_linear

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register
class LoRAConfig(DeltaConfig):
    """LoRA family. ``r`` rank, ``alpha`` scale numerator, ``rank_pattern``/``alpha_pattern`` per module (regex)."""

    type: ClassVar[str] = "lora"
    tensor_roles: ClassVar[dict[str, str]] = {"lora_A.weight": "factor", "lora_B.weight": "delta",
                                              "lora_embedding_A": "factor", "lora_embedding_B": "delta"}
    low_rank_pairs: ClassVar[tuple[tuple[str, str], ...]] = (("lora_A.weight", "lora_B.weight"),
                                                             ("lora_embedding_A", "lora_embedding_B"))
    factorised: ClassVar[bool] = True
    combine_loose: ClassVar[frozenset[str]] = frozenset({"r", "alpha", "rank_pattern", "alpha_pattern", "use_rslora",
                                                         "freeze_a"})
    peft_type: ClassVar[str] = "LORA"
    peft_fields: ClassVar[dict[str, str]] = {
        "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora", "use_dora": "use_dora",
        "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}
    peft_constants: ClassVar[dict[str, Any]] = {"fan_in_fan_out": False, "bias": "none", "init_lora_weights": True}

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["gaussian", "pissa", "random"] = "gaussian"
    freeze_a: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        check_patterns(self.rank_pattern, self.alpha_pattern)
        return self

    def rank(self, path: str) -> int:
        return pattern_value(self.rank_pattern, path, self.r)

    def scaling(self, path: str) -> float:
        r, alpha = self.rank(path), pattern_value(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, (*_CONV, nn.Embedding))

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if isinstance(module, nn.Embedding):
            if self.use_dora or self.init == "pissa":
                raise ValueError(f"{path}: DoRA and PiSSA are not supported on embeddings (use plain LoRA there)")
            return LoRAEmbedding(module, self.rank(path), self.scaling(path), self.init, self.freeze_a)
        if isinstance(module, _CONV) and module.groups != 1:
            raise ValueError(f"{path}: LoRA on grouped convolutions (groups={module.groups}) is not supported")
        if self.init == "pissa" and isinstance(module, _CONV):
            raise ValueError(f"{path}: PiSSA init needs a linear layer, got {type(module).__name__}")
        return LoRA(module, self.rank(path), self.scaling(path), self.dropout, self.init, self.use_dora, self.freeze_a)

    # -- PEFT format ---------------------------------------------------------------------------
    def saved_config(self) -> LoRAConfig:
        if self.init != "pissa":
            return self
        # saved as rank-2r plain LoRA [B, -B0][A; A0]; keep each module's scale s = alpha / r unchanged
        f = math.sqrt(2) if self.use_rslora else 2.0
        return self.model_copy(update={
            "init": "gaussian", "r": 2 * self.r, "alpha": f * self.alpha,
            "rank_pattern": {k: 2 * v for k, v in self.rank_pattern.items()},
            "alpha_pattern": {k: f * v for k, v in self.alpha_pattern.items()},
        })

    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("lora_bias"):
            raise ValueError("LoRA with lora_bias=True is not supported")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith("pissa"):
            warnings.warn("this PiSSA adapter was saved without conversion: it expects the residual base weights "
                          "PEFT wrote at training time, not the original model", stacklevel=2)
        return {"r": d["r"], "alpha": d.get("lora_alpha", d["r"])}  # PEFT's alpha defaults to r


@register
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al. 2024) under its own registry name: ``dt.config("dora")`` is LoRA with ``use_dora=True``.

    Saved in the PEFT format as a LoRA with ``use_dora: true``; PEFT-format LoRA files read back as
    :class:`LoRAConfig` (this class does not claim PEFT's ``LORA`` type).
    """

    type: ClassVar[str] = "dora"
    peft_type: ClassVar[str | None] = None
    peft_saved_as: ClassVar[str | None] = "LORA"
    use_dora: bool = True


class LoRA(Delta):
    """``y + s * B(A(dropout(x)))`` on a linear or convolutional site (DoRA, PiSSA options; see module doc).

    Shapes: A (r, in[, k...]), B (out, r[, 1...]); for convolutions A carries the kernel, B is 1x1.
    """

    mergeable = True

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, init: str = "gaussian",
                 use_dora: bool = False, freeze_a: bool = False):
        super().__init__()
        out_f, in_f = out_in(base)
        self.scaling = scaling
        self.conv = isinstance(base, _CONV)
        self.fan_in_fan_out = not self.conv and not isinstance(base, nn.Linear)  # GPT-2 Conv1D
        if self.conv:
            conv = type(base)
            self.lora_A = conv(in_f, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
                               padding_mode=base.padding_mode)
            self.lora_B = conv(r, out_f, 1, bias=False)
        else:
            self.lora_A = nn.Linear(in_f, r, bias=False)
            self.lora_B = nn.Linear(r, out_f, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.frozen = ("lora_A.weight",) if freeze_a else ()
        self.pissa = init == "pissa"
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)
            if self.pissa:
                self._init_pissa(base, r)
        if use_dora:
            dw = self._dw()  # the base weight moves to dw's device: on the meta device nothing is computed
            self.lora_magnitude_vector = nn.Parameter(self._norm(self._weight(base).to(dw.device), dw).to(torch.float32))
        else:
            self.lora_magnitude_vector = None

    def _init_pissa(self, base: nn.Module, r: int) -> None:
        w = self._weight(base).to(torch.float32)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sr = (s[:r] / self.scaling).sqrt()
        self.lora_A.weight.copy_(sr[:, None] * vh[:r])
        self.lora_B.weight.copy_(u[:, :r] * sr[None, :])
        self.register_buffer("pissa_A0", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("pissa_B0", self.lora_B.weight.detach().clone(), persistent=False)

    @property
    def additive(self) -> bool:
        return self.lora_magnitude_vector is None  # DoRA renormalises the whole weight

    # weights as (out, in[, k...]) regardless of how the base stores them
    def _weight(self, base: nn.Module) -> Tensor:
        return base.weight.T if self.fan_in_fan_out else base.weight

    def _dw(self) -> Tensor:
        """s * B A in float32, shaped like the (out, in[, k...]) weight."""
        a, b = self.lora_A.weight, self.lora_B.weight
        dw = b.flatten(1).float() @ a.flatten(1).float()
        if self.pissa:
            dw = dw - self.pissa_B0.flatten(1).float() @ self.pissa_A0.flatten(1).float()
        return (dw * self.scaling).view(b.shape[0], *a.shape[1:])

    @staticmethod
    def _norm(w: Tensor, dw: Tensor) -> Tensor:
        """Per-output-channel norm of W + dW (DoRA), float32, shape (out,)."""
        return (w.float() + dw).flatten(1).norm(dim=1)

    def _channels(self, v: Tensor, y: Tensor) -> Tensor:
        """Broadcast a per-output-channel vector against an output y (channel dim -1, or 1 for convs)."""
        return v.view(-1, *([1] * (y.dim() - 2))) if self.conv else v

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.lora_A.weight.dtype
        xd = x if x.dtype == dt else x.to(dt)
        if self.dropout is not None:
            xd = self.dropout(xd)
        if not (self.conv or self.pissa or self.lora_magnitude_vector is not None) and y.dtype == dt:
            return self._fused(xd, y)
        h = self.lora_B(self.lora_A(xd))
        if self.pissa:
            h = h - F.linear(F.linear(xd, self.pissa_A0), self.pissa_B0)
        if self.lora_magnitude_vector is None:
            return torch.add(y, h.to(y.dtype), alpha=self.scaling)
        return self._dora(xd, y, h, base)

    def _fused(self, xd: Tensor, y: Tensor) -> Tensor:
        """``y + s B (A x)`` with the add fused into the second GEMM (one kernel, no temporary).

        In inference the Site's fresh output ``y`` is accumulated in place; under autograd out of place.
        """
        h = F.linear(xd, self.lora_A.weight).reshape(-1, self.lora_A.weight.shape[0])  # (tokens, r)
        bt = self.lora_B.weight.t()  # (r, out)
        if not torch.is_grad_enabled() and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(h, bt, alpha=self.scaling)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, bt, alpha=self.scaling).view(y.shape)

    def _dora(self, xd: Tensor, y: Tensor, h: Tensor, base: nn.Module) -> Tensor:
        w = self._weight(base)
        scale = self.lora_magnitude_vector / self._norm(w.detach(), self._dw().detach())  # norm: no gradient
        bias = getattr(base, "bias", None)
        if self.dropout is not None and self.training:
            wx = base._conv_forward(xd.to(w.dtype), base.weight, None) if self.conv else F.linear(xd.to(w.dtype), w)
        else:
            wx = y if bias is None else y - (self._channels(bias, y) if self.conv else bias)
        scale = self._channels(scale, y)
        out = (scale - 1) * wx.to(scale.dtype) + scale * (h * self.scaling)
        return y + out.to(y.dtype)

    # -- per-row routing -----------------------------------------------------------------------
    @property
    def route_group(self) -> tuple | None:
        """Plain LoRA (linear or Conv1D; not DoRA, PiSSA, a conv, dropout in training) batches with its kind.

        A subclass with its own forward routes alone unless it says otherwise.
        """
        if (self.conv or self.pissa or self.lora_magnitude_vector is not None or (self.dropout and self.training)
                or type(self).forward is not LoRA.forward):
            return None
        w = self.lora_A.weight
        return w.dtype, w.device

    @classmethod
    def router(cls, rows: list[Delta | None]) -> LoRARouter:
        return LoRARouter(rows)

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> Tensor:
        dw = self._dw()
        return dw.T if self.fan_in_fan_out else dw

    def merged_weight(self, base: nn.Module) -> Tensor:
        if self.lora_magnitude_vector is None:
            return super().merged_weight(base)
        w = self._weight(base).float()
        dw = self._dw()
        new = self._dora_scale(w, dw) * (w + dw)
        return (new.T if self.fan_in_fan_out else new).to(base.weight.dtype)

    def _dora_scale(self, w: Tensor, dw: Tensor) -> Tensor:
        return (self.lora_magnitude_vector.float() / self._norm(w, dw)).view(-1, *([1] * (w.dim() - 1)))

    def merge_into(self, base: nn.Module) -> None:
        if self.lora_magnitude_vector is not None:
            w = self._weight(base).float()
            self._merge_scale = self._dora_scale(w, self._dw())  # kept to invert exactly
        base.weight.data.copy_(self.merged_weight(base))

    def unmerge_from(self, base: nn.Module) -> None:
        if self.lora_magnitude_vector is None:
            return super().unmerge_from(base)
        w = self._weight(base).float() / self._merge_scale - self._dw()
        base.weight.data.copy_((w.T if self.fan_in_fan_out else w).to(base.weight.dtype))
        del self._merge_scale

    # -- file format ---------------------------------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        state = super().export_state()
        if self.pissa:  # relative to the original base: [B, -B0] [A; A0]
            state["lora_A.weight"] = torch.cat([self.lora_A.weight, self.pissa_A0]).detach()
            state["lora_B.weight"] = torch.cat([self.lora_B.weight, -self.pissa_B0], dim=1).detach()
        return state


class LoRARouter:
    """A different plain LoRA on each row of a mixed batch, in one pass (the gather of S-LoRA / Punica):

        y[i] += s_i * B_i (A_i x[i])        x[i]: (tokens, in), A_i: (r, in), B_i: (out, r)

    as two batched GEMMs over per-row factors stacked when called (A: (b, r, in), B: (b, out, r)), so the
    cost follows the batch, not the number of distinct adapters in it. Ranks below the batch's largest are
    zero-padded; rows without an adapter get zero factors (their output stays exactly the base's). When one
    adapter serves every row, that adapter's own forward runs instead.
    """

    def __init__(self, rows: list[Delta | None]):
        factors = {id(d): (d.lora_A.weight, d.lora_B.weight, d.scaling) for d in rows if d is not None}
        self.only = rows[0] if len(factors) == 1 and rows[0] is not None and rows.count(rows[0]) == len(rows) else None
        if self.only is not None:
            return
        ranks = {a.shape[0] for a, _, _ in factors.values()}
        self.rank = max(ranks)
        self.padded = len(ranks) > 1
        scales = {s for _, _, s in factors.values()}
        self.alpha = scales.pop() if len(scales) == 1 else 1.0
        a, b, _ = next(iter(factors.values()))
        if None in rows:  # zero factors: the row's output stays exactly the base's
            factors[id(None)] = (a.new_zeros(self.rank, a.shape[1]), b.new_zeros(b.shape[0], self.rank), 0.0)
        per_row = [factors[id(d)] for d in rows]
        # the parameters themselves, read when called (in-place updates show)
        self.a = [f[0] for f in per_row]
        self.b = [f[1] for f in per_row]
        self.scale = None if not scales else torch.tensor([f[2] for f in per_row], dtype=a.dtype,
                                                          device=a.device).view(-1, 1, 1)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """Stacked per-row A (b, r, in) and B (b, out, r)."""
        if not self.padded:
            return torch.stack(self.a), torch.stack(self.b)
        r = self.rank
        return (torch.stack([F.pad(t, (0, 0, 0, r - t.shape[0])) for t in self.a]),
                torch.stack([F.pad(t, (0, r - t.shape[1])) for t in self.b]))

    def __call__(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        if self.only is not None:
            return self.only(x, y, base)
        a, b = self._factors()
        n = x.shape[0]
        xd = x.reshape(n, -1, x.shape[-1])
        h = torch.bmm(xd if xd.dtype == a.dtype else xd.to(a.dtype), a.mT)  # (b, tokens, r)
        if self.scale is not None:
            h = h * self.scale
        if y.dtype != a.dtype:
            return y + (torch.bmm(h, b.mT) * self.alpha).view(y.shape).to(y.dtype)
        if not torch.is_grad_enabled() and y.is_contiguous():
            y.view(n, -1, y.shape[-1]).baddbmm_(h, b.mT, alpha=self.alpha)
            return y
        return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), h, b.mT, alpha=self.alpha).view(y.shape)


class LoRAEmbedding(Delta):
    """LoRA on an embedding: ``y + s * embed(ids, A^T) B^T``; A (r, num_embeddings) = 0, B (dim, r) random."""

    mergeable = True

    def __init__(self, base: nn.Embedding, r: int, scaling: float, init: str = "gaussian", freeze_a: bool = False):
        super().__init__()
        self.scaling = scaling
        self.frozen = ("lora_embedding_A",) if freeze_a else ()
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r))
        if init == "random":
            nn.init.normal_(self.lora_embedding_A, std=0.1)

    def forward(self, x: Tensor, y: Tensor, base: nn.Embedding) -> Tensor:
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
        return torch.add(y, (after_a @ self.lora_embedding_B.T).to(y.dtype), alpha=self.scaling)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling
