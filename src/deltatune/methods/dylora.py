"""DyLoRA (Valipour et al. 2023): LoRA trained for every rank up to ``r`` at once (nested ranks).

    train:  y = W x + (alpha / b) * B[:, :b] A[:b] dropout(x),   b ~ Uniform{r_min, ..., r}
    eval:   the same with b = ``eval_rank`` (default ``r``)

A (r, in), B (out, r), PEFT/LoRA names ``lora_A.weight``, ``lora_B.weight``; B = 0 at init, so the adapted model
starts as the base. The scale is the paper's per truncated rank, alpha / b (eq. 5), so a truncation to rank
b is exactly a plain LoRA of rank b with the same alpha (:func:`truncate`).

Which components get gradients (``update``): the paper's default ("frozen" in its ablation, eq. 6-7)
updates only the b-th row of A and the b-th column of B at a step that samples b; rows/columns < b take
part in the forward but are held fixed (detached), so what lower ranks learned is not disturbed.
``update="all"`` is the ablation's "non-frozen" variant: every row/column up to b trains.

Sampling: each training forward of a delta draws its own b with torch's RNG (so activation checkpointing
recomputes the same b). The paper's objective uses one b for the whole model per step; deltatune's
Trainer does that through the config's ``training_callbacks`` (one b per step for every module of the
adapter); in an own loop call :func:`set_train_rank` (or ``DyLoRASampler(dm, name).step()``) each step
for the same behaviour.

Not in the PEFT format: saved in deltatune's format (PEFT's LoRA key names, a ``deltatune`` config).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.hooks import TrainingContext, TrainingHook
from ..core.modules import out_in
from ..core.registry import config, register
from ..core.targeting import exact_targets, is_linear


@register
class DyLoRAConfig(DeltaConfig):
    """DyLoRA. ``r`` the largest rank, ``r_min`` the smallest trained, ``alpha`` scale numerator (scale alpha / b).

    ``eval_rank``: the rank used outside training (default ``r``). ``update``: ``"bth"`` (paper) or ``"all"``.
    ``init="random"`` (tests): B random too, a non-identity start.
    """

    type: ClassVar[str] = "dylora"
    tensor_roles: ClassVar[dict[str, str]] = {"lora_A.weight": "factor", "lora_B.weight": "delta"}
    factorised: ClassVar[bool] = True

    r: int = Field(8, gt=0)
    r_min: int = Field(1, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    eval_rank: int | None = Field(None, gt=0)
    update: Literal["bth", "all"] = "bth"
    init: Literal["gaussian", "random"] = "gaussian"

    @model_validator(mode="after")
    def _check(self) -> DyLoRAConfig:
        if self.r_min > self.r:
            raise ValueError(f"r_min ({self.r_min}) must not exceed r ({self.r})")
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise ValueError(f"eval_rank ({self.eval_rank}) must not exceed r ({self.r})")
        return self

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return DyLoRA(module, self.r, self.r_min, self.alpha, self.dropout, self.eval_rank or self.r,
                      self.update, self.init)

    def training_callbacks(self, dm: Any, name: str) -> list[Any]:
        return [DyLoRASampler(dm, name)]


class DyLoRA(Delta):
    """``y + (alpha / b) * B[:, :b] A[:b] dropout(x)`` on a linear site (see the module doc).

    Shapes: A (r, in), B (out, r). ``train_rank`` (None: sample per forward) fixes b in training.
    """

    mergeable = True

    def __init__(self, base: nn.Module, r: int, r_min: int, alpha: float, dropout: float = 0.0,
                 eval_rank: int | None = None, update: str = "bth", init: str = "gaussian"):
        super().__init__()
        out_f, in_f = out_in(base)
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.r, self.r_min, self.alpha = r, r_min, alpha
        self.eval_rank = eval_rank or r
        self.update = update
        self.train_rank: int | None = None
        self.last_rank: int | None = None  # the b of the last training forward (for tests and logging)
        self.lora_A = nn.Linear(in_f, r, bias=False)
        self.lora_B = nn.Linear(r, out_f, bias=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B.weight, a=5 ** 0.5)
            else:
                nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def sample_rank(self) -> int:
        return int(torch.randint(self.r_min, self.r + 1, ()).item())

    def factors(self, b: int, training: bool = False) -> tuple[Tensor, Tensor]:
        """(A[:b], B[:, :b]); in training with ``update="bth"`` only row/column b carries gradients
        (all rows up to ``r_min`` when b = r_min, so that none of them is left untrained)."""
        a, bm = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        if training and self.update == "bth" and b > self.r_min:
            a = torch.cat([a[:b - 1].detach(), a[b - 1:]], dim=0)
            bm = torch.cat([bm[:, :b - 1].detach(), bm[:, b - 1:]], dim=1)
        return a, bm

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.lora_A.weight.dtype
        xd = x if x.dtype == dt else x.to(dt)
        if self.dropout is not None:
            xd = self.dropout(xd)
        if self.training:
            b = self.train_rank if self.train_rank is not None else self.sample_rank()
            self.last_rank = b
        else:
            b = self.eval_rank
        a, bm = self.factors(b, self.training)
        h = F.linear(F.linear(xd, a), bm)
        return y + (h * (self.alpha / b)).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        b = self.eval_rank
        a, bm = self.factors(b)
        dw = (bm.float() @ a.float()) * (self.alpha / b)
        return dw.T if self.fan_in_fan_out else dw

    def truncate(self, rank: int) -> dict[str, Tensor]:
        """A plain LoRA state of rank ``rank`` (scale alpha / rank) equal to this delta at that rank."""
        if not 1 <= rank <= self.r:
            raise ValueError(f"rank must be in [1, {self.r}], got {rank}")
        return {"lora_A.weight": self.lora_A.weight.detach()[:rank].clone(),
                "lora_B.weight": self.lora_B.weight.detach()[:, :rank].clone()}


def _dylora_deltas(dm: Any, name: str) -> dict[str, DyLoRA]:
    cfg = dm.configs.get(name) if name in dm.configs else None
    if not isinstance(cfg, DyLoRAConfig):
        dm._require(name)
        raise TypeError(f"adapter {name!r} is {type(cfg).__name__}, not DyLoRA")
    return {p: d for p, d in dm.deltas(name).items() if isinstance(d, DyLoRA)}


def set_train_rank(dm: Any, name: str, rank: int | None) -> None:
    """Fix the rank b every module of adapter ``name`` uses in training (None: sample per forward)."""
    deltas = _dylora_deltas(dm, name)
    cfg = dm.configs[name]
    if rank is not None and not cfg.r_min <= rank <= cfg.r:
        raise ValueError(f"rank must be in [r_min, r] = [{cfg.r_min}, {cfg.r}], got {rank}")
    for d in deltas.values():
        d.train_rank = rank


def set_eval_rank(dm: Any, name: str, rank: int | None) -> None:
    """Use rank ``rank`` outside training (None: the full rank r). Merged adapters must be unmerged first."""
    deltas = _dylora_deltas(dm, name)
    cfg = dm.configs[name]
    if rank is not None and not 1 <= rank <= cfg.r:
        raise ValueError(f"eval_rank must be in [1, {cfg.r}], got {rank}")
    merged = [p for p, s in dm.sites() if name in s.merged]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged (e.g. at {merged[0]!r}); unmerge before changing its rank")
    for d in deltas.values():
        d.eval_rank = rank or cfg.r
    dm.configs[name] = cfg.model_copy(update={"eval_rank": rank})


def truncate(dm: Any, name: str, rank: int, new_name: str | None = None) -> tuple[DeltaConfig, dict[str, Tensor]]:
    """Adapter ``name`` at rank ``rank`` as a plain LoRA: ``(LoRAConfig, state)`` with ``state`` keyed
    ``<module path>.<param>`` (as ``DeltaModel.add(cfg, state=...)`` takes it). With ``new_name`` it is also
    added to ``dm`` under that name (inactive)."""
    deltas = _dylora_deltas(dm, name)
    cfg = dm.configs[name]
    if not 1 <= rank <= cfg.r:
        raise ValueError(f"rank must be in [1, {cfg.r}], got {rank}")
    lora = config("lora", r=rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=exact_targets(dm.model, list(deltas)),
                      modules_to_save=cfg.modules_to_save, adapter_dtype=cfg.adapter_dtype)
    state: dict[str, Tensor] = {}
    for path, d in dm.deltas(name).items():
        part = d.truncate(rank) if isinstance(d, DyLoRA) else d.export_state()
        state.update({f"{path}.{k}": v for k, v in part.items()})
    if new_name is not None:
        dm.add(lora, new_name, trainable=dm.trainable[name], state=state)
    return lora, state


class DyLoRASampler(TrainingHook):
    """One rank b ~ Uniform{r_min..r} per training step for every module of the adapter (the paper's
    L_DY(b)). The Trainer gets it from the config; an own loop calls :meth:`step` once per step. The rank of
    the coming step is its state: a resumed run trains the step with the rank the uninterrupted run drew."""

    def __init__(self, dm: Any, name: str):
        self.dm, self.name = dm, name

    def step(self) -> int:
        cfg = self.dm.configs[self.name]
        b = int(torch.randint(cfg.r_min, cfg.r + 1, ()).item())
        set_train_rank(self.dm, self.name, b)
        return b

    def on_train_begin(self, ctx: TrainingContext) -> None:
        if ctx.start_step == 0:  # a resumed run gets the drawn rank from its checkpoint (load_state_dict)
            self.step()

    def on_step_end(self, ctx: TrainingContext, step: int, metrics: dict[str, float]) -> None:
        if step < ctx.total_steps:
            self.step()
        else:  # training is over: back to per-forward sampling for any later own loop
            set_train_rank(self.dm, self.name, None)

    def state_dict(self) -> dict[str, Any]:
        ranks = {d.train_rank for d in _dylora_deltas(self.dm, self.name).values()}
        return {"train_rank": ranks.pop() if len(ranks) == 1 else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_train_rank(self.dm, self.name, state.get("train_rank"))
