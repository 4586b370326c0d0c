"""The method registry: a method registers its Config class; ``config(name, **kw)`` builds one.

The built-in methods register when ``deltatune`` is imported (its ``__init__`` imports ``deltatune.methods``);
the core itself never imports a method.
"""

from __future__ import annotations

from typing import Any

from .config import DeltaConfig

_METHODS: dict[str, type[DeltaConfig]] = {}


def register(cls: type[DeltaConfig]) -> type[DeltaConfig]:
    """Class decorator: make a Config class (and so its method) available by its ``type`` name."""
    if cls.type in _METHODS and _METHODS[cls.type] is not cls:
        raise ValueError(f"method {cls.type!r} is already registered by {_METHODS[cls.type].__name__}")
    _METHODS[cls.type] = cls
    return cls


def config_class(name: str) -> type[DeltaConfig]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def config(name: str, **kwargs: Any) -> DeltaConfig:
    """Build the config of any registered method: ``config("lora", r=8)``."""
    return config_class(name)(**kwargs)


def available_methods() -> list[str]:
    return sorted(_METHODS)

