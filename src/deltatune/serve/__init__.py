"""Many adapters, one base: an OpenAI-compatible server with cross-adapter batching (needs the ``serve`` extra).

- :mod:`.adapter_cache`: adapters are sub-folders of one directory, loaded on demand, LRU-evicted by count and bytes;
- :mod:`.engine`: one worker thread, dynamic and continuous batching with per-row adapter routing;
- :mod:`.app`: the FastAPI app (completions, chat, streaming, models, adapter load/unload, health, metrics);
- :mod:`.server`: build the app from a model and run it (``deltatune serve``).

Only the registry, engine and rows import nothing beyond torch and transformers; the app needs FastAPI.
"""

from __future__ import annotations

from .adapter_cache import AdapterError, AdapterRegistry
from .engine import Engine
from .metrics import Metrics
from .rows import Event, GenRequest

__all__ = ["AdapterError", "AdapterRegistry", "Engine", "Event", "GenRequest", "Metrics", "build_app", "serve"]


def __getattr__(name: str):
    if name in ("build_app", "serve", "BackgroundServer"):  # these import FastAPI / uvicorn
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'deltatune.serve' has no attribute {name!r}")
