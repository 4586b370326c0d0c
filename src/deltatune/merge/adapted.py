"""``model+adapter`` inputs: an adapter folder applied to each tensor of a checkpoint as it is read.

The adapter is applied by deltatune's own method code, one module at a time, so every weight-level method
merges exactly as :meth:`DeltaModel.merge` would merge it (LoRA: ``W' = W + s B A``, ``s = alpha / r``;
DoRA, IA3, OFT, ... their own ``merge_into``), without ever holding the model:

- the model's module tree is built on the ``meta`` device from the checkpoint's ``config.json`` (no
  memory), and the adapter's config selects its modules there, as :meth:`DeltaModel.add` does;
- every delta is built and loaded up front (adapter-sized), which checks the file against the modules'
  shapes before any output exists;
- when a tensor of an adapted module is read (``<module>.weight`` or ``.bias``), the module's tensors are
  read into a CPU copy of that one module, the delta is merged into it, and the result is returned (the
  last module is cached, so its weight and bias cost one merge).

Refused with an error naming the method: deltas that are not mergeable (activation adapters, prompt and
prefix tuning) and adapters with ``modules_to_save`` (whole modules, not deltas).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.delta import Delta, check_finite
from ..core.targeting import select
from ..io.adapter import AdapterFileError, read_config, read_weights
from ..models import meta_model
from .shards import Checkpoint


def _empty_copy(module: nn.Module) -> nn.Module:
    """An uninitialised CPU copy of a meta module (untouched pages cost no resident memory)."""
    return copy.deepcopy(module).to_empty(device="cpu")


class AdapterOnRead:
    """Apply the adapter in ``adapter`` to the tensors of ``ckpt`` as they are read."""

    def __init__(self, adapter: Path, ckpt: Checkpoint, allow_pickle: bool = False):
        if not adapter.is_dir():
            raise FileNotFoundError(f"{adapter}: adapter folder not found")
        self.adapter = adapter
        cfg = read_config(adapter)
        self.method = cfg.type
        if cfg.composite:
            raise ValueError(f"{adapter}: a '{cfg.type}' adapter (several methods as one) cannot be applied on "
                             f"read; merge it into the model first (deltatune merge-adapter)")
        if cfg.modules_to_save:
            raise ValueError(f"{adapter}: the adapter saves whole modules ({cfg.modules_to_save}); merge it into "
                             f"the model first (deltatune merge-adapter)")
        state = read_weights(adapter, allow_pickle, cfg.peft_prefix)
        model = meta_model(ckpt.folder)
        cfg = cfg.for_model(model)
        sel = select(model, cfg, cfg.supports, cfg.default_targets)
        self.modules: dict[str, nn.Module] = dict(sel.modules)
        self.owner: dict[str, str] = {}  # tensor name -> adapted module path
        for path, m in self.modules.items():
            for p, param in m.named_parameters(recurse=False):
                name = f"{path}.{p}"
                info = ckpt.tensors.get(name)
                if info is None:
                    raise ValueError(f"{adapter}: adapts {path!r}, but {ckpt.path} has no tensor {name!r}")
                if info.shape != tuple(param.shape):
                    raise ValueError(f"{adapter}: {name} is {info.shape} in {ckpt.path}, but config.json "
                                     f"makes it {tuple(param.shape)}")
                self.owner[name] = path
        shared = {k: state.pop(k) for k in cfg.shared_keys if k in state}
        parts = _by_module(state, list(self.modules), adapter)
        try:
            if cfg.shared_keys:  # deltas that share tensors (VeRA) are built together; shapes only, no values
                self.deltas = cfg.make_deltas({p: _empty_copy(m) for p, m in self.modules.items()})
                cfg.import_shared(self.deltas, shared)
            else:  # one at a time: a method may read the weight at build time (DoRA's norm)
                self.deltas = {p: cfg.make_deltas({p: _empty_copy(m)})[p] for p, m in self.modules.items()}
        except (KeyError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise AdapterFileError(f"{adapter}: does not fit {ckpt.path}: {msg}") from None
        for path, d in self.deltas.items():
            _check_mergeable(d, cfg.type, adapter)
            try:
                d.import_state(parts.get(path, {}), path)
            except (KeyError, ValueError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise AdapterFileError(f"{adapter}: does not fit {ckpt.path}: {msg}") from None
            d.eval()
        self._cache: dict[str, Tensor] = {}

    def touches(self, name: str) -> bool:
        return name in self.owner

    def apply(self, name: str, read: Callable[[str], Tensor]) -> Tensor:
        """Tensor ``name`` with the adapter merged in; ``read(n)`` reads tensor ``n`` of the checkpoint."""
        if name not in self._cache:
            path = self.owner[name]
            module = _empty_copy(self.modules[path])
            for p, _ in list(module.named_parameters(recurse=False)):
                module._parameters[p] = nn.Parameter(read(f"{path}.{p}").clone(), requires_grad=False)
            with torch.no_grad():
                self.deltas[path].merge_into(module)
            self._cache = {f"{path}.{p}": t.detach() for p, t in module.named_parameters(recurse=False)}
            for n, t in self._cache.items():
                if t.is_floating_point():
                    check_finite(t, f"{self.adapter} on {n}")
        return self._cache[name]


def _check_mergeable(d: Delta, method: str, adapter: Path) -> None:
    if not d.mergeable or d.input_level or d.replaces_base:
        raise ValueError(f"{adapter}: '{method}' deltas ({type(d).__name__}) cannot be merged into the weights, "
                         f"so they cannot be applied to a checkpoint")


def _by_module(state: dict[str, Tensor], paths: list[str], adapter: Path) -> dict[str, dict[str, Tensor]]:
    """Split ``<module>.<param>`` keys by adapted module (the longest matching path wins)."""
    order = sorted(paths, key=len, reverse=True)
    out: dict[str, dict[str, Tensor]] = {}
    stray = []
    for k, t in state.items():
        path = next((p for p in order if k.startswith(p + ".")), None)
        if path is None:
            stray.append(k)
        else:
            out.setdefault(path, {})[k[len(path) + 1:]] = t
    if stray:
        raise AdapterFileError(f"{adapter}: tensors for modules the adapter's config does not select in this "
                               f"model: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
    return out
