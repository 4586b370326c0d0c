"""Bottleneck adapters: Houlsby, Pfeiffer, parallel (scaled, He et al. 2022), Compacter.

A bottleneck adapter is a small two-layer MLP, ``f(h) = up(act(down(h)))`` with ``down: d -> r`` and
``up: r -> d``, ``r = d // reduction_factor`` (at least 1) unless ``bottleneck_size`` is given. It is
non-linear, so it is never merged into the weights. Names and defaults follow AdapterHub's ``adapters``
library (``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``, ``CompacterPlusPlusConfig``); there is no
PEFT format for these methods, so adapters save in deltatune's own section (parameters
``adapter_down.*`` / ``adapter_up.*`` under the adapted module's path).

- ``adapter_houlsby`` (Houlsby et al. 2019): sequential ``h <- h + s * f(h)`` on the output of the
  attention output projection AND of the FFN output projection, before the residual add and LayerNorm
  (Llama ``o_proj``/``down_proj``, GPT-2 ``attn.c_proj``/``mlp.c_proj``, BERT ``attention.output.dense``/
  ``output.dense``). Default non-linearity ``swish`` (AdapterHub's ``DoubleSeqBnConfig``).
- ``adapter_pfeiffer`` (Pfeiffer et al. 2021): the same after the FFN only; default ``relu``.
- ``adapter_parallel`` (He et al. 2022; AdaptFormer): ``FFN(x) + s * f(x)`` with ``x`` the FFN's INPUT,
  ``s = 4`` and ``r = d // 2`` by default (AdapterHub's ``ParBnConfig``). Sites: Llama and GPT-2 ``mlp``
  (the whole FFN module: its input is x, its output FFN(x)). BERT splits its FFN in two modules,
  ``intermediate`` (x -> act(x W1)) and ``output`` (which adds the residual and applies LayerNorm itself),
  so the adapter is split the same way: ``down`` (and the activation) sits on ``intermediate`` and
  records ``act(down(x))`` for this forward, ``up`` sits on ``output.dense`` and adds ``s * up(.)`` to
  the FFN output, before ``output`` adds the residual and normalises:
  ``LN(dropout(W2 h) + s * f(x) + x)``: exactly He et al.'s parallel adapter (dropout in eval, as the
  paper places the branch next to the whole FFN). Any other module (e.g. an ``nn.Linear``) can be
  targeted too: the branch then runs from its input to its output.
- ``compacter`` (Karimi Mahabadi et al. 2021, Compacter++ placement: after the FFN only, like Pfeiffer):
  ``down`` and ``up`` are PHM layers ``W = sum_i A_i kron B_i`` (``n = phm_dim`` terms, ``A_i``: (n, n)
  "slow" weights, ``B_i = s_i t_i^T`` of rank ``phm_rank``); see :class:`PHMLinear`. DEVIATION: the
  paper shares the ``A_i`` across all layers; here every adapter layer has its own ``A_i`` (n^3 extra
  parameters per PHM layer, 64 for n = 4), which keeps each site's delta self-contained.

Init: ``down`` Kaiming-uniform, ``up`` zero, biases zero (AdapterHub's ``"mam"`` init), so the adapted
model starts exactly as the base; ``init="random"`` makes ``up`` random too (tests).
Deviations, documented: Houlsby's paper also trains the LayerNorms (use ``modules_to_save`` for that);
AdapterHub's ``SeqBnConfig`` (``original_ln_before=True``) places Pfeiffer's adapter after the block's
own residual + LayerNorm on post-LN models; here it sits at the FFN output on every architecture,
as in the papers' figures; and on BERT/GPT-2 the sequential adapter applies before the output dropout.
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
from ..core.modules import out_in
from ..core.registry import register
from ..core.targeting import is_linear

Activation = Literal["relu", "gelu", "swish", "silu", "tanh"]
_ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}

# attention output projections and FFN output projections of common architectures (full-match regexes)
_ATTN_OUT = r"o_proj|attn\.c_proj|attention\.output\.dense|out_proj"
_FFN_OUT = r"down_proj|mlp\.c_proj|layer\.\d+\.output\.dense|fc2|dense_4h_to_h"


def _block_io(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a block: its first linear layer's input, its last linear layer's output."""
    if is_linear(module):
        return out_in(module)[::-1]
    lins = [m for m in module.modules() if is_linear(m)]
    if not lins:
        return None
    return out_in(lins[0])[1], out_in(lins[-1])[0]


class _BottleneckConfig(DeltaConfig):
    """Options shared by every bottleneck adapter.

    reduction_factor: ``r = d // reduction_factor`` (at least 1); bottleneck_size: ``r`` itself (wins).
    non_linearity: ``relu``, ``gelu``, ``swish`` (= ``silu``) or ``tanh``. scaling: ``s`` in ``h + s f(h)``.
    ln_before: a trainable LayerNorm on the adapter's input, ``f(h) = up(act(down(LN(h))))`` (AdapterHub's
        ``ln_before``, parameters ``adapter_norm_before.*``); useful where the site's output is small (e.g.
        randomly initialised models). Sequential adapters and Compacter only.
    init: ``"identity"`` (up = 0) or ``"random"`` (tests).
    """

    default_targets: ClassVar[str] = rf"(?:.*\.)?(?:{_ATTN_OUT}|{_FFN_OUT})"
    tensor_roles: ClassVar[dict[str, str]] = {  # the up-projection carries the sign (Zhang et al. 2023)
        "adapter_up.weight": "delta", "adapter_up.bias": "delta", "adapter_up.W_right": "delta",
        "adapter_up.W_left": "factor", "adapter_up.phm_rule": "factor", "adapter_down.*": "factor"}
    reduction_factor: float = Field(16.0, gt=0)
    bottleneck_size: int | None = Field(None, gt=0)
    non_linearity: Activation = "swish"
    scaling: float = 1.0
    ln_before: bool = False
    init: Literal["identity", "random"] = "identity"

    def bottleneck(self, dim: int) -> int:
        return self.bottleneck_size or max(1, int(dim // self.reduction_factor))

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)


def _linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o)


def _init(down: nn.Module, up: nn.Module, init: str) -> None:
    with torch.no_grad():
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        if init == "random":
            nn.init.kaiming_uniform_(up.weight, a=math.sqrt(5))
            nn.init.normal_(up.bias, std=0.1)
        else:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)


class Bottleneck(Delta):
    """Sequential bottleneck adapter on a site's output ``y`` (d features)::

        y' = y + s * up(act(down(y)))      down: Linear(d, r) (weight (r, d)), up: Linear(r, d) (weight (d, r))

    Not mergeable (non-linear) and not additive: a second adapter at the same site sees ``y'``.
    """

    def __init__(self, dim: int, r: int, act: str, scaling: float, init: str, ln_before: bool = False):
        super().__init__()
        self.adapter_norm_before = nn.LayerNorm(dim) if ln_before else None
        self.adapter_down = _linear(dim, r)
        self.adapter_up = _linear(r, dim)
        self.act = act
        self.scaling = scaling
        _init(self.adapter_down, self.adapter_up, init)

    @property
    def additive(self) -> bool:
        return False

    def branch(self, h: Tensor) -> Tensor:
        dt = self.adapter_down.weight.dtype
        h = h if h.dtype == dt else h.to(dt)
        if self.adapter_norm_before is not None:
            h = self.adapter_norm_before(h)
        return self.adapter_up(_ACT[self.act](self.adapter_down(h)))

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        return y + (self.branch(y) * self.scaling).to(y.dtype)


class HoulsbyAdapter(Bottleneck):
    """Houlsby et al. 2019: :class:`Bottleneck` after the attention output and after the FFN output."""


class PfeifferAdapter(Bottleneck):
    """Pfeiffer et al. 2021: :class:`Bottleneck` after the FFN output only."""


@register
class HoulsbyConfig(_BottleneckConfig):
    """Houlsby adapter: a sequential bottleneck after each attention output and each FFN output projection."""

    type: ClassVar[str] = "adapter_houlsby"

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        d = out_in(module)[0]
        return HoulsbyAdapter(d, self.bottleneck(d), self.non_linearity, self.scaling, self.init, self.ln_before)


@register
class PfeifferConfig(_BottleneckConfig):
    """Pfeiffer adapter: a sequential bottleneck after each FFN output projection."""

    type: ClassVar[str] = "adapter_pfeiffer"
    default_targets: ClassVar[str] = rf"(?:.*\.)?(?:{_FFN_OUT})"
    non_linearity: Activation = "relu"

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        d = out_in(module)[0]
        return PfeifferAdapter(d, self.bottleneck(d), self.non_linearity, self.scaling, self.init, self.ln_before)


# -- parallel --------------------------------------------------------------------------------------
class ParallelAdapter(Delta):
    """Scaled parallel adapter (He et al. 2022) around a module ``F`` (the FFN): x its input (d_in)::

        y' = F(x) + s * up(act(down(x)))   down: Linear(d_in, r), up: Linear(r, d_out), s = scaling

    Depends on the site input only, so two parallel adapters add their effects. Not mergeable.
    """

    def __init__(self, d_in: int, d_out: int, r: int, act: str, scaling: float, init: str):
        super().__init__()
        self.adapter_down = _linear(d_in, r)
        self.adapter_up = _linear(r, d_out)
        self.act = act
        self.scaling = scaling
        _init(self.adapter_down, self.adapter_up, init)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.adapter_down.weight.dtype
        h = self.adapter_up(_ACT[self.act](self.adapter_down(x if x.dtype == dt else x.to(dt))))
        return y + (h * self.scaling).to(y.dtype)


class _Link:
    """What the down half of a split parallel adapter hands to its up half within one forward."""

    def __init__(self) -> None:
        self.z: Tensor | None = None


class ParallelAdapterDown(Delta):
    """The first half of a parallel adapter split over BERT's FFN, on ``intermediate`` (input x: d).

    Records ``z = act(down(x))`` (down: Linear(d, r)) for :class:`ParallelAdapterUp`; its own output is
    the site's unchanged.
    """

    def __init__(self, d_in: int, r: int, act: str, link: _Link, partner: str):
        super().__init__()
        self.adapter_down = _linear(d_in, r)
        self.act = act
        self.link = link
        self.partner_path = partner

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.adapter_down.weight.dtype
        self.link.z = _ACT[self.act](self.adapter_down(x if x.dtype == dt else x.to(dt)))
        return y


class ParallelAdapterUp(Delta):
    """The second half, on ``output.dense`` (output: d): ``y' = y + s * up(z)``, up: Linear(r, d)."""

    def __init__(self, r: int, d_out: int, scaling: float, link: _Link, partner: str):
        super().__init__()
        self.adapter_up = _linear(r, d_out)
        self.scaling = scaling
        self.link = link
        self.partner_path = partner

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        z, self.link.z = self.link.z, None
        if z is None or z.shape[:-1] != y.shape[:-1]:
            raise RuntimeError(f"parallel adapter: {self.partner_path!r} did not run before this module in this "
                               f"forward, so the FFN input is unknown")
        return y + (self.adapter_up(z) * self.scaling).to(y.dtype)


def _split_pair(path: str, module: nn.Module) -> str | None:
    """For BERT-style FFN halves, the path of the ``output.dense`` that goes with an ``intermediate``."""
    if type(module).__name__.endswith("Intermediate") and path.rsplit(".", 1)[-1] == "intermediate":
        return path[: -len("intermediate")] + "output.dense"
    return None


@register
class ParallelConfig(_BottleneckConfig):
    """Scaled parallel adapter next to each FFN (Llama/GPT-2 ``mlp``; BERT ``intermediate`` + ``output.dense``)."""

    type: ClassVar[str] = "adapter_parallel"
    default_targets: ClassVar[str] = r"(?:.*\.)?(?:mlp|intermediate|layer\.\d+\.output\.dense)"
    reduction_factor: float = Field(2.0, gt=0)
    non_linearity: Activation = "relu"
    scaling: float = 4.0

    @model_validator(mode="after")
    def _no_ln(self) -> ParallelConfig:
        if self.ln_before:
            raise ValueError("ln_before is not available for adapter_parallel (its input is the FFN's, already normalised)")
        return self

    def supports(self, module: nn.Module) -> bool:
        return _block_io(module) is not None

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return self.make_deltas({path: module})[path]

    def make_deltas(self, modules: dict[str, nn.Module]) -> dict[str, Delta]:
        """All deltas of one adapter at once: BERT's FFN halves are built as linked pairs."""
        pairs = {p: q for p, m in modules.items() if (q := _split_pair(p, m)) is not None}
        for p, q in pairs.items():
            if q not in modules:
                raise ValueError(f"{p}: a parallel adapter on a split FFN needs {q!r} (the FFN output) selected "
                                 f"too; add it to targets or target the whole FFN block")
        out: dict[str, Delta] = {}
        for p, m in modules.items():
            if p in pairs:
                q = pairs[p]
                d_in, _ = _block_io(m)
                d_out = out_in(modules[q])[0]
                r = self.bottleneck(d_in)
                link = _Link()
                down = ParallelAdapterDown(d_in, r, self.non_linearity, link, q)
                up = ParallelAdapterUp(r, d_out, self.scaling, link, p)
                _init(down.adapter_down, up.adapter_up, self.init)
                out[p], out[q] = down, up
        for p, m in modules.items():
            if p in out:
                continue
            d_in, d_out = _block_io(m)
            out[p] = ParallelAdapter(d_in, d_out, self.bottleneck(d_in), self.non_linearity, self.scaling, self.init)
        return {p: out[p] for p in modules}


# -- compacter -------------------------------------------------------------------------------------
class PHMLinear(nn.Module):
    """Parameterized hypercomplex multiplication layer (Zhang et al. 2021; Compacter's low-rank form)::

        W = sum_{i=1..n} A_i kron (W_left_i @ W_right_i),   y = x W + b
        phm_rule A: (n, n, n), W_left: (n, d_in/n, k), W_right: (n, k, d_out/n), W: (d_in, d_out), b: (d_out,)
    """

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, init_range: float, zero: bool):
        super().__init__()
        self.n = n
        self.phm_rule = nn.Parameter(torch.empty(n, n, n))
        self.W_left = nn.Parameter(torch.empty(n, d_in // n, rank))
        self.W_right = nn.Parameter(torch.empty(n, rank, d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        with torch.no_grad():
            nn.init.normal_(self.phm_rule, std=init_range)
            for w in (self.W_left, self.W_right):
                bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))  # Glorot-uniform per factor
                nn.init.uniform_(w, -bound, bound)
            if zero:
                nn.init.zeros_(self.W_right)

    def weight(self) -> Tensor:
        b = self.W_left @ self.W_right  # (n, d_in/n, d_out/n)
        n, p, q = b.shape
        w = self.phm_rule[:, :, None, :, None] * b[:, None, :, None, :]  # (n, n, p, n, q): A_i[a, c] B_i[b, d]
        return w.sum(0).reshape(n * p, n * q)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight()).view(*x.shape[:-1], -1)


class Compacter(Delta):
    """Compacter: a sequential bottleneck with PHM projections, on a site's output ``y`` (d features)::

        y' = y + s * up(act(down(y)))      down: PHMLinear(d, r), up: PHMLinear(r, d) (W_right = 0 at init)
    """

    def __init__(self, dim: int, r: int, cfg: CompacterConfig):
        super().__init__()
        n, k = cfg.phm_dim, cfg.phm_rank
        self.adapter_norm_before = nn.LayerNorm(dim) if cfg.ln_before else None
        self.adapter_down = PHMLinear(dim, r, n, k, cfg.phm_init_range, zero=False)
        self.adapter_up = PHMLinear(r, dim, n, k, cfg.phm_init_range, zero=cfg.init != "random")
        self.act = cfg.non_linearity
        self.scaling = cfg.scaling

    @property
    def additive(self) -> bool:
        return False

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.adapter_up.bias.dtype
        h = y if y.dtype == dt else y.to(dt)
        if self.adapter_norm_before is not None:
            h = self.adapter_norm_before(h)
        h = self.adapter_up(_ACT[self.act](self.adapter_down(h)))
        return y + (h * self.scaling).to(y.dtype)


@register
class CompacterConfig(_BottleneckConfig):
    """Compacter++: a PHM bottleneck after each FFN output projection.

    phm_dim: n (the input size must be divisible by it; the bottleneck is rounded up to a multiple of it);
    phm_rank: rank of each ``B_i``; phm_init_range: std of the ``A_i`` at init.
    """

    type: ClassVar[str] = "compacter"
    default_targets: ClassVar[str] = rf"(?:.*\.)?(?:{_FFN_OUT})"
    reduction_factor: float = Field(32.0, gt=0)
    non_linearity: Activation = "gelu"
    phm_dim: int = Field(4, gt=0)
    phm_rank: int = Field(1, gt=0)
    phm_init_range: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _divisible(self) -> CompacterConfig:
        if self.bottleneck_size is not None and self.bottleneck_size % self.phm_dim:
            raise ValueError(f"bottleneck_size={self.bottleneck_size} must be divisible by phm_dim={self.phm_dim}")
        return self

    def bottleneck(self, dim: int) -> int:
        r = super().bottleneck(dim)
        return -(-r // self.phm_dim) * self.phm_dim

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        d = out_in(module)[0]
        if d % self.phm_dim:
            raise ValueError(f"{path}: compacter needs the output size ({d}) to be divisible by phm_dim={self.phm_dim}")
        return Compacter(d, self.bottleneck(d), self)
