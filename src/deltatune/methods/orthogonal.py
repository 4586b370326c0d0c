"""Orthogonal finetuning: OFT (Qiu et al. 2023) and BOFT (Liu et al. 2024).

Both multiply the frozen weight by a learned orthogonal matrix R that acts on the input dimension, which
preserves the angles between the weight's neurons (the "hyperspherical energy"):

    y = W (R^T x) + b     i.e.  W' = W R^T,   R: (in, in), R^T R = I,  R = I at init

PEFT (and so this file) applies R to the input as a row vector, ``x' = x R``, then runs the base layer.

- **OFT**: R is block diagonal, ``R = diag(R_1 .. R_r)`` with r blocks of ``oft_block_size`` (b) each; each
  block is the Cayley transform of a skew-symmetric Q_i (only its b(b-1)/2 upper-triangular entries are
  parameters, ``oft_R.weight``: (r, b(b-1)/2)): ``R_i = (I - Q_i)(I + Q_i)^{-1}``, or with
  ``use_cayley_neumann`` (PEFT's default) the truncated Neumann series ``I + 2Q + 2Q^2 + ... + Q^k`` of
  ``(I + Q)(I - Q)^{-1}`` (fast, approximately orthogonal). ``block_share``: one Q for all blocks.
  ``coft`` (constrained OFT): before use, each Q_i is projected onto the ball ``||Q_i||_F <= eps/sqrt(r)``
  (written back into the parameter, as the paper and PEFT do). ``module_dropout``: while training, that
  fraction of the blocks is replaced by the identity.
- **BOFT**: R is a product of m = ``boft_n_butterfly_factor`` butterfly factors,
  ``R = R_m ... R_2 R_1``, ``R_i = P_i diag(B_i1 .. B_iD) P_i^T``, each block the exact Cayley transform
  ``(I - S)(I + S)^{-1}`` of ``S = (A - A^T)/2`` (``boft_R``: (m, D, b, b)), ``P_i`` PEFT's block-butterfly
  permutations (P_1 = I). A learned per-output scale ``boft_s`` (out, 1) completes it:
  ``W' = diag(s) W R^T``. ``boft_dropout``: while training, that fraction of one factor's blocks is
  replaced by the identity (PEFT's multiplicative dropout).

The merge is multiplicative, so these deltas are not additive: two at one module do not sum (the core
refuses merging them together). With several active, each contributes its own change of the base output.
Unmerge inverts R exactly (OFT: per-block inverse, since the Neumann R is only nearly orthogonal).

Sites: ``nn.Linear`` and GPT-2 ``Conv1D`` (weight (in, out); PEFT itself cannot adapt it); BOFT also
``nn.Conv1d``/``nn.Conv2d`` (R acts on the flattened in * kernel filter; PEFT has Conv2d with square kernels).
OFT on convolutions is refused: PEFT 0.21.2's OFT Conv2d rotates unfolded patches and folds them back, which
is neither the identity at init nor equal to its own merged weight, so there is no format to be faithful to.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import site_shape
from ..core.registry import register
from ..core.targeting import is_linear

_CONV = (nn.Conv1d, nn.Conv2d)
PEFT_VERSION = "0.21.2"  # the PEFT release whose numerics (Cayley-Neumann series since 0.18) these files follow
_PEFT_CONSTANTS = {"fan_in_fan_out": False, "bias": "none", "peft_version": PEFT_VERSION}


def _replace_with_identity(blocks: Tensor, p: float) -> Tensor:
    """Multiplicative dropout: int(p * D) of the D (b, b) blocks (random ones) become the identity."""
    d, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * d)
    if d == 1 or k == 0:
        return blocks
    mask = torch.zeros(d, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(d, device=blocks.device)[:k]] = 1
    mask = mask.view(d, 1, 1)
    return (1 - mask) * blocks + mask * torch.eye(b, device=blocks.device, dtype=blocks.dtype)


class _Rotating(Delta):
    """What OFT and BOFT share: the base weight as (out, in_flat), a dense R, multiplicative merge."""

    mergeable = True

    def _setup(self, base: nn.Module, path: str) -> None:
        self.out_f, in_f, self.kernel = site_shape(base, path)
        self.in_flat = in_f * math.prod(self.kernel)
        self.conv = isinstance(base, _CONV)
        self.fan_in_fan_out = not self.conv and not isinstance(base, nn.Linear)  # GPT-2 Conv1D

    @property
    def additive(self) -> bool:
        return False

    def _w(self, base: nn.Module) -> Tensor:
        """The base weight as (out, in * prod(kernel)), in float32."""
        w = base.weight.T if self.fan_in_fan_out else base.weight
        return w.detach().float().reshape(self.out_f, self.in_flat)

    def _back(self, w: Tensor, base: nn.Module) -> Tensor:
        """(out, in_flat) float32 -> the base weight's layout and dtype."""
        w = w.reshape(self.out_f, *base.weight.shape[1:]) if self.conv else w
        return (w.T if self.fan_in_fan_out else w).to(base.weight.dtype)

    def _apply_weight(self, x: Tensor, w: Tensor, base: nn.Module) -> Tensor:
        """x through the base layer's linear map with weight ``w`` (out, in_flat), no bias."""
        if self.conv:
            w = w.reshape(self.out_f, *base.weight.shape[1:])
            return base._conv_forward(x.to(w.dtype), w, None)
        return F.linear(x.to(w.dtype), w)


# -- OFT -----------------------------------------------------------------------------------------
def _adjust(n: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of n nearest to ``value`` (ties go down)."""
    if value >= n:
        return n
    higher = value
    while higher <= n and n % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and n % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


@register
class OFTConfig(DeltaConfig):
    """OFT. Give either ``oft_block_size`` (default 32) or ``r`` (number of blocks), the other 0; a value that does
    not divide a layer's input width is adjusted to the nearest divisor with a warning, as PEFT does."""

    type: ClassVar[str] = "oft"
    tensor_roles: ClassVar[dict[str, str]] = {"oft_R.weight": "delta"}
    peft_type: ClassVar[str] = "OFT"
    peft_fields: ClassVar[dict[str, str]] = {
        "r": "r", "oft_block_size": "oft_block_size", "module_dropout": "module_dropout",
        "init_weights": "init_weights", "coft": "coft", "eps": "eps", "block_share": "block_share",
        "use_cayley_neumann": "use_cayley_neumann", "num_cayley_neumann_terms": "num_cayley_neumann_terms"}
    peft_constants: ClassVar[dict[str, Any]] = _PEFT_CONSTANTS

    r: int = Field(0, ge=0)
    oft_block_size: int = Field(32, ge=0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, ge=1)
    init_weights: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> OFTConfig:
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(f"give exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}); "
                             f"set the other to 0 (r x oft_block_size = the layer's input width)")
        return self

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def blocks(self, in_features: int, path: str) -> tuple[int, int]:
        """(number of blocks r, block size b) at a layer with ``in_features`` inputs."""
        if self.r == 0:
            b = self.oft_block_size
            if in_features % b:
                b = _adjust(in_features, b)
                warnings.warn(f"{path}: oft_block_size={self.oft_block_size} does not divide its input width "
                              f"{in_features}; using {b}", stacklevel=4)
            return in_features // b, b
        r = self.r
        if in_features % r:
            r = _adjust(in_features, r)
            warnings.warn(f"{path}: r={self.r} does not divide its input width {in_features}; using {r}", stacklevel=4)
        return r, in_features // r

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not is_linear(module):
            raise ValueError(f"{path}: OFT adapts linear layers (and GPT-2 Conv1D), not {type(module).__name__}")
        return OFT(module, path, self)

    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "oft_block_size" not in d:
            raise ValueError("this OFT adapter was saved by PEFT < 0.14 in a format PEFT itself no longer reads "
                             "(no oft_block_size); retrain it with a current PEFT")
        return {"r": d.get("r", 0)}


class _Params(nn.Module):
    """Holds ``weight`` so the key reads ``oft_R.weight`` as in PEFT's files."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


class OFT(_Rotating):
    """``y + W (x R - x)`` = the base applied to ``x R``, R = diag(R_1 .. R_r), each R_i (b, b) the Cayley
    (or Cayley-Neumann) transform of the skew-symmetric matrix whose upper triangle is ``oft_R.weight[i]``.

    Shapes: oft_R.weight (r, b(b-1)/2), or (1, b(b-1)/2) with block_share; R (in, in); W (out, in).
    Zero at init, so R = I.
    """

    def __init__(self, base: nn.Module, path: str, cfg: OFTConfig):
        super().__init__()
        self._setup(base, path)
        self.r, self.block_size = cfg.blocks(self.in_flat, path)
        b = self.block_size
        self.coft, self.eps, self.block_share = cfg.coft, cfg.eps, cfg.block_share
        self.neumann, self.terms = cfg.use_cayley_neumann, cfg.num_cayley_neumann_terms
        self.module_dropout = cfg.module_dropout
        self.oft_R = _Params(torch.zeros(1 if cfg.block_share else self.r, b * (b - 1) // 2))
        if not cfg.init_weights:
            nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def _skew(self, q: Tensor) -> Tensor:
        m = torch.zeros(q.shape[0], self.block_size, self.block_size, device=q.device, dtype=q.dtype)
        m[:, self.rows, self.cols] = q
        return m - m.transpose(-2, -1)

    @torch.no_grad()
    def _projected(self, w: Tensor) -> Tensor:
        """COFT: each block's skew matrix pulled back within Frobenius norm eps / sqrt(#blocks)."""
        q = self._skew(w.float())
        eps = self.eps / math.sqrt(q.shape[0])
        norm = q.norm(dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * (q / norm))
        return q[:, self.rows, self.cols].to(w.dtype)

    @torch.no_grad()
    def _project(self) -> None:
        self.oft_R.weight.copy_(self._projected(self.oft_R.weight))

    def blocks(self) -> Tensor:
        """The (r or 1, b, b) orthogonal blocks, float32.

        COFT: while training (with autograd on) the parameter is projected in place before use, PEFT's
        projected-gradient scheme; otherwise the projection is applied to a copy, so an evaluation, a merge
        or a save never changes the adapter's state."""
        w = self.oft_R.weight
        if self.coft:
            if self.training and torch.is_grad_enabled():
                self._project()
            else:
                w = self._projected(w)
        q = self._skew(w.float())
        n, b = q.shape[0], self.block_size
        eye = torch.eye(b, device=q.device, dtype=q.dtype)
        if not self.neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)  # (I - Q)(I + Q)^{-1}
        # PEFT's truncated series for (I + Q)(I - Q)^{-1}: I + 2Q + 2Q^2 + ... (last power with weight 1)
        r = eye.repeat(n, 1, 1)
        if self.terms > 1:
            r = r + 2 * q
            if self.terms > 2:
                power = q @ q
                r = r + 2 * power
                for _ in range(3, self.terms - 1):
                    power = power @ q
                    r = r + 2 * power
                r = r + power @ q
        return r

    def _full_blocks(self) -> Tensor:
        blocks = self.blocks()
        return blocks.expand(self.r, -1, -1) if self.block_share else blocks

    def rotation(self) -> Tensor:
        """The full block-diagonal R: (in, in), float32."""
        return torch.block_diag(*self._full_blocks())

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        blocks = self._full_blocks()
        if self.training and self.module_dropout > 0:
            blocks = _replace_with_identity(blocks, self.module_dropout)
        xf = x.to(blocks.dtype)
        xb = xf.reshape(*x.shape[:-1], self.r, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", xb, blocks).reshape(x.shape)
        w = base.weight.T if self.fan_in_fan_out else base.weight
        return y + F.linear((rotated - xf).to(w.dtype), w).to(y.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        return self._back(self._w(base) @ self.rotation().T, base)

    def unmerge_from(self, base: nn.Module) -> None:
        inv = torch.block_diag(*torch.linalg.inv(self._full_blocks()))
        base.weight.data.copy_(self._back(self._w(base) @ inv.T, base))


# -- BOFT ----------------------------------------------------------------------------------------
def butterfly_perm(n: int, blocks: int, half: int, factor: int) -> Tensor:
    """PEFT's block-butterfly permutation of ``n`` indices (as an index vector; P[i, perm[i]] = 1).

    ``n`` splits into ``blocks`` groups; within each group, the runs of ``half`` indices are reordered as all
    even-numbered runs, then all odd-numbered ones. ``factor`` = 0 (a single butterfly factor): identity."""
    if factor == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError(f"invalid butterfly: {blocks} blocks of 2 x {half} do not fit in {n}")
    size = n // blocks
    runs = size // half
    order = [*range(0, runs, 2), *range(1, runs, 2)]
    within = torch.tensor([j * half + t for j in order for t in range(half)], dtype=torch.long)
    return torch.cat([g * size + within for g in range(blocks)])


@register
class BOFTConfig(DeltaConfig):
    """BOFT. Give either ``boft_block_size`` (default 4) or ``boft_block_num``, the other 0;
    ``boft_n_butterfly_factor`` m (default 1: plain block-diagonal OFT with the exact Cayley transform)."""

    type: ClassVar[str] = "boft"
    tensor_roles: ClassVar[dict[str, str]] = {"boft_R": "delta", "boft_s": "scale"}
    peft_type: ClassVar[str] = "BOFT"
    peft_fields: ClassVar[dict[str, str]] = {
        "boft_block_size": "boft_block_size", "boft_block_num": "boft_block_num",
        "boft_n_butterfly_factor": "boft_n_butterfly_factor", "boft_dropout": "boft_dropout",
        "init_weights": "init_weights"}
    peft_constants: ClassVar[dict[str, Any]] = _PEFT_CONSTANTS

    boft_block_size: int = Field(4, ge=0)
    boft_block_num: int = Field(0, ge=0)
    boft_n_butterfly_factor: int = Field(1, ge=1)
    boft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> BOFTConfig:
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(f"give exactly one of boft_block_size ({self.boft_block_size}) and boft_block_num "
                             f"({self.boft_block_num}); set the other to 0 (their product is the input width)")
        return self

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, _CONV)

    def blocks(self, n: int, path: str) -> tuple[int, int]:
        """(number of blocks, block size) at a layer whose (flattened) input width is ``n``; PEFT's checks."""
        f = self.boft_n_butterfly_factor - 1
        if self.boft_block_size == 0:
            num = self.boft_block_num
            if n % num:
                raise ValueError(f"{path}: input width {n} is not divisible by boft_block_num={num}")
            if f and (f > int(math.log2(num)) or num % (2 ** f)):
                raise ValueError(f"{path}: boft_block_num={num} must be a multiple of 2^{f} for "
                                 f"boft_n_butterfly_factor={f + 1}")
            size = n // num
        else:
            size = self.boft_block_size
            if n % size:
                raise ValueError(f"{path}: input width {n} is not divisible by boft_block_size={size}")
            if f and (n < size * 2 ** f or n % (size * 2 ** f)):
                raise ValueError(f"{path}: input width {n} is not a multiple of boft_block_size x 2^{f} = "
                                 f"{size * 2 ** f} (boft_n_butterfly_factor={f + 1})")
            num = n // size
        if f and (num % 2 or size % 2):
            raise ValueError(f"{path}: with boft_n_butterfly_factor > 1 the block number ({num}) and block size "
                             f"({size}) must both be even")
        return num, size

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if isinstance(module, _CONV) and module.groups != 1:
            raise ValueError(f"{path}: BOFT on grouped convolutions (groups={module.groups}) is not supported")
        return BOFT(module, path, self)

class BOFT(_Rotating):
    """``diag(s) W (x R)`` + b with ``R = R_m .. R_1``, ``R_i = P_i diag(cayley(boft_R[i, j]))_j P_i^T``.

    Computed as ``y + (s - 1)(y - b) + s * W (x R - x)``. Shapes: boft_R (m, D, b, b) with D b = in
    (times the kernel size on convolutions); boft_s (out, 1) on linear layers, (1, out) on convolutions
    (PEFT's layouts); R (in, in). boft_R = 0 and boft_s = 1 at init, so R = I and the output is the base's.
    """

    def __init__(self, base: nn.Module, path: str, cfg: BOFTConfig):
        super().__init__()
        self._setup(base, path)
        num, size = cfg.blocks(self.in_flat, path)
        f = cfg.boft_n_butterfly_factor - 1
        self.block_num, self.block_size, self.dropout_p = num, size, cfg.boft_dropout
        perms = [butterfly_perm(self.in_flat, num // 2 ** i, size // 2, f) for i in range(f + 1)]
        self.register_buffer("perms", torch.stack(perms), persistent=False)
        self.boft_R = nn.Parameter(torch.zeros(f + 1, num, size, size))
        self.boft_s = nn.Parameter(torch.ones((1, self.out_f) if self.conv else (self.out_f, 1)))
        if not cfg.init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)

    def rotation(self) -> Tensor:
        """R (in_flat, in_flat), float32."""
        a = self.boft_R.float()
        m, d, b, _ = a.shape
        skew = 0.5 * (a - a.transpose(-2, -1))
        eye = torch.eye(b, device=a.device, dtype=a.dtype)
        q = torch.linalg.solve(eye + skew, eye - skew, left=False)  # (I - S)(I + S)^{-1}
        if self.training and self.dropout_p > 0:
            i = int(torch.randint(0, m, (1,)).item())
            q = torch.cat([q[:i], _replace_with_identity(q[i], self.dropout_p)[None], q[i + 1:]])
        r = None
        for i in range(m):
            p = self.perms[i]
            ri = torch.block_diag(*q[i])[p][:, p]  # P B P^T
            r = ri if r is None else ri @ r
        return r

    def _scale(self) -> Tensor:
        return self.boft_s.float().reshape(-1)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        rot = self.rotation()
        w = self._w(base)
        if self.conv:  # rotate the flattened filters: W R^T - W, then one convolution
            h = self._apply_weight(x.float(), w @ rot.T - w, base)
            s = self._scale().view(-1, *[1] * (y.dim() - 2))
        else:
            xf = x.float()
            h = F.linear(xf @ rot - xf, w)
            s = self._scale()
        bias = getattr(base, "bias", None)
        yf = y.float()
        wx = yf if bias is None else yf - (bias.float().view(-1, *[1] * (y.dim() - 2)) if self.conv else bias.float())
        return y + ((s - 1) * wx + s * h).to(y.dtype)

    def merged_weight(self, base: nn.Module) -> Tensor:
        return self._back(self._scale()[:, None] * (self._w(base) @ self.rotation().T), base)

    def unmerge_from(self, base: nn.Module) -> None:
        w = (self._w(base) / self._scale()[:, None]) @ self.rotation()  # R^{-T} = R (exact Cayley: orthogonal)
        base.weight.data.copy_(self._back(w, base))

    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        saved = state.get("boft_R")
        if saved is not None and saved.dim() == 4 and saved.shape[0] == 1 and self.boft_R.shape[0] > 1:
            raise ValueError(
                f"{where}.boft_R: the file holds 1 butterfly factor but its config asks for "
                f"{self.boft_R.shape[0]}; PEFT without its CUDA extension silently trains with "
                f"boft_n_butterfly_factor=1 -- load it with that value")
        super().import_state(state, where)
