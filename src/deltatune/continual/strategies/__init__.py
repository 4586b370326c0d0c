"""Continual-learning strategies, one file each; importing this package registers them all (as ``methods/``)."""

import importlib
import pkgutil

from .base import STRATEGIES, Strategy, make_strategy, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["STRATEGIES", "Strategy", "make_strategy", "register"]
