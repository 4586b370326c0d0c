"""DeltaModel: the facade a user holds.

It owns the wrapped model, the configs of its adapters, and the :class:`SiteState` every Site reads.
Every operation that can fail validates and builds everything first, and only then mutates the model,
so a failing ``add``/``load``/``merge``/``delete`` leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import Block
from .composition import Composition, compose
from .config import DeltaConfig
from .delta import Delta, MergeError, ModuleCopy
from .inputs import InputHook
from .registry import config
from .site import Site, SiteState
from .targeting import select, select_saved

_OWNERS: weakref.WeakKeyDictionary[nn.Module, DeltaModel] = weakref.WeakKeyDictionary()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def owner_of(model: nn.Module) -> DeltaModel | None:
    """The DeltaModel that has adapters attached to ``model``, if any."""
    return model if isinstance(model, DeltaModel) else _OWNERS.get(model)


class DeltaModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, DeltaModel):
            raise TypeError("model is already a DeltaModel; call .add() on it")
        self.model = model
        self._state = SiteState()
        self.configs: dict[str, DeltaConfig] = {}
        self.trainable: dict[str, bool] = {}
        self._requires_grad: dict[str, bool] | None = None  # the base's flags, restored on unload
        self._input_sites: list[Site] = []  # sites holding input-level deltas (prompt/prefix tuning)
        self._input_hook = None  # the forward pre-hook on the wrapped model that applies them
        self._merged_cache: tuple[int, list[str]] = (-1, [])  # (state version, merged adapters): see routing()
        self.training = model.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    # -- running -------------------------------------------------------------------------------
    def forward(self, *args, adapters: list[str | None] | None = None, **kwargs):
        """The wrapped model's forward; ``adapters`` routes each batch row to its own adapter (None = base)."""
        if adapters is None:
            return self.model(*args, **kwargs)
        with self.routing(adapters):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapters: list[str | None] | None = None, **kwargs):
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        if adapters is None:
            return gen(*args, **kwargs)
        with self.routing(adapters):
            return gen(*args, **kwargs)

    @contextlib.contextmanager
    def routing(self, adapters: list[str | None]) -> Iterator[None]:
        """Per-row adapters for every forward inside the block: row i uses ``adapters[i]``."""
        if self.model.training:
            raise RuntimeError("per-row adapter routing is for inference; call .eval() first")
        unknown = sorted({a for a in adapters if a is not None and a not in self.configs})
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.configs)}")
        if self._state.composition is not None:
            raise RuntimeError(f"a composition is active ({self._state.composition.block!r}); per-row routing picks one "
                               f"adapter per row: activate a plain adapter first (dm.activate(name))")
        fused = sorted({a for a in adapters if a is not None and self.configs[a].combines()})
        if fused:
            raise ValueError(f"adapter(s) {fused} are AdapterFusions and cannot be routed per row; use dt.Fuse(...)")
        merged = self._merged_names()
        if merged:
            raise RuntimeError(f"adapter(s) {merged} are merged into the weights; unmerge before per-row routing")
        inputs = sorted({a for a in adapters if a is not None and self._input_level(a)})
        if inputs:
            raise ValueError(f"adapter(s) {inputs} ({', '.join(sorted({self.configs[a].type for a in inputs}))}) act "
                             f"on the model's inputs for the whole batch and cannot be routed per row; run their rows "
                             f"in a separate batch")
        p = next(self.model.parameters())
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is not None:
                groups.setdefault(a, []).append(i)
        st = self._state
        route = {a: torch.tensor(rows, device=p.device) for a, rows in groups.items()}
        st.set_route(route, len(adapters), key=(tuple(adapters), p.device, p.dtype))
        try:
            yield
        finally:
            st.set_route(None)

    def _merged_names(self) -> list[str]:
        """Adapters merged at some site; recomputed only after a state change (merging bumps the state)."""
        st = self._state
        if self._merged_cache[0] != st.version:
            self._merged_cache = (st.version, sorted({n for _, s in self.sites() for n in s.merged}))
        return self._merged_cache[1]

    # -- input-level adapters --------------------------------------------------------------------
    def _input_level(self, name: str) -> bool:
        return any(name in s.deltas and s.deltas[name].input_level for s in self._input_sites)

    def _sync_inputs(self) -> None:
        """Find the sites that hold input-level deltas; the pre-hook exists exactly while there are some."""
        self._input_sites = [s for _, s in self.sites() if any(d.input_level for d in s.deltas.values())]
        if self._input_sites and self._input_hook is None:
            self._input_hook = self.model.register_forward_pre_hook(InputHook(self), with_kwargs=True)
        elif not self._input_sites and self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None

    def _active_input(self) -> tuple[Site, Delta] | None:
        """The active input-level delta and its site, if any (and not disabled or routed per row)."""
        st = self._state
        if st.disabled or st.route is not None:
            return None
        for s in self._input_sites:
            for n in st.active:
                d = s.deltas[n] if n in s.deltas else None
                if d is not None and d.input_level:
                    return s, d
        return None

    @property
    def transforms_inputs(self) -> bool:
        """True when a forward now changes the model's inputs (an active prompt/prefix adapter): code that calls
        parts of the model directly (e.g. the backbone, to run the head itself) must call the whole model."""
        return self._active_input() is not None

    # -- adapters ------------------------------------------------------------------------------
    def add(
        self,
        cfg: DeltaConfig | list[DeltaConfig],
        name: str = "default",
        *,
        trainable: bool = True,
        state: dict[str, Tensor] | None = None,
    ) -> DeltaModel:
        """Attach a new adapter. ``state`` (``<module path>.<param>`` -> tensor) loads saved weights into it.

        The first adapter becomes active; later ones are activated with :meth:`activate`.
        ``cfg`` may be a list of configs: they attach as ONE adapter (a union, ``methods/union.py``).
        """
        if isinstance(cfg, (list, tuple)):
            cfg = config("union", members=list(cfg))
        if not isinstance(cfg, DeltaConfig):
            raise TypeError(f"expected a method config (e.g. LoRAConfig), got {type(cfg).__name__}")
        if not _NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, _ or -)")
        if hasattr(nn.ModuleDict(), name):  # sites keep deltas in a ModuleDict: its attributes can't be keys
            raise ValueError(f"adapter name {name!r} is reserved (an attribute of torch modules, like 'eval' or "
                             f"'train'); pick another name")
        if name in self.configs:
            raise ValueError(f"an adapter named {name!r} already exists; delete it first or pick another name")
        cfg = cfg.for_model(self.model)
        deltas = self._build(cfg)
        if state is not None:
            shared = {k: state[k] for k in cfg.shared_keys if k in state}
            # tensors shared by all the adapter's deltas (VeRA's projections), keyed as in the file
            cfg.import_shared({p: d for p, d in deltas.items() if not d.replaces_base}, shared)
            state = {k: v for k, v in state.items() if k not in shared}
            for path, part in _by_module(state, deltas).items():
                deltas[path].import_state(part, path)
        # nothing below can fail: install
        if self._requires_grad is None:
            self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
            self.model.requires_grad_(False)
            _OWNERS[self.model] = self
        for path, d in deltas.items():
            d.set_trainable(trainable)
            d.train(self.model.training)
            self._site(path).deltas[name] = d
        self.configs[name] = cfg
        self.trainable[name] = trainable
        if not self._state.active:
            self._state.active = (name,)
        self._state.bump()
        self._sync_inputs()
        return self

    def _build(self, cfg: DeltaConfig) -> dict[str, Delta]:
        return cfg.build(self._build_one)  # a union builds each member with _build_one, then composes them

    def _build_one(self, cfg: DeltaConfig) -> dict[str, Delta]:
        sel = select(self.model, cfg, cfg.supports, cfg.default_targets)
        saved = select_saved(self.model, cfg.modules_to_save) if cfg.modules_to_save else {}
        wrapped = dict(self.sites())
        for path in sel.names:
            site = wrapped.get(path)
            if site is not None and any(d.replaces_base for d in site.deltas.values()):
                raise ValueError(f"module {path!r} is saved in full by another adapter; it cannot also be adapted")
        for path in saved:
            inner = [w for w, site in wrapped.items() if (w == path or w.startswith(path + "."))
                     and any(not d.replaces_base for d in site.deltas.values())]
            if inner:
                raise ValueError(f"modules_to_save {path!r} contains {inner[0]!r}, already adapted by another adapter")
        made = cfg.make_deltas(sel.modules)  # one call: a method's deltas at several sites may work together
        deltas: dict[str, Delta] = {}
        for path, m in sel.modules.items():
            deltas[path] = _place(made[path], m, cfg.adapter_dtype)
        for path, m in saved.items():
            deltas[path] = ModuleCopy(m)
        return deltas

    def _site(self, path: str) -> Site:
        parent, attr = self._parent(path)
        child = parent._modules[attr]
        if isinstance(child, Site):
            return child
        site = Site(child, self._state)
        site.training = site.deltas.training = child.training
        parent._modules[attr] = site
        return site

    def _parent(self, path: str) -> tuple[nn.Module, str]:
        *parents, attr = path.split(".")
        m: nn.Module = self.model
        for p in parents:
            m = m._modules[p]
            if isinstance(m, Site):
                m = m.base
        return m, attr

    def sites(self) -> Iterator[tuple[str, Site]]:
        for name, m in self.model.named_modules():
            if isinstance(m, Site):
                yield name, m

    def deltas(self, name: str) -> dict[str, Delta]:
        """The deltas of adapter ``name``, by module path."""
        self._require(name)
        return {p: s.deltas[name] for p, s in self.sites() if name in s.deltas}

    def _require(self, *names: str) -> None:
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise KeyError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.configs)}")

    @property
    def active(self) -> list[str]:
        return list(self._state.active)

    @property
    def composition(self) -> Block | None:
        """The active composition block (``activate(dt.Stack(...))``), or None."""
        comp = self._state.composition
        return None if comp is None else comp.block

    def activate(self, names: str | list[str] | Block) -> None:
        """Make one adapter, or several at once (applied one after another, as ``dt.Stack``), the active ones; or
        activate a composition block (``dt.Stack``, ``dt.Parallel``, ``dt.Average``, ``dt.Fuse``, ``dt.Split``,
        see ``core/blocks.py``)."""
        if isinstance(names, Block):
            self._set_composition(compose(self, names))
            return
        names = [names] if isinstance(names, str) else list(names)
        self._require(*names)
        fused = [n for n in names if self.configs[n].combines()]
        if fused:
            raise ValueError(f"adapter {fused[0]!r} is an AdapterFusion over {self.configs[fused[0]].combines()}; "
                             f"activate it with dm.activate(dt.Fuse(...))")
        merged = {n for _, s in self.sites() for n in s.merged} - set(names)
        if merged:
            raise RuntimeError(f"adapter(s) {sorted(merged)} are merged; unmerge them before deactivating")
        for path, s in self.sites():
            if sum(1 for n in names if n in s.deltas and s.deltas[n].replaces_base) > 1:
                raise ValueError(f"adapters {names} each save their own copy of {path!r}; activate only one")
        inputs = [n for n in dict.fromkeys(names) if self._input_level(n)]
        if len(inputs) > 1:
            raise ValueError(f"adapters {inputs} each act on the model's inputs (virtual tokens, prefixes); "
                             f"activate only one of them at a time (together with any weight-level adapters)")
        self._set_composition(None, tuple(dict.fromkeys(names)))

    def _set_composition(self, comp: Composition | None, active: tuple[str, ...] = ()) -> None:
        st = self._state
        if st.composition is not None:
            st.composition.detach()
        st.composition = comp
        if comp is not None:
            comp.attach(self.model)
        st.active = comp.names if comp is not None else active
        st.bump()

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        for d in self.deltas(name).values():
            d.set_trainable(trainable)
        self.trainable[name] = trainable

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the model is exactly the base model (merged adapters are unmerged meanwhile)."""
        merged = {p: (list(s.merged), dict(s.merge_scales)) for p, s in self.sites() if s.merged}
        for p, s in self.sites():
            if p in merged:
                s.unmerge()
        self._state.disabled = True
        self._state.bump()
        try:
            yield
        finally:
            self._state.disabled = False
            sites = dict(self.sites())
            for p, (names, scales) in merged.items():
                sites[p].merge(names, scales)
            self._state.bump()

    # -- merging -------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights. Checks everything first.

        Under a composition, merges all of it, each delta with its weight (Stack/Parallel/Average of mergeable
        deltas; Fuse and Split are refused)."""
        comp, scales = self._state.composition, None
        if comp is not None:
            if names is not None and sorted(names) != sorted(comp.block.leaves()):
                raise ValueError(f"a composition ({comp.block!r}) merges as a whole; call merge() without names")
            scales = comp.merge_scales(self)
            names = list(scales)
        names = self.active if names is None else names
        self._require(*names)
        inactive = [n for n in names if n not in self._state.active]
        if inactive:
            raise RuntimeError(f"adapter(s) {inactive} are not active; activate before merging")
        todo: dict[str, list[str]] = {}
        tied = _tied_weights(self.model)
        for p, s in self.sites():
            pending = [n for n in names if n in s.deltas and n not in s.merged and not s.deltas[n].replaces_base]
            if pending:
                s.check_mergeable(pending, p, scales)
                w = getattr(s.base, "weight", None)
                if w is not None and len(tied.get(id(w), ())) > 1:
                    raise MergeError(f"{p}: its weight is shared with {sorted(set(tied[id(w)]) - {p})} (tied "
                                     f"weights); merging would change those too. Untie them first, or keep it unmerged")
                todo[p] = pending
        if not todo:
            warnings.warn(f"adapter(s) {names} are already merged; nothing to do", stacklevel=2)
            return
        sites = dict(self.sites())
        for p, pending in todo.items():
            sites[p].merge(pending, scales)

    def unmerge(self, names: list[str] | None = None) -> None:
        for _, s in self.sites():
            s.unmerge(names)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model: original module classes, no wrappers."""
        self.merge()
        return self._unwrap(keep_copies=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the base model with its original outputs."""
        self.unmerge()
        return self._unwrap(keep_copies=False)

    def _unwrap(self, keep_copies: bool) -> nn.Module:
        active = set(self._state.active)
        for path, s in list(self.sites()):
            parent, attr = self._parent(path)
            copies = [d for n, d in s.deltas.items() if d.replaces_base and n in active]
            parent._modules[attr] = copies[0].module if keep_copies and copies else s.base
        self._release()
        return self.model

    def _release(self) -> None:
        if self._requires_grad is not None:
            rec = self._requires_grad
            for n, p in self.model.named_parameters():
                # a parameter created by a merge (a bias on a bias-less layer) follows its module's weight
                sibling = n.rsplit(".", 1)[0] + ".weight" if "." in n else "weight"
                p.requires_grad_(rec[n] if n in rec else rec.get(sibling, p.requires_grad))
        self._requires_grad = None
        self.configs.clear()
        self.trainable.clear()
        self._set_composition(None)
        self._sync_inputs()
        _OWNERS.pop(self.model, None)

    def delete(self, name: str) -> None:
        """Remove every trace of adapter ``name``; sites left without deltas are unwrapped."""
        self._require(name)
        comp = self._state.composition
        if comp is not None and name in comp.names:
            raise RuntimeError(f"adapter {name!r} is part of the active composition {comp.block!r}; activate something "
                               f"else first")
        users = [n for n, c in self.configs.items() if name in c.combines()]
        if users:
            raise RuntimeError(f"adapter {name!r} is fused by {users}; delete the fusion(s) first")
        merged = [p for p, s in self.sites() if name in s.merged]
        if merged:
            raise RuntimeError(f"adapter {name!r} is merged (e.g. at {merged[0]!r}); unmerge it before deleting")
        for path, s in list(self.sites()):
            if name in s.deltas:
                del s.deltas[name]
                if not len(s.deltas):
                    parent, attr = self._parent(path)
                    parent._modules[attr] = s.base
        del self.configs[name]
        del self.trainable[name]
        self._state.active = tuple(n for n in self._state.active if n != name)
        self._state.bump()
        self._sync_inputs()
        if not self.configs:
            self._release()

    # -- counting, saving ----------------------------------------------------------------------
    def num_parameters(self, **hf_kwargs) -> tuple[int, int] | int:
        """(trainable, total) parameter counts; shared parameters are counted once.

        Called with transformers' keyword arguments (``only_trainable``, ``exclude_embeddings``, as its
        Trainer does), it answers as the wrapped model's ``num_parameters`` would: one int.
        """
        if hf_kwargs:
            return self.model.num_parameters(**hf_kwargs)
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def adapter_state(self, name: str) -> dict[str, dict[str, Tensor]]:
        """Module path -> the tensors adapter ``name`` saves there."""
        return {p: d.export_state() for p, d in self.deltas(name).items()}

    def save(self, path, names: list[str] | None = None) -> None:
        """Write each adapter in the PEFT format (``default`` at ``path``, others in ``path/<name>``)."""
        _store("save")(self, path, names)

    def load(self, path, name: str | None = None, *, trainable: bool = False, allow_pickle: bool = False) -> str:
        """Load a saved adapter under ``name`` (default ``"default"``); returns the name."""
        return _store("load")(self, path, name, trainable=trainable, allow_pickle=allow_pickle)


# Files are io's business, not the core's: io/adapter.py registers its save and load here when imported (importing
# ``deltatune`` does), so that DeltaModel.save/load work without the core importing the layer above it.
_STORE: dict[str, Callable[..., Any]] = {}


def register_store(save: Callable[..., None], load: Callable[..., str]) -> None:
    """Install the functions behind :meth:`DeltaModel.save` and :meth:`DeltaModel.load` (io/adapter.py's)."""
    _STORE.update(save=save, load=load)


def _store(op: str) -> Callable[..., Any]:
    try:
        return _STORE[op]
    except KeyError:
        raise RuntimeError("no adapter file format is registered: import deltatune (deltatune.io.adapter)") from None


def _tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """id(weight) -> the module paths holding it (several when weights are tied)."""
    holders: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, Site):
            continue
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None:
            holders.setdefault(id(w), []).append(name[:-5] if name.endswith(".base") else name)
    return holders


def _by_module(state: dict[str, Tensor], deltas: dict[str, Delta]) -> dict[str, dict[str, Tensor]]:
    """Split ``<path>.<param>`` keys by the module each belongs to (the longest path that prefixes it)."""
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in deltas}
    unexpected = []
    for key, t in state.items():
        bits = key.split(".")
        for i in range(len(bits) - 1, 0, -1):
            path = ".".join(bits[:i])
            if path in parts:
                parts[path][".".join(bits[i:])] = t
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise KeyError(f"the file has weights for module(s) the config does not select: {unexpected[:5]}")
    missing = [p for p, v in parts.items() if not v]
    if missing:
        raise KeyError(f"the file has no weights for module(s) {missing[:5]}, which the config selects")
    return parts


def _place(d: Delta, base: nn.Module, policy: str) -> Delta:
    """Put a delta on the base's device, in the dtype the policy asks for."""
    w = next(base.parameters(), None)
    if w is None:
        return d
    if policy == "base" or not w.dtype.is_floating_point:
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
    else:
        dtype = getattr(torch, policy)
    return d.to(device=w.device, dtype=dtype)
