"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024).

    y = W x + Lambda_b B Lambda_d A dropout(x),    Lambda_b = diag(lambda_b), Lambda_d = diag(lambda_d)

A (r, in) and B (out, r) are frozen random matrices, the same for every adapted layer of one adapter; only the
vectors lambda_d (r) and lambda_b (out) train. As in PEFT, one pair A (r, max in), B (max out, r) is drawn
for the largest input and output sizes among the adapted layers, and each layer uses the slices
A[:, :in], B[:out, :]. Both are Kaiming-uniform from a CPU generator seeded with ``projection_prng_key``
(A first, then B; bound sqrt(3) * sqrt(2) / sqrt(fan_in)), so the same key always gives the same matrices.

Init (PEFT's): lambda_b = 0, lambda_d = ``d_initial``: the adapted model starts as the base.
``init_weights=False`` keeps PEFT's non-identity start (lambda_b = 1, lambda_d ~ N(0, 1)), for tests.

File format (PEFT's): per module ``vera_lambda_b``, ``vera_lambda_d``; with ``save_projection`` the shared
``base_model.vera_A`` / ``base_model.vera_B`` once per adapter (through ``DeltaConfig.export_shared``), else
they are regenerated from the key on load. In memory all layers of an adapter hold one projection module, so
A and B exist once per adapter, whatever the number of layers.

Sites: ``nn.Linear`` and GPT-2 ``Conv1D`` (weight stored (in, out)).
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

KEY_A, KEY_B = "base_model.vera_A", "base_model.vera_B"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) drawn from ``generator``, as PEFT draws VeRA's A and B."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@register
class VeRAConfig(DeltaConfig):
    """VeRA. ``r`` the size of the shared random projections (larger than LoRA ranks: only r + out parameters
    train per layer), ``projection_prng_key`` their seed, ``save_projection`` whether the file holds them,
    ``d_initial`` the initial value of lambda_d, ``dropout`` on the input of the update."""

    type: ClassVar[str] = "vera"
    tensor_roles: ClassVar[dict[str, str]] = {"vera_lambda_b": "delta", "vera_lambda_d": "factor"}
    combine_loose: ClassVar[frozenset[str]] = frozenset({"d_initial"})
    peft_type: ClassVar[str] = "VERA"
    peft_fields: ClassVar[dict[str, str]] = {
        "r": "r", "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
        "dropout": "vera_dropout", "d_initial": "d_initial", "init_weights": "init_weights"}
    peft_constants: ClassVar[dict[str, Any]] = {"fan_in_fan_out": False, "bias": "none"}
    shared_keys: ClassVar[tuple[str, ...]] = (KEY_A, KEY_B)

    r: int = Field(256, gt=0)
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = 0.1
    init_weights: bool = True

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def projections(self, modules: dict[str, nn.Module]) -> VeRAProjection:
        """The shared A (r, max in) and B (max out, r) for the layers ``modules``."""
        outs, ins = zip(*(out_in(m) for m in modules.values()))
        g = torch.Generator(device="cpu").manual_seed(self.projection_prng_key)
        a = kaiming_uniform((self.r, max(ins)), g)
        b = kaiming_uniform((max(outs), self.r), g)
        return VeRAProjection(a, b)

    def make_deltas(self, modules: dict[str, nn.Module]) -> dict[str, Delta]:
        for path, m in modules.items():
            if not is_linear(m):
                raise ValueError(f"{path}: VeRA adapts linear layers (nn.Linear, GPT-2 Conv1D), not {type(m).__name__}")
        proj = self.projections(modules)
        return {path: VeRA(m, proj, self.r, self.dropout, self.d_initial, self.init_weights)
                for path, m in modules.items()}

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return self.make_deltas({path: module})[path]

    # -- the shared projections in the file ----------------------------------------------------
    def export_shared(self, deltas: dict[str, Delta]) -> dict[str, Tensor]:
        if not self.save_projection or not deltas:
            return {}
        proj = _projection(deltas)
        return {KEY_A: proj.vera_A.detach(), KEY_B: proj.vera_B.detach()}

    def import_shared(self, deltas: dict[str, Delta], tensors: dict[str, Tensor]) -> None:
        if not self.save_projection:
            if tensors:
                warnings.warn(f"the file holds {sorted(tensors)} but its config says save_projection=False; "
                              f"using the projections regenerated from projection_prng_key, as PEFT does",
                              stacklevel=3)
            return
        missing = [k for k in self.shared_keys if k not in tensors]
        if missing:
            raise KeyError(f"VeRA adapter saved with save_projection=True, but the file has no {missing}")
        proj = _projection(deltas)
        for key, name in ((KEY_A, "vera_A"), (KEY_B, "vera_B")):
            own, t = getattr(proj, name), tensors[key]
            if tuple(t.shape) != tuple(own.shape):
                raise ValueError(f"{key}: shape {tuple(t.shape)} in the file, but the model needs {tuple(own.shape)} "
                                 f"(r x the largest in_features, the largest out_features x r of the adapted layers)")
        with torch.no_grad():
            proj.vera_A.copy_(tensors[KEY_A])
            proj.vera_B.copy_(tensors[KEY_B])

    # -- PEFT format ---------------------------------------------------------------------------
class VeRAProjection(nn.Module):
    """The frozen A (r, max in) and B (max out, r) one adapter shares across its layers (buffers, not saved in
    the model's state dict: they are the seed's, or the file's shared tensors)."""

    def __init__(self, a: Tensor, b: Tensor):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)


def _projection(deltas: dict[str, Delta]) -> VeRAProjection:
    return next(iter(deltas.values())).projection


class VeRA(Delta):
    """``y + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))``.

    Shapes: lambda_d (r,), lambda_b (out,), A (r, max in) and B (max out, r) shared (``projection``).
    """

    mergeable = True

    def __init__(self, base: nn.Module, projection: VeRAProjection, r: int, dropout: float = 0.0,
                 d_initial: float = 0.1, init_weights: bool = True):
        super().__init__()
        self.out_features, self.in_features = out_in(base)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # GPT-2 Conv1D
        self.projection = projection
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        if init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
            self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        else:  # PEFT's init_weights=False
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features))
            self.vera_lambda_d = nn.Parameter(torch.randn(r))

    def _ab(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        p = self.projection
        return p.vera_A[:, : self.in_features].to(dtype), p.vera_B[: self.out_features, :].to(dtype)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        lam_d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        a, b = self._ab(lam_d.dtype)
        xd = x if x.dtype == lam_d.dtype else x.to(lam_d.dtype)
        if self.dropout is not None:
            xd = self.dropout(xd)
        h = lam_b * F.linear(lam_d * F.linear(xd, a), b)
        return y + h.to(y.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        a, b = self._ab(torch.float32)
        dw = (self.vera_lambda_b.float()[:, None] * b) @ (self.vera_lambda_d.float()[:, None] * a)
        return dw.T if self.fan_in_fan_out else dw
