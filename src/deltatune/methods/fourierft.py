"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al. 2024).

    y = W x + dW x,    dW = alpha * Re(IDFT2(F)),    F (out, in) zero except F[u_k, v_k] = c_k,  k = 1..n

Only the n spectral coefficients c (``fourierft_spectrum``, shape (n,)) train. The frequency positions
(u_k, v_k) are fixed and random: the first n entries of a permutation of the out * in positions drawn from a
CPU generator seeded with ``random_loc_seed`` (u = index // in, v = index % in), as PEFT draws them; they are
rebuilt from the seed, never saved. ``IDFT2`` is ``torch.fft.ifft2`` (normalised by 1 / (out * in)), computed
in float32; alpha is ``scaling``.

Init follows PEFT: by default (``init_weights=False``) c ~ N(0, 1), so the adapted model does NOT start as the
base (the paper's and PEFT's choice); ``init_weights=True`` starts from c = 0, the identity.

Sites: ``nn.Linear`` and GPT-2 ``Conv1D`` (weight stored (in, out); dW is (out, in) and merged transposed).
File format (PEFT's): ``<module>.fourierft_spectrum``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.modules import out_in
from ..core.registry import register
from ..core.targeting import is_linear


@register
class FourierFTConfig(DeltaConfig):
    """FourierFT. ``n_frequency`` trainable coefficients per layer (at most out * in), ``scaling`` alpha,
    ``random_loc_seed`` the seed of the frequency positions, ``n_frequency_pattern`` per-module counts (PEFT's
    matching: a key matches a module whose path ends with ``.<key>`` as a regex, or equals it)."""

    type: ClassVar[str] = "fourierft"
    tensor_roles: ClassVar[dict[str, str]] = {"fourierft_spectrum": "delta"}
    peft_type: ClassVar[str] = "FOURIERFT"
    peft_fields: ClassVar[dict[str, str]] = {
        "n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "random_loc_seed",
        "n_frequency_pattern": "n_frequency_pattern", "init_weights": "init_weights"}
    peft_constants: ClassVar[dict[str, Any]] = {"fan_in_fan_out": False, "bias": "none"}

    n_frequency: int = Field(1000, gt=0)
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = False
    n_frequency_pattern: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> FourierFTConfig:
        for k, v in self.n_frequency_pattern.items():
            if v <= 0:
                raise ValueError(f"n_frequency_pattern[{k!r}] must be > 0, got {v}")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"n_frequency_pattern key {k!r} is not a valid regex: {e}") from None
        return self

    def frequencies(self, path: str) -> int:
        """n for the module at ``path``, matched as PEFT matches ``n_frequency_pattern``."""
        for key, n in self.n_frequency_pattern.items():
            if re.match(rf".*\.{key}$", path):
                return n
        return self.n_frequency_pattern.get(path, self.n_frequency)

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        out_f, in_f = out_in(module)
        n = self.frequencies(path)
        if n > out_f * in_f:
            raise ValueError(f"{path}: n_frequency={n} is more than the {out_f} x {in_f} = {out_f * in_f} entries "
                             f"of its weight; lower n_frequency (or set n_frequency_pattern for this module)")
        return FourierFT(module, n, self.scaling, self.random_loc_seed, self.init_weights)

    # -- PEFT format ---------------------------------------------------------------------------
    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "random_loc_seed" in d and d["random_loc_seed"] is None:
            raise ValueError("FourierFT with random_loc_seed=None cannot be rebuilt: its frequency positions are lost")
        return {}


class FourierFT(Delta):
    """``y + x dW^T`` with ``dW = scaling * Re(ifft2(F))``, F (out, in) holding the spectrum at ``indices``.

    Shapes: fourierft_spectrum (n,); indices (2, n) (rows, columns of F; a buffer rebuilt from the seed).
    """

    mergeable = True

    def __init__(self, base: nn.Module, n: int, scaling: float, seed: int, init_weights: bool = False):
        super().__init__()
        self.out_features, self.in_features = out_in(base)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # GPT-2 Conv1D
        self.scaling = scaling
        flat = torch.randperm(self.out_features * self.in_features, generator=torch.Generator().manual_seed(seed))[:n]
        self.register_buffer("indices", torch.stack([flat // self.in_features, flat % self.in_features]),
                             persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.randn(n))
        if init_weights:
            nn.init.zeros_(self.fourierft_spectrum)

    def _dw(self) -> Tensor:
        """dW (out, in) in float32 (ifft2 needs float32 at least)."""
        spec = self.fourierft_spectrum
        dense = torch.zeros(self.out_features, self.in_features, device=spec.device, dtype=torch.float32)
        dense = dense.index_put((self.indices[0], self.indices[1]), spec.float())
        return torch.fft.ifft2(dense).real * self.scaling

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dw = self._dw().to(self.fourierft_spectrum.dtype)
        return y + F.linear(x.to(dw.dtype), dw).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        dw = self._dw()
        return dw.T if self.fan_in_fan_out else dw
