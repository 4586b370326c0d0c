"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with an importance-driven rank budget.

    y = W x + s * P diag(lambda) Q dropout(x),    s = alpha / (ranknum + 1e-5)

P (out, r) = ``lora_B``, lambda (r, 1) = ``lora_E``, Q (r, in) = ``lora_A`` (PEFT's names and shapes);
``ranknum`` is the initial rank ``init_r`` and stays so when triplets are pruned, so pruning never rescales
what is left (PEFT's convention, including its ``+ 1e-5``). lambda = 0 at init, so the adapted model
starts as the base; P and Q start N(0, 0.02) as in PEFT.

Training (paper section 3) adds two things, both driven by :class:`RankAllocator`:

- the orthogonality regulariser, weighted by ``orth_reg_weight``. Default (``orth_reg_form="peft"``): the
  authors' released code and PEFT, the mean over all P and Q matrices of ``||P^T P - I||_F`` and
  ``||Q Q^T - I||_F``. ``orth_reg_form="paper"``: eq. 4 as printed, ``R = sum_modules ||P^T P - I||_F^2 +
  ||Q Q^T - I||_F^2``; it grows with the number of modules, and at weight 0.5 its early gradients fill
  Adam's second moments for P and Q so that they barely learn in a short run (SST-2 on MiniLM, 250 steps:
  62.0% dev accuracy, against 75.8% with the default form at 0.5, 80.7% at 0.1 and 81.8% without it).
- the rank budget: the sensitivity ``I = |w * grad w|`` of every entry of P, lambda, Q is smoothed by an
  EMA (``beta1``) and its uncertainty ``U = |I - Ibar|`` by another (``beta2``), ``s = Ibar * Ubar``; a
  triplet's importance is ``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` (eq. 9). The total
  budget follows the cubic schedule ``b(t) = b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_i - t_f))^3``
  between ``tinit`` and ``total_step - tfinal`` (b_0 before, b_T after; b_0 = init_r x modules,
  b_T = target_r x modules); every ``deltaT`` steps the lambdas of all but the ``b(t)`` most important
  triplets are set to zero (the singular vectors stay, so a triplet can come back). At
  ``total_step - tfinal`` the final mask is fixed and re-applied after every later step.

With deltatune's :class:`~deltatune.train.trainer.Trainer` none of this needs user code: the config's
``training_callbacks`` plugs an :class:`AdaLoRAHook` in (importance and masking after the optimizer
step, as PEFT's loop does, the regulariser as an extra loss term; ``total_step`` defaults to the run's
steps). As in PEFT, the sensitivity uses the weights after the optimizer step with the step's gradient
(with the pre-step weights, lambda = 0 at init would score every triplet 0 at step 1 and, with
``tinit=0``, mask all of them for good). In an
own loop, use the allocator as PEFT's ``update_and_allocate``::

    alloc = RankAllocator(dm, "default", total_step=1000)
    loss = task_loss + alloc.regularizer()
    loss.backward(); opt.step()
    alloc.update_and_allocate(step)   # after opt.step(), before opt.zero_grad(); step counts from 1
    opt.zero_grad()

Files are PEFT's (``peft_type="ADALORA"``): once a mask exists, the config's ``rank_pattern`` (module
path + ``.lora_E`` -> which of the ``init_r`` triplets are kept) is saved and the tensors hold only the kept
triplets; loading builds each module at its kept rank with the original ``ranknum``. ``ranknum`` is not
saved (PEFT stopped saving it); older files that carry it load.

Sites: ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d`` (Q holds the kernel: (r, in * kh * kw)).
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
from ..core.hooks import TrainingContext, TrainingHook
from ..core.modules import out_in
from ..core.registry import register
from ..core.targeting import is_linear
from .adalora_budget import RankAllocator, cubic_budget, orthogonal_regularizer  # noqa: F401  (re-exported)

EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@register
class AdaLoRAConfig(DeltaConfig):
    """AdaLoRA. ``init_r`` starting rank per module, ``target_r`` average final rank, ``alpha`` scale numerator.

    Schedule: ``tinit`` warm-up steps at full budget, ``tfinal`` final steps at the fixed final mask,
    ``deltaT`` steps between maskings, ``total_step`` the run's length (``None``: the Trainer's steps).
    Importance EMAs ``beta1`` (sensitivity), ``beta2`` (uncertainty). ``rank_pattern`` is written by the
    allocator (which triplets each module keeps); a loaded adapter is built from it.
    ``init="random"`` (tests): a non-identity start (lambda ~ N(0, 1), P and Q as LoRA's random init).
    """

    type: ClassVar[str] = "adalora"
    tensor_roles: ClassVar[dict[str, str]] = {"lora_A": "factor", "lora_E": "factor", "lora_B": "delta"}
    factorised: ClassVar[bool] = True
    peft_type: ClassVar[str] = "ADALORA"
    peft_fields: ClassVar[dict[str, str]] = {
        "init_r": "init_r", "target_r": "target_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
        "rank_pattern": "rank_pattern", "tinit": "tinit", "tfinal": "tfinal", "deltaT": "deltaT", "beta1": "beta1",
        "beta2": "beta2", "orth_reg_weight": "orth_reg_weight"}
    peft_constants: ClassVar[dict[str, Any]] = {
        "r": 8, "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "alpha_pattern": {}}

    init_r: int = Field(12, gt=0)
    target_r: int = Field(8, ge=0)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: int = Field(1, gt=0)
    beta1: float = Field(0.85, gt=0.0, lt=1.0)
    beta2: float = Field(0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(0.5, ge=0.0)
    orth_reg_form: Literal["paper", "peft"] = "peft"
    total_step: int | None = Field(None, gt=0)
    rank_pattern: dict[str, list[bool]] | None = None
    init: Literal["svd", "random"] = "svd"

    @model_validator(mode="after")
    def _check(self) -> AdaLoRAConfig:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit ({self.tinit}) must be < total_step - tfinal ({self.total_step} - {self.tfinal}): "
                             f"the schedule leaves no budgeting phase")
        for k, v in (self.rank_pattern or {}).items():
            if not k.endswith(".lora_E"):
                raise ValueError(f"rank_pattern key {k!r} must be '<module path>.lora_E'")
            if len(v) != self.init_r:
                raise ValueError(f"rank_pattern[{k!r}] has {len(v)} entries, but init_r is {self.init_r}")
        return self

    def supports(self, module: nn.Module) -> bool:
        return is_linear(module) or isinstance(module, nn.Conv2d)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"{path}: AdaLoRA on grouped convolutions (groups={module.groups}) is not supported")
        pattern = (self.rank_pattern or {}).get(f"{path}.lora_E")
        return AdaLoRA(module, self.init_r, self.alpha, self.dropout, self.init, pattern)

    def training_callbacks(self, dm: Any, name: str) -> list[Any]:
        return [AdaLoRAHook(dm, name)]

    # -- PEFT format ---------------------------------------------------------------------------
    def peft_extra(self) -> dict[str, Any]:
        total = self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1  # PEFT needs one
        return {"total_step": total}

    @classmethod
    def peft_extra_in(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("rank_pattern") and not all(isinstance(v, list) for v in d["rank_pattern"].values()):
            raise ValueError("AdaLoRA rank_pattern values must be lists of booleans (one per initial triplet)")
        pattern = None
        if d.get("rank_pattern"):
            pattern = {}
            for k, v in d["rank_pattern"].items():  # "<path>.lora_E", or with the adapter name still attached
                path = k[: -len(".lora_E")] if k.endswith(".lora_E") else k.split(".lora_E.")[0]
                pattern[f"{path}.lora_E"] = [bool(x) for x in v]
        targets, total = d.get("target_modules"), d.get("total_step")
        return dict(alpha=d.get("lora_alpha", 8) or d.get("init_r", 12),  # PEFT: alpha 0 means alpha = r
                    total_step=total if total and d.get("tinit", 0) < total - d.get("tfinal", 0) else None,
                    rank_pattern=pattern, targets=sorted(targets) if isinstance(targets, (list, set)) else targets)


class AdaLoRA(Delta):
    """``y + s * P diag(lambda) Q dropout(x)`` (see the module doc).

    Parameters (PEFT names): ``lora_A`` = Q (r, in[*kh*kw]), ``lora_E`` = lambda (r, 1), ``lora_B`` = P (out, r).
    ``keep`` (bool, r): which triplets the last mask kept (what is saved); ``held`` (bool, init_r): which of
    the ``init_r`` triplets this delta holds (all, unless built from a saved ``rank_pattern``).
    """

    mergeable = True

    def __init__(self, base: nn.Module, init_r: int, alpha: float, dropout: float = 0.0, init: str = "svd",
                 pattern: list[bool] | None = None):
        super().__init__()
        self.conv = isinstance(base, nn.Conv2d)
        self.fan_in_fan_out = not self.conv and not isinstance(base, nn.Linear)  # GPT-2 Conv1D: weight (in, out)
        out_f, in_f = out_in(base)
        if self.conv:  # A acts on the unfolded (in * kernel) input
            in_f *= math.prod(base.kernel_size)
        self.init_r = init_r
        self.ranknum = float(init_r)
        self.scaling = alpha / (self.ranknum + EPS)
        pattern = [bool(b) for b in pattern] if pattern is not None else [True] * init_r
        held = torch.tensor(pattern, dtype=torch.bool)
        r = sum(pattern)  # from the list: the buffer may live on the meta device (size checks before loading)
        self.register_buffer("held", held, persistent=False)
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool))
        self.lora_A = nn.Parameter(torch.empty(r, in_f))
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.empty(out_f, r))
        with torch.no_grad():
            if init == "random":  # as LoRA's random init (uniform, 1/sqrt(fan_in)), lambda ~ N(0, 1)
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
                nn.init.normal_(self.lora_E)
            else:
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def pattern(self) -> list[bool]:
        """Which of the ``init_r`` triplets are kept (the ``rank_pattern`` entry of this module)."""
        out = self.held.clone()
        out[self.held] = self.keep.to(out.device)
        return out.tolist()

    def _dw(self) -> Tensor:
        """s * P diag(lambda) Q in float32, as (out, in) (or (out, in*k) for convolutions)."""
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        dt = self.lora_A.dtype
        xd = x if x.dtype == dt else x.to(dt)
        if self.dropout is not None:
            xd = self.dropout(xd)
        if self.conv:
            dw = (self.lora_B @ (self.lora_A * self.lora_E)).view(base.weight.shape)
            h = base._conv_forward(xd, dw, None)
        else:
            h = F.linear(F.linear(xd, self.lora_A * self.lora_E), self.lora_B)
        return y + (h * self.scaling).to(y.dtype)

    def delta_weight(self, base: nn.Module) -> Tensor:
        dw = self._dw()
        if self.conv:
            return dw.view(base.weight.shape)
        return dw.T if self.fan_in_fan_out else dw

    # -- file format: only the kept triplets -----------------------------------------------------
    def export_state(self) -> dict[str, Tensor]:
        k = self.keep
        if k.device.type == "meta":  # built to plan shapes before a load: nothing pruned yet
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        return {"lora_A": self.lora_A.detach()[k], "lora_B": self.lora_B.detach()[:, k], "lora_E": self.lora_E.detach()[k]}

    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        state = dict(state)
        ranknum = state.pop("ranknum", None)  # older PEFT files carry it; it is init_r by construction
        if ranknum is not None and abs(float(ranknum.reshape(-1)[0]) - self.ranknum) > 1e-3:
            raise ValueError(f"{where}.ranknum: the file says {float(ranknum.reshape(-1)[0])}, but init_r is "
                             f"{self.init_r}; a ranknum other than init_r is not supported")
        own = {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        for k, t in state.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"{where}.{k}: shape {tuple(t.shape)} in the file, but the model needs "
                                 f"{tuple(own[k].shape)} (init_r / rank_pattern / module shape differ)")
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(own[k].dtype))
        self.keep.fill_(True)


class AdaLoRAHook(TrainingHook):
    """Drives :class:`RankAllocator` from a training loop exactly where PEFT's loop calls
    ``update_and_allocate``: after the optimizer step (importance from the stepped weights and the step's
    gradients, kept from after backward since the loop drops them at ``zero_grad``), then masking (the
    paper's eq. 8: the stepped lambda is masked). ``orth_reg_weight * R`` is added to every micro-batch's loss.
    Its state (the importance averages, whether the final mask is fixed) is checkpointed: resuming is exact."""

    def __init__(self, dm: Any, name: str):
        self.dm, self.name = dm, name
        self.allocator: RankAllocator | None = None
        self._grads: dict[tuple[str, str], Tensor | None] | None = None

    def on_train_begin(self, ctx: TrainingContext) -> None:
        cfg = self.dm.configs[self.name]
        total = cfg.total_step if cfg.total_step is not None else ctx.total_steps
        if cfg.total_step is not None and cfg.total_step != ctx.total_steps:
            warnings.warn(f"AdaLoRA adapter {self.name!r}: total_step={cfg.total_step} but the run has "
                          f"{ctx.total_steps} steps; the budget schedule follows total_step", stacklevel=2)
        self.allocator = RankAllocator(self.dm, self.name, total_step=total)
        self.dm.configs[self.name] = cfg.model_copy(update={"total_step": total})  # saved with the adapter

    def extra_loss(self, ctx: TrainingContext, step: int) -> Tensor | None:
        if self.allocator is None or self.allocator.cfg.orth_reg_weight == 0:
            return None
        return self.allocator.regularizer()

    def on_after_backward(self, ctx: TrainingContext, step: int) -> None:
        self._grads = self.allocator.gradients()  # references: clipping then applies to them, as in PEFT's loop

    def on_step_end(self, ctx: TrainingContext, step: int, metrics: dict[str, float]) -> None:
        self.allocator.update_importance(step, self._grads)
        self._grads = None
        metrics["adalora_budget"] = self.allocator.allocate(step)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict() if self.allocator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state)
