"""Sparse fine-tuning: diff pruning / GPS-style fixed-mask sparse deltas.

    W' = W + dW,   dW = scatter(values, indices)      indices: (k,) int64 into W.flatten(), values: (k,)

k = max(1, round(density * W.numel())) entries per weight, chosen once before training (Guo et al. 2021,
diff pruning with a fixed mask; Sung et al. 2021, FISH-style masks; Ansell et al. 2022, LT-SFT) by

- ``mask="magnitude"``: the k largest |W|;
- ``mask="random"``: k uniformly random positions;
- ``mask="gradient"`` (GPS): the k largest accumulated |dL/dW| over a few calibration batches. This needs
  data: call :func:`calibrate_sparse` (or ``cfg.calibrate(dm, name, batches)``) after attaching and before
  training; until then the mask is the magnitude mask.

values = 0 at init (the identity). Only ``sparse_ft_values`` trains; the indices are a persistent buffer,
so the file holds both (``<module>.sparse_ft_indices`` int64, ``<module>.sparse_ft_values`` float).
Forward: ``y + x dW^T``, with the dense dW for small layers or, when fewer products are needed, a
gather / ``index_add`` over the k entries. Mergeable and additive (``delta_weight`` is the dense dW).
Sites: ``nn.Linear`` and GPT-2 ``Conv1D`` (indices address the weight as stored, (in, out) there).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hooks import TrainingContext, TrainingHook
from ..core.modules import is_conv1d
from ..core.registry import register
from ..core.targeting import is_linear

if TYPE_CHECKING:
    from ..core.model import DeltaModel


def num_entries(numel: int, density: float) -> int:
    return max(1, min(numel, round(density * numel)))


def top_indices(score: Tensor, k: int) -> Tensor:
    """The flat indices of the k largest scores, sorted ascending (int64)."""
    return torch.topk(score.detach().float().reshape(-1), k, sorted=False).indices.sort().values


@register
class SparseFTConfig(DeltaConfig):
    """Sparse fine-tuning: ``density`` of each target weight trains, at positions chosen by ``mask``."""

    type: ClassVar[str] = "sparse_ft"
    tensor_roles: ClassVar[dict[str, str]] = {"sparse_ft_values": "delta"}
    default_targets: ClassVar[str] = "all-linear"

    density: float = Field(0.01, gt=0.0, le=1.0)
    mask: Literal["magnitude", "random", "gradient"] = "magnitude"
    calibration_batches: int = Field(8, gt=0)  # mask="gradient" under the Trainer: batches used to calibrate

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if not self.supports(module):
            raise ValueError(f"{path}: sparse fine-tuning adapts linear layers (nn.Linear, GPT-2 Conv1D), "
                             f"not {type(module).__name__}")
        w = module.weight
        k = num_entries(w.numel(), self.density)
        if self.mask == "random":
            idx = torch.randperm(w.numel(), device=w.device)[:k].sort().values
        else:  # "gradient" starts from the magnitude mask until calibrate_sparse re-selects
            idx = top_indices(w.abs(), k)
        return SparseFT(tuple(w.shape), idx.to("cpu"), is_conv1d(module))

    def training_callbacks(self, dm: Any, name: str) -> list[Any]:
        """With ``mask="gradient"``, a fresh Trainer run first calibrates the mask (GPS) on its own first
        ``calibration_batches`` batches; a resumed run keeps the indices of its checkpoint."""
        if self.mask != "gradient":
            return []
        return [GPSCalibration(name, self.calibration_batches)]

    def calibrate(self, dm: DeltaModel, name: str, batches: Iterable[Any],
                  loss_fn: Callable[[Any, Any], Tensor] | None = None) -> None:
        calibrate_sparse(dm, name, batches, loss_fn=loss_fn)


class GPSCalibration(TrainingHook):
    """Before a fresh run's first step, choose adapter ``name``'s entries by gradient magnitude (GPS) on the run's
    first ``n`` batches, with the run's own loss; a resumed run keeps the entries of its checkpoint."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def on_train_begin(self, ctx: TrainingContext) -> None:
        if ctx.start_step == 0:
            calibrate_sparse(ctx.dm, self.name, ctx.batches(self.n), loss_fn=lambda _model, batch: ctx.loss(batch))


class SparseFT(Delta):
    """``y + x dW^T`` with dW zero except at ``sparse_ft_indices`` (k,), where it is ``sparse_ft_values`` (k,).

    ``shape`` is the base weight's shape as stored ((out, in) for nn.Linear, (in, out) for Conv1D).
    """

    mergeable = True

    def __init__(self, shape: tuple[int, ...], indices: Tensor, conv1d: bool = False):
        super().__init__()
        self.shape = shape
        self.conv1d = conv1d
        self.register_buffer("sparse_ft_indices", indices.to(torch.int64))
        self.sparse_ft_values = nn.Parameter(torch.zeros(indices.numel()))

    def dense(self) -> Tensor:
        """dW in the base weight's layout, in the values' dtype."""
        v = self.sparse_ft_values
        flat = torch.zeros(self.shape[0] * self.shape[1], dtype=v.dtype, device=v.device)
        return flat.index_put((self.sparse_ft_indices,), v).view(self.shape)

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        v = self.sparse_ft_values
        xd = x if x.dtype == v.dtype else x.to(v.dtype)
        tokens = xd.numel() // xd.shape[-1]
        if tokens * v.numel() < self.shape[0] * self.shape[1]:
            dy = self._gather(xd)
        else:
            dw = self.dense()
            dy = torch.matmul(xd, dw) if self.conv1d else F.linear(xd, dw)
        return y + dy.to(y.dtype)

    def _gather(self, x: Tensor) -> Tensor:
        """``dy[..., r] += v * x[..., c]`` over the k entries (r, c): O(tokens * k), no dense dW."""
        idx = self.sparse_ft_indices
        rows, cols = idx // self.shape[1], idx % self.shape[1]
        out_idx, in_idx = (cols, rows) if self.conv1d else (rows, cols)
        n_out = self.shape[1] if self.conv1d else self.shape[0]
        contrib = x.index_select(-1, in_idx) * self.sparse_ft_values
        return torch.zeros(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device).index_add(-1, out_idx, contrib)

    def delta_weight(self, base: nn.Module) -> Tensor:
        return self.dense().float()

    # -- file format: check the indices address this weight ------------------------------------
    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        idx = state.get("sparse_ft_indices")
        if idx is not None:
            numel = self.shape[0] * self.shape[1]
            if idx.is_floating_point() or idx.dim() != 1:
                raise ValueError(f"{where}.sparse_ft_indices: expected a 1-d integer tensor, got {idx.dtype} "
                                 f"of shape {tuple(idx.shape)}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"{where}.sparse_ft_indices: indices outside the weight of shape {self.shape}")
            if idx.unique().numel() != idx.numel():
                raise ValueError(f"{where}.sparse_ft_indices: repeated indices")
            state = {**state, "sparse_ft_indices": idx.to(torch.int64)}
        super().import_state(state, where)


def calibrate_sparse(dm: DeltaModel, name: str, batches: Iterable[Any],
                     loss_fn: Callable[[Any, Any], Tensor] | None = None) -> dict[str, Tensor]:
    """GPS mask selection: accumulate |dL/dW| of each adapted base weight over ``batches`` and re-select
    every delta's top-k indices from it (values reset to zero: the adapter is the identity again).

    ``batches``: dicts of model inputs (or anything ``loss_fn`` understands); ``loss_fn(model, batch)``
    returns the loss, default ``model(**batch).loss``. Nothing changes unless every layer got a gradient;
    the base's ``requires_grad`` flags and ``.grad`` fields are restored. Returns the new indices by path.
    """
    deltas = {p: d for p, d in dm.deltas(name).items() if isinstance(d, SparseFT)}
    if not deltas:
        raise ValueError(f"adapter {name!r} has no sparse fine-tuning deltas to calibrate")
    sites = dict(dm.sites())
    weights = {p: sites[p].base.weight for p in deltas}
    merged = [p for p in deltas if name in sites[p].merged]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged (e.g. at {merged[0]!r}); unmerge it before calibrating")
    loss_fn = loss_fn or (lambda model, batch: model(**batch).loss)
    flags = {p: (w.requires_grad, w.grad) for p, w in weights.items()}
    scores = {p: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for p, w in weights.items()}
    n = 0
    try:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(dm, batch)
            loss.backward()
            for p, w in weights.items():
                if w.grad is not None:
                    scores[p] += w.grad.detach().float().abs()
                    w.grad = None
            n += 1
    finally:
        for p, w in weights.items():
            w.requires_grad_(flags[p][0])
            w.grad = flags[p][1]
        for d in dm.deltas(name).values():  # calibration must not leave gradients on the adapter either
            for q in d.parameters():
                q.grad = None
    if n == 0:
        raise ValueError("calibrate_sparse: no batches were given")
    dead = [p for p, s in scores.items() if not s.any()]
    if dead:
        raise RuntimeError(f"calibrate_sparse: no gradient reached {dead[:3]}; is the loss connected to them? "
                           "Nothing was changed")
    new = {p: top_indices(scores[p], d.sparse_ft_indices.numel()).to(d.sparse_ft_indices.device)
           for p, d in deltas.items()}
    if any(d.sparse_ft_values.detach().any() for d in deltas.values()):
        warnings.warn(f"calibrate_sparse: adapter {name!r} had trained values; they are reset to zero with the "
                      f"new masks", stacklevel=2)
    with torch.no_grad():
        for p, d in deltas.items():
            d.sparse_ft_indices.copy_(new[p])
            d.sparse_ft_values.zero_()
    return new
