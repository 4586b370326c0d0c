"""Putting it together: model + adapters directory -> app, and running it with uvicorn (foreground or a thread)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path

from fastapi import FastAPI
from torch import nn

from ..core.model import DeltaModel
from ..models import load_pretrained
from .adapter_cache import AdapterRegistry
from .app import Limits, create_app
from .engine import Engine
from .metrics import Metrics

API_KEY_ENV = "DELTATUNE_API_KEY"
log = logging.getLogger("deltatune.serve")


def build_app(model: nn.Module, tokenizer, adapters: str | os.PathLike, *, model_name: str = "base",
              api_key: str | None = None, max_batch: int = 8, batch_wait_ms: float = 10.0, max_adapters: int = 16,
              max_adapter_bytes: int = 1 << 30, limits: Limits | None = None, preload: list[str] | None = None
              ) -> FastAPI:
    """An app serving ``model`` (a plain model) with the adapters in the folder ``adapters``.

    ``model_name`` is the id clients send as ``model`` (``NAME`` or ``NAME:ADAPTER``); ``preload`` names adapters
    to load before the first request. The engine starts and stops with the app's lifespan.
    """
    if isinstance(model, DeltaModel) or getattr(model, "generate", None) is None:
        raise TypeError("build_app needs a plain causal language model (adapters come from the adapters folder)")
    if not model_name or ":" in model_name:
        raise ValueError(f"model_name {model_name!r} must be non-empty and contain no ':'")
    dm = DeltaModel(model.eval())
    registry = AdapterRegistry(dm, adapters, max_adapters=max_adapters, max_bytes=max_adapter_bytes)
    for name in preload or []:
        registry.load(name)
    engine = Engine(dm, tokenizer, registry, max_batch=max_batch, batch_wait_ms=batch_wait_ms, metrics=Metrics())
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return create_app(engine, model_name, api_key=api_key, limits=limits, context=context)


def served_name(spec: str | os.PathLike) -> str:
    """The id a model spec is served as: a path's file or folder name without suffix, else the spec itself."""
    p = Path(spec)
    name = (p.stem if p.suffix == ".gguf" else p.name) if p.exists() else str(spec)
    return name.replace(":", "-") or "base"


def serve(model: str, adapters: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, log_level: str = "info", **kwargs) -> None:
    """Load ``model`` (a short name, HF folder or .gguf) and serve it until interrupted (``deltatune serve``)."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not _loopback(host):
        warnings.warn(f"serving on {host} without an API key: anyone who can reach it can use it and load or "
                      f"unload adapters (set --api-key or {API_KEY_ENV})", stacklevel=2)
    kwargs["limits"] = loopback_limits(host, kwargs.get("limits"))
    m, tok = load_pretrained(model, task="causal-lm")
    app = build_app(m, tok, adapters, model_name=model_name or served_name(model), api_key=api_key, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def loopback_limits(host: str, limits: Limits | None) -> Limits:
    """A server bound to a loopback address answers only to its own names (against DNS rebinding), unless the
    limits already name the hosts it serves."""
    limits = limits or Limits()
    if limits.allowed_hosts is None and _loopback(host):
        limits = dataclasses.replace(limits, allowed_hosts=("localhost", "127.0.0.1", "::1", host))
    return limits


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class BackgroundServer:
    """``with BackgroundServer(app) as s: httpx.get(s.url + "/health")``: uvicorn in a thread, on a free port.

    The socket is bound before the thread starts (port 0 = any free port), so there is no race for the port.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        self.app, self.host, self.port, self.timeout = app, host, port, timeout
        self.server = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
