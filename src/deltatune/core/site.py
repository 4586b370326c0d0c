"""Site: the wrapper that replaces a target module in its parent.

It keeps the original module untouched as ``base`` and a name-keyed dict of deltas. Which deltas are
active, whether all are disabled, and the per-row routing of a mixed batch live in one
:class:`SiteState` shared by every site of a DeltaModel, so switching adapters is O(1) and needs no walk
over the model. The base computation is always delegated to the wrapped module (never reimplemented),
so quantized or sharded layers can sit underneath.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from .delta import Delta, MergeError, check_finite

if TYPE_CHECKING:
    from .composition import Composition

# a site's plan for one routing: routers (each serving a group of deltas at once), then (delta, rows) run alone
Plan = tuple[list[Callable], list[tuple[Delta, Tensor]]]


@dataclass
class SiteState:
    """What every site of one DeltaModel needs to know at forward time."""

    active: tuple[str, ...] = ()
    disabled: bool = False
    # a composition block checked against the model (core/composition.py): it combines the active deltas' outputs
    composition: Composition | None = None
    # per-row routing: adapter name -> LongTensor of batch rows; rows in no group use the base only
    route: dict[str, Tensor] | None = None
    route_rows: int = 0
    version: int = 0
    # each site's plan for the current routing (built on its first routed forward), in ``route_plans``; the
    # plans of the last few routings, by key, in ``plans``. Every change drops them all.
    route_plans: dict[Site, Plan] = field(default_factory=dict, repr=False, compare=False)
    plans: dict[tuple, dict[Site, Plan]] = field(default_factory=dict, repr=False, compare=False)
    keep_plans: ClassVar[int] = 4

    def bump(self) -> None:
        """Something changed (adapters, which are active, merging): cached per-site decisions are stale."""
        self.version += 1
        self.plans.clear()
        self.route_plans = {}

    def set_route(self, route: dict[str, Tensor] | None, rows: int = 0, key: tuple | None = None) -> None:
        """Start per-row routing (``route``: adapter -> its rows, of ``rows``), or end it (None).

        The plans of the last ``keep_plans`` routing keys (the adapters per row, and what else they depend on)
        are kept until the next ``bump``, so a decoding loop that routes every step (alternating prefill and
        decode batches) builds them once.
        """
        self.route, self.route_rows = route, rows
        if route is None or key is None:
            self.route_plans = {}
            return
        self.route_plans = self.plans.pop(key, None) or {}
        self.plans[key] = self.route_plans  # the most recent last
        while len(self.plans) > self.keep_plans:
            del self.plans[next(iter(self.plans))]


class Site(nn.Module):
    def __init__(self, base: nn.Module, state: SiteState):
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        self.merged: list[str] = []
        self.merge_scales: dict[str, float] = {}  # adapters merged with a weight other than 1 (a composition's)
        object.__setattr__(self, "_state", state)  # shared, deliberately not a submodule
        self._cache: tuple[int, list[Delta], Delta | None] = (-1, [], None)

    def __getattr__(self, name: str):
        # model code sometimes reads attributes of the module it thinks it holds (weight, in_features...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "deltas"):
                raise
            return getattr(self._modules["base"], name)

    # -- forward -------------------------------------------------------------------------------
    def _active(self) -> tuple[list[Delta], Delta | None]:
        st = self._state
        if self._cache[0] != st.version:
            ds = [self.deltas[n] for n in st.active
                  if n in self.deltas and n not in self.merged and not self.deltas[n].input_level]
            replacing = [d for d in ds if d.replaces_base]
            if len(replacing) > 1:
                raise RuntimeError("two active adapters each replace the same module (modules_to_save)")
            self._cache = (st.version, [d for d in ds if not d.replaces_base], replacing[0] if replacing else None)
        return self._cache[1], self._cache[2]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        st = self._state
        if st.disabled:
            return self.base(x, *args, **kwargs)
        if st.route is not None:
            return self._routed(x, *args, **kwargs)
        if st.composition is not None:
            return st.composition(self, x, *args, **kwargs)
        deltas, replacing = self._active()
        y = replacing(x, None, self.base, *args, **kwargs) if replacing else self.base(x, *args, **kwargs)
        for d in deltas:
            y = d(x, y, self.base)
        return y

    def _routed(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Mixed batch: the base runs once for all rows; then each group of deltas that can share one pass
        (same ``route_group``) runs through its ``router``, and every other delta on its own rows."""
        st = self._state
        if x.shape[0] != st.route_rows:
            raise ValueError(f"per-row adapters were given for {st.route_rows} rows, but the batch has {x.shape[0]}")
        plan = st.route_plans.get(self)
        if plan is None:
            plan = st.route_plans[self] = self._route_plan()
        routers, alone = plan
        y = self.base(x, *args, **kwargs)
        for router in routers:
            y = router(x, y, self.base)
        out = None
        for d, rows in alone:
            xr = x.index_select(0, rows)
            if d.replaces_base:
                yr = d(xr, None, self.base, *args, **kwargs)
            else:
                yr = d(xr, y.index_select(0, rows), self.base)
            if out is None:
                out = y.clone()
            out.index_copy_(0, rows, yr.to(out.dtype))
        return y if out is None else out

    def _route_plan(self) -> Plan:
        """Group the routed deltas here: per-row lists for each ``route_group`` (one router each), the rest alone."""
        st = self._state
        groups: dict[tuple, list[Delta | None]] = {}
        alone: list[tuple[Delta, Tensor]] = []
        deltas = self.deltas._modules  # a plain dict: this runs for every site on every new routing
        for name, rows in st.route.items():
            d = deltas.get(name)
            if d is None:
                continue
            key = None if d.replaces_base else d.route_group
            if key is None:
                alone.append((d, rows))
                continue
            per_row = groups.setdefault((type(d), key), [None] * st.route_rows)
            for i in rows.tolist():
                per_row[i] = d
        return [cls.router(per_row) for (cls, _), per_row in groups.items()], alone

    # -- merging -------------------------------------------------------------------------------
    def check_mergeable(self, names: list[str], where: str, scales: dict[str, float] | None = None) -> None:
        """Raise before anything changes if merging ``names`` here would fail or give non-finite weights.

        ``scales``: adapter -> weight for a weighted merge (a composition's Average); 1 when absent.
        """
        w = self.base.weight if hasattr(self.base, "weight") else None
        together = [d for n, d in self.deltas.items() if (n in names or n in self.merged) and not d.replaces_base]
        if len(together) > 1 and not all(d.additive for d in together):
            raise MergeError(f"{where}: a non-additive delta (e.g. DoRA) cannot be merged together with other "
                             f"adapters at the same module; merge one at a time with only it active")
        for n in names:
            d = self.deltas[n]
            if d.replaces_base:
                continue
            if not d.mergeable:
                raise MergeError(f"{where}: adapter {n!r} ({type(d).__name__}) cannot be merged")
            if w is None:
                raise MergeError(f"{where}: module has no weight to merge into")
            s = 1.0 if scales is None else scales.get(n, 1.0)
            if s == 1.0:
                check_finite(d.merged_weight(self.base), f"{where} (adapter {n!r})")
            elif not d.additive:
                raise MergeError(f"{where}: adapter {n!r} ({type(d).__name__}) is not additive; it cannot be merged "
                                 f"with weight {s:g}")
            else:
                check_finite(w.detach().float() + s * d.delta_weight(self.base).float(), f"{where} (adapter {n!r})")

    @torch.no_grad()
    def merge(self, names: list[str], scales: dict[str, float] | None = None) -> None:
        for n in names:
            if n in self.merged or self.deltas[n].replaces_base:
                continue
            s = 1.0 if scales is None else scales.get(n, 1.0)
            if s == 1.0:
                self.deltas[n].merge_into(self.base)
            else:
                self._add_scaled(n, s)
                self.merge_scales[n] = s
            self.merged.append(n)
        self._state.bump()

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        for n in reversed(list(self.merged)):
            if names is None or n in names:
                s = self.merge_scales.pop(n, 1.0)
                if s == 1.0:
                    self.deltas[n].unmerge_from(self.base)
                else:
                    self._add_scaled(n, -s)
                self.merged.remove(n)
        self._state.bump()

    def _add_scaled(self, name: str, s: float) -> None:
        w = self.base.weight
        w.data.copy_((w.detach().float() + s * self.deltas[name].delta_weight(self.base).float()).to(w.dtype))

    def extra_repr(self) -> str:
        return f"merged={self.merged}" if self.merged else ""
