"""AdaLoRA's rank budget (Zhang et al. 2023, section 3): the cubic budget schedule (eq. 10), the orthogonality
regulariser (eq. 4), and the importance-driven allocator (eqs. 8-9) that masks triplets to the budget.

Method mathematics only: it works on an adapter's AdaLoRA deltas (``lora_A`` Q, ``lora_E`` lambda, ``lora_B`` P,
``keep``, ``rank``, ``pattern()``) through a DeltaModel, and knows nothing of any training loop. The config, the
delta and the training hook that drives the allocator are in :mod:`deltatune.methods.adalora`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def cubic_budget(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int) -> int:
    """The paper's budget schedule b(t) (eq. 10; PEFT's integer rounding and boundaries)."""
    if step <= tinit:
        return init_bgt
    if step > total_step - tfinal:
        return target_bgt
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * frac**3 + target_bgt)


def orthogonal_regularizer(deltas: list[Any], form: str = "paper") -> Tensor:
    """``sum ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` over ``deltas`` (``form="peft"``: mean of unsquared norms)."""
    terms = []
    for d in deltas:
        if d.rank == 0:
            continue
        eye = torch.eye(d.rank, device=d.lora_A.device, dtype=torch.float32)
        for cov in (d.lora_A.float() @ d.lora_A.float().T, d.lora_B.float().T @ d.lora_B.float()):
            diff = torch.linalg.matrix_norm(cov - eye)
            terms.append(diff.square() if form == "paper" else diff)
    if not terms:
        return torch.zeros(())
    total = torch.stack(terms).sum()
    return total if form == "paper" else total / len(terms)


class RankAllocator:
    """AdaLoRA's budget schedule and masking for adapter ``name`` of a DeltaModel (PEFT's ``RankAllocator``).

    ``update_importance`` needs the gradients of the step; ``allocate`` masks per the schedule.
    ``update_and_allocate(step)`` does both, as PEFT's method: call it after ``optimizer.step()`` and
    before ``zero_grad()``. Steps count from 1 to ``total_step``.
    """

    def __init__(self, dm: Any, name: str, total_step: int | None = None):
        self.dm, self.name = dm, name
        cfg = dm.configs[name]
        if cfg.type != "adalora":
            raise TypeError(f"adapter {name!r} is {type(cfg).__name__}, not AdaLoRA")
        total = total_step if total_step is not None else cfg.total_step
        if total is None:
            raise ValueError(f"adapter {name!r}: total_step is not set; give it in the AdaLoRAConfig or here")
        cfg = cfg.model_validate({**cfg.model_dump(), "total_step": total})  # validates the schedule
        self.cfg = cfg
        self.deltas: dict[str, Any] = {p: d for p, d in dm.deltas(name).items() if hasattr(d, "lora_E")}
        self.init_bgt = sum(d.rank for d in self.deltas.values())
        self.target_bgt = cfg.target_r * len(self.deltas)
        self.final_fixed = False
        self.reset_importance()

    def reset_importance(self) -> None:
        self.ipt: dict[tuple[str, str], Tensor] = {}
        self.unc: dict[tuple[str, str], Tensor] = {}

    def budget(self, step: int) -> int:
        c = self.cfg
        return cubic_budget(step, self.init_bgt, self.target_bgt, c.tinit, c.tfinal, c.total_step)

    def regularizer(self) -> Tensor:
        """``orth_reg_weight * R`` for this adapter (add it to the loss)."""
        r = orthogonal_regularizer(list(self.deltas.values()), self.cfg.orth_reg_form)
        return self.cfg.orth_reg_weight * r

    @torch.no_grad()
    def update_importance(self, step: int | None = None, grads: dict[tuple[str, str], Tensor | None] | None = None) -> None:
        """EMA of the sensitivity |w * grad| and of its uncertainty, for every entry of P, lambda, Q.

        As PEFT (and so that lambda = 0 at init does not score every triplet 0): w is the weight after the
        optimizer step, grad the step's gradient (``p.grad``, or ``grads[(module path, param name)]``).
        """
        if step is not None and step >= self.cfg.total_step - self.cfg.tfinal:
            return  # the final phase only keeps the fixed mask
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for path, d in self.deltas.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p = getattr(d, pname)
                key = (path, pname)
                g = grads.get(key) if grads is not None else p.grad
                now = (p.float() * g.float()).abs() if g is not None else torch.zeros_like(p, dtype=torch.float32)
                ipt = self.ipt.get(key, torch.zeros_like(now))
                unc = self.unc.get(key, torch.zeros_like(now))
                ipt = b1 * ipt + (1 - b1) * now
                self.unc[key] = b2 * unc + (1 - b2) * (now - ipt).abs()
                self.ipt[key] = ipt

    def gradients(self) -> dict[tuple[str, str], Tensor | None]:
        """The current gradients of P, lambda, Q (references), for a later :meth:`update_importance`."""
        return {(p, n): getattr(d, n).grad for p, d in self.deltas.items() for n in ("lora_A", "lora_E", "lora_B")}

    def triplet_scores(self) -> dict[str, Tensor]:
        """S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji) per module, shape (r,)."""
        out = {}
        for path, d in self.deltas.items():
            s = {n: self.ipt.get((path, n), torch.zeros(getattr(d, n).shape)) *
                 self.unc.get((path, n), torch.zeros(getattr(d, n).shape)) for n in ("lora_A", "lora_E", "lora_B")}
            out[path] = s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero the lambdas of all but the ``budget`` most important triplets (ties at the threshold go)."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        if k <= 0 or not scores:
            for d in self.deltas.values():
                d.keep.fill_(True)
        else:
            threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k).values
            for path, d in self.deltas.items():
                keep = scores[path].float().cpu() > threshold
                d.keep.copy_(keep)
        self._apply_masks()
        self._write_pattern()

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for d in self.deltas.values():
            d.lora_E.masked_fill_(~d.keep.view(-1, 1).to(d.lora_E.device), 0.0)

    def _write_pattern(self) -> None:
        pattern = {f"{p}.lora_E": d.pattern() for p, d in self.deltas.items()}
        cfg = self.dm.configs[self.name]
        self.dm.configs[self.name] = cfg.model_copy(update={"rank_pattern": pattern, "total_step": self.cfg.total_step})

    def allocate(self, step: int) -> int:
        """Mask per the schedule at ``step`` (after the optimizer step); returns the budget."""
        c = self.cfg
        end = c.total_step - c.tfinal
        if step < end:
            budget = self.budget(step)
            if c.tinit < step and step % c.deltaT == 0:
                self.mask_to_budget(budget)
            return budget
        if step == end or (not self.final_fixed and self.ipt):  # the final mask, fixed from here on
            self.mask_to_budget(self.target_bgt)
            self.reset_importance()
        elif not self.final_fixed:  # resumed past the final mask: the masks restored with the weights stand
            self._apply_masks()
            self._write_pattern()
        else:
            self._apply_masks()
        self.final_fixed = True
        return self.target_bgt

    def update_and_allocate(self, step: int) -> int:
        """PEFT's ``update_and_allocate``: call after ``optimizer.step()``, before ``zero_grad()``."""
        self.update_importance(step)
        return self.allocate(step)

    def state_dict(self) -> dict[str, Any]:
        """The importance averages (tensors ``ipt/<module>/<param>``, ``unc/...``) and the final-mask flag: what a
        resumed run needs to mask exactly as an uninterrupted one."""
        out: dict[str, Any] = {"final_fixed": self.final_fixed}
        for kind, table in (("ipt", self.ipt), ("unc", self.unc)):
            out.update({f"{kind}/{path}/{pname}": t for (path, pname), t in table.items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.final_fixed = bool(state.get("final_fixed", False))
        self.reset_importance()
        for key, t in state.items():
            kind, _, rest = key.partition("/")
            if kind in ("ipt", "unc"):
                path, _, pname = rest.rpartition("/")
                if path not in self.deltas:
                    raise ValueError(f"AdaLoRA state for module {path!r}, which this adapter does not have")
                (self.ipt if kind == "ipt" else self.unc)[(path, pname)] = t.to(getattr(self.deltas[path], pname).device)

    def nonzero_ranks(self) -> dict[str, int]:
        """The number of non-zero lambdas per module."""
        return {p: int((d.lora_E != 0).sum()) for p, d in self.deltas.items()}


