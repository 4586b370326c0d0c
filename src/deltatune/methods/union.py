"""Unions: several methods attached as ONE adapter, e.g. the MAM adapter (He et al. 2022: prefix tuning
on attention + a scaled parallel adapter on the FFN), or LoRA on attention + a parallel adapter::

    dt.attach(model, [dt.LoRAConfig(targets=["q_proj", "v_proj"]), dt.config("adapter_parallel")], name="mam")

The union activates, disables, merges, saves, loads and deletes as one adapter.

- Each member selects its own modules (its own ``targets``/``exclude``/``layers``) and builds its deltas
  as if attached alone. The union's own ``targets``/``exclude``/``layers`` (usually unset) FILTER what
  every member selected (a saved union records the exact adapted modules there); its ``adapter_dtype``
  applies to every member; its ``modules_to_save`` are saved copies owned by the union (built with the
  first member).
- Where two members adapt the same module, their deltas compose at that site (:class:`UnionDelta`) in
  member order: ``y <- d_i(x, y)`` for i = 0, 1, ..., each seeing the site input ``x`` and the output so
  far, exactly as several active adapters compose at a site. A module saved in full by one member
  (``modules_to_save``) cannot be adapted by another.
- File: deltatune-only (there is no PEFT format for unions): the ``deltatune`` section holds every
  member's config; tensors are keyed ``<module>.<param>`` where one member adapts the module and
  ``<module>.<member index>.<param>`` where several do.
- Merging: works where every member's delta is mergeable (a composed site merges the sum of its members'
  weight deltas; a non-additive member such as DoRA merges only alone at its module); otherwise a
  ``MergeError`` names the member's method, before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import field_serializer, field_validator, model_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta, MergeError
from ..core.registry import config_class, register
from ..core.targeting import ALL_LINEAR, layer_index, matches


class UnionDelta(Delta):
    """The deltas of several union members at one site, applied in member order::

        y' = d_k(x, ... d_j(x, d_i(x, y)))      (i < j < k: the members adapting this module)

    Submodules are named by member index, so the state keys are ``<member index>.<param>``.
    Mergeable when every part is; the merged weight is ``W + sum_i dW_i`` (so all parts must be additive).
    """

    mergeable = True

    def __init__(self, parts: list[tuple[int, Delta]]):
        super().__init__()
        for i, d in parts:
            self.add_module(str(i), d)

    def parts(self) -> list[tuple[str, Delta]]:
        return list(self._modules.items())

    @property
    def additive(self) -> bool:
        return all(d.additive for _, d in self.parts())

    def set_trainable(self, flag: bool) -> None:
        for _, d in self.parts():
            d.set_trainable(flag)  # each part keeps its own frozen parameters frozen

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        for _, d in self.parts():
            y = d(x, y, base)
        return y

    def delta_weight(self, base: nn.Module) -> Tensor:
        for i, d in self.parts():
            if not d.mergeable:
                raise MergeError(f"union member {i} ({type(d).__name__}) cannot be merged into the weights")
        if not self.additive:
            bad = next(f"{i} ({type(d).__name__})" for i, d in self.parts() if not d.additive)
            raise MergeError(f"union member {bad} is non-additive: it cannot be merged together with another "
                             f"member at the same module")
        return sum(d.delta_weight(base).float() for _, d in self.parts())

    def export_state(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, d in self.parts() for k, v in d.export_state().items()}

    def import_state(self, state: dict[str, Tensor], where: str) -> None:
        groups: dict[str, dict[str, Tensor]] = {i: {} for i, _ in self.parts()}
        unexpected = []
        for k, t in state.items():
            i, _, rest = k.partition(".")
            if i in groups and rest:
                groups[i][rest] = t
            else:
                unexpected.append(k)
        if unexpected:
            raise KeyError(f"{where}: unexpected keys {sorted(unexpected)} (expected <member index>.<param>)")
        for i, d in self.parts():
            d.import_state(groups[i], f"{where} (union member {i})")


@register
class UnionConfig(DeltaConfig):
    """Several method configs attached as one adapter. ``members``: configs (or their ``to_dict()`` form)."""

    type: ClassVar[str] = "union"
    composite: ClassVar[bool] = True
    members: list[DeltaConfig]

    @field_validator("members", mode="before")
    @classmethod
    def _configs(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"members must be a list of method configs, got {type(v).__name__}")
        out = []
        for i, m in enumerate(v):
            if isinstance(m, dict):
                if "type" not in m:
                    raise ValueError(f"members[{i}] has no 'type' (the method name)")
                m = config_class(m["type"]).from_dict(m)
            elif not isinstance(m, DeltaConfig):
                raise ValueError(f"members[{i}] is a {type(m).__name__}, not a method config")
            out.append(m)
        return out

    @model_validator(mode="after")
    def _check(self) -> UnionConfig:
        if len(self.members) < 2:
            raise ValueError(f"a union needs at least two member configs, got {len(self.members)}; "
                             f"attach a single config directly")
        for i, m in enumerate(self.members):
            if isinstance(m, UnionConfig):
                raise ValueError(f"members[{i}] is itself a union; list its members directly")
        if self.targets == ALL_LINEAR:
            raise ValueError("a union's targets filter its members' selections; 'all-linear' is not a filter "
                             "(set targets=\"all-linear\" on a member instead)")
        return self

    @field_serializer("members")
    def _dump_members(self, members: list[DeltaConfig]) -> list[dict[str, Any]]:
        return [m.to_dict() for m in members]

    # -- building ------------------------------------------------------------------------------
    def supports(self, module: nn.Module) -> bool:
        return any(m.supports(module) for m in self.members)

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        raise TypeError("a union builds through build() (each member, then composed), not module by module")

    def _keeps(self, path: str) -> bool:
        if self.targets is not None and not matches(self.targets, path):
            return False
        if self.exclude is not None and matches(self.exclude, path):
            return False
        return self.layers is None or layer_index(path, self.layers_pattern) in self.layers

    def build(self, build_one: Callable[[DeltaConfig], dict[str, Delta]]) -> dict[str, Delta]:
        """Build every member with ``build_one`` (DeltaModel's), filter, and compose them per module."""
        built: list[dict[str, Delta]] = []
        for i, m in enumerate(self.members):
            update: dict[str, Any] = {"adapter_dtype": self.adapter_dtype}
            if i == 0 and self.modules_to_save:
                update["modules_to_save"] = list(dict.fromkeys([*(m.modules_to_save or []), *self.modules_to_save]))
            try:
                part = m.model_copy(update=update).build(build_one)
            except (ValueError, KeyError, TypeError) as e:
                raise type(e)(f"union member {i} ({m.type}): {e.args[0] if e.args else e}") from None
            kept = {p: d for p, d in part.items() if d.replaces_base or self._keeps(p)}
            if not any(not d.replaces_base for d in kept.values()):
                spec = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("targets", "exclude", "layers")
                                 if getattr(self, k) is not None)
                raise ValueError(f"the union's {spec} selected no module of member {i} ({m.type})")
            for p, d in kept.items():
                partner = getattr(d, "partner_path", None)
                if partner is not None and partner not in kept:
                    raise ValueError(f"union member {i} ({m.type}): {p!r} works together with {partner!r}, "
                                     f"which the union's filter drops")
            built.append(kept)
        return _compose(built)

    def for_model(self, model: nn.Module) -> UnionConfig:
        return self.model_copy(update={"members": [m.for_model(model) for m in self.members]})

    def saved_config(self) -> UnionConfig:
        return self.model_copy(update={"members": [m.saved_config() for m in self.members]})

    def training_callbacks(self, dm: Any, name: str) -> list[Any]:
        return [cb for m in self.members for cb in m.training_callbacks(dm, name)]


def _compose(built: list[dict[str, Delta]]) -> dict[str, Delta]:
    by_path: dict[str, list[tuple[int, Delta]]] = {}
    for i, part in enumerate(built):
        for p, d in part.items():
            by_path.setdefault(p, []).append((i, d))
    out: dict[str, Delta] = {}
    for p, ds in by_path.items():
        if len(ds) == 1:
            out[p] = ds[0][1]
            continue
        copies = [i for i, d in ds if d.replaces_base]
        if copies:
            other = next(i for i, _ in ds if i != copies[0])
            raise ValueError(f"{p}: union member {copies[0]} saves this module in full (modules_to_save), so "
                             f"member {other} cannot also adapt it")
        out[p] = UnionDelta(ds)
    for c, d in out.items():
        if d.replaces_base:
            inner = [q for q, e in out.items() if q.startswith(c + ".") and not e.replaces_base]
            if inner:
                raise ValueError(f"modules_to_save {c!r} of the union contains {inner[0]!r}, which a member adapts")
    return out
