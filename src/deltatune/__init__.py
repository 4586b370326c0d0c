"""deltatune: parameter-efficient adaptation of pretrained models.

One idea, a delta at a site; four nouns: Config, Delta, Site, DeltaModel (see docs/DESIGN.md).
"""

from __future__ import annotations

import os

from torch import nn

from . import methods  # noqa: F401  (importing it registers every built-in method)
from ._version import __version__ as __version__
from .core.blocks import Average, Block, Fuse, Parallel, Split, Stack
from .core.config import DeltaConfig
from .core.delta import Delta, MergeError, ModuleCopy
from .core.model import DeltaModel, owner_of
from .core.registry import available_methods, config, config_class, register
from .core.site import Site
from .core.targeting import inspect
from .io.adapter import AdapterFileError
from .merge.combine import combine, negate
from .methods.lora import LoRAConfig
from .methods.sparse_ft import (
    calibrate_sparse,  # GPS: a sparse_ft adapter's indices from a few batches' gradients
)


def attach(model: nn.Module, cfg: DeltaConfig | list[DeltaConfig], name: str = "default", *,
           trainable: bool = True) -> DeltaModel:
    """Attach a delta to ``model`` (base weights frozen) and return the DeltaModel that holds it.

    A list of configs attaches as ONE adapter, a union of methods (e.g. MAM: prefix tuning + a
    parallel adapter): it activates, merges, saves and deletes as one.

    If ``model`` already has adapters, the new one is added to its existing DeltaModel.
    """
    dm = owner_of(model) or DeltaModel(model)
    dm.add(cfg, name, trainable=trainable)
    return dm


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 trainable: bool = False, allow_pickle: bool = False) -> DeltaModel:
    """Load a saved adapter (deltatune's or PEFT's) onto ``model``; frozen unless ``trainable``."""
    dm = owner_of(model) or DeltaModel(model)
    dm.load(path, name, trainable=trainable, allow_pickle=allow_pickle)
    return dm


def load_pretrained(spec, **kwargs):
    """Load a model and tokenizer: ``"smollm2-135m"``, ``"minilm-l6"``, a local HF folder or a .gguf file."""
    from .models import load_pretrained as _load

    return _load(spec, **kwargs)


def __getattr__(name: str):
    """Every registered method's Config class by its name: ``dt.IA3Config``, ``dt.VeRAConfig``, ..."""
    for method in available_methods():
        cls = config_class(method)
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


__all__ = [
    "AdapterFileError", "Average", "Block", "Delta", "DeltaConfig", "DeltaModel", "Fuse", "LoRAConfig", "MergeError",
    "ModuleCopy", "Parallel", "Site", "Split", "Stack", "attach", "available_methods", "calibrate_sparse", "combine", "config", "inspect", "load_adapter", "load_pretrained",
    "negate", "register",
]
