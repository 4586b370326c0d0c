"""The adapter registry: adapters are the sub-folders of one directory, loaded on demand into one DeltaModel.

A name is a plain identifier (``[A-Za-z0-9_.-]+``, never ``..``) and resolves only inside the directory: the
resolved folder, and the files in it, must stay inside the resolved directory, so neither ``../x``, an absolute
path nor a symlink pointing out of it can reach another file. Loaded adapters live in an LRU cache bounded by
count and by bytes; an adapter pinned by a running request is never evicted.

The DeltaModel's own adapter names must be Python-like identifiers, so each folder name is mapped to an internal
name (``srv0``, ``srv1``, ...); only the registry knows the mapping.

Loading and unloading change the model, so they must run on the thread that runs the model (the engine's
worker); the bookkeeping is under a lock so handlers can read it from any thread.

An adapter whose files were refused is remembered with the files' sizes and modification times: until they
change, a request for it gets the same answer without reading or building anything again (a client retrying a
broken adapter costs the running batch nothing).
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..core.model import DeltaModel
from ..io.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class AdapterError(Exception):
    """A request about an adapter that cannot be served; ``status`` is the HTTP status to answer with."""

    status = 400
    code = "invalid_adapter"

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status or self.status
        self.code = code or self.code


class CacheFull(AdapterError):
    """Every loaded adapter is in use by a running request: retry when one finishes."""

    status = 503
    code = "adapter_cache_full"


@dataclass
class Loaded:
    internal: str
    nbytes: int
    pins: int = 0
    evicted_for: list[str] = field(default_factory=list)


class AdapterRegistry:
    """Adapters of ``root`` on ``dm``: ``acquire``/``release`` around a request, ``load``/``unload`` for admins.

    Args:
        dm: the DeltaModel serving them (the base model wrapped, possibly with no adapter yet).
        root: the adapters directory; each sub-folder with an ``adapter_config.json`` is an adapter.
        max_adapters: at most this many loaded at once.
        max_bytes: at most this many bytes of adapter tensors loaded at once.
    """

    def __init__(self, dm: DeltaModel, root: str | Path, *, max_adapters: int = 16, max_bytes: int = 1 << 30):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: adapters directory not found")
        if max_adapters < 1 or max_bytes < 1:
            raise ValueError(f"max_adapters and max_bytes must be >= 1, got {max_adapters} and {max_bytes}")
        self.dm = dm
        self.root = root.resolve()
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.evictions = 0
        self._refused: OrderedDict[str, tuple[tuple, AdapterError]] = OrderedDict()  # name -> (files, answer)

    # -- names and files ---------------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        """The adapter folder ``name`` names, checked to stay inside the directory; raises AdapterError."""
        if not isinstance(name, str) or not NAME.match(name) or ".." in name or name == "." or len(name) > 128:
            shown = name if not isinstance(name, str) or len(name) <= 140 else name[:120] + "..."
            raise AdapterError(f"invalid adapter name {shown!r}: use up to 128 letters, digits, '_', '-' and '.', "
                               f"without '..'", code="invalid_adapter_name")
        path = (self.root / name).resolve()
        if not self._inside(path) or path == self.root:
            raise AdapterError(f"adapter {name!r} resolves outside the adapters directory", status=403,
                               code="adapter_outside_directory")
        if not (path / CONFIG_NAME).exists():
            raise AdapterError(f"unknown adapter {name!r}: no such adapter folder (GET /v1/models lists them)", status=404,
                               code="adapter_not_found")
        for f in (CONFIG_NAME, WEIGHTS_NAME):
            if (path / f).exists() and not self._inside((path / f).resolve()):
                raise AdapterError(f"adapter {name!r}: {f} resolves outside the adapters directory", status=403,
                                   code="adapter_outside_directory")
        return path

    def _inside(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def available(self) -> list[str]:
        """Names of the adapters in the directory (valid names whose folder stays inside it)."""
        out = []
        for p in sorted(self.root.iterdir()):
            name = p.name
            if not NAME.match(name) or ".." in name:
                continue
            try:
                self.folder(name)
            except AdapterError:
                continue
            out.append(name)
        return out

    def is_available(self, name: str) -> bool:
        try:
            self.folder(name)
            return True
        except AdapterError:
            return False

    # -- state ------------------------------------------------------------------------------------
    def loaded(self) -> dict[str, int]:
        """Loaded adapter -> its bytes, least recently used first."""
        with self._lock:
            return {n: e.nbytes for n, e in self._loaded.items()}

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._loaded.values())

    def internal(self, name: str) -> str:
        with self._lock:
            return self._loaded[name].internal

    # -- the worker thread's operations -----------------------------------------------------------
    def acquire(self, name: str) -> str:
        """Pin ``name`` for a request (loading it if needed); returns its name inside the DeltaModel."""
        with self._lock:
            missing = name not in self._loaded
        if missing:
            self.load(name)  # only this (the worker) thread changes what is loaded: nothing can come between
        with self._lock:
            entry = self._loaded[name]
            self._loaded.move_to_end(name)
            entry.pins += 1
            return entry.internal

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def load(self, name: str) -> dict:
        """Load ``name`` (no-op if loaded), evicting least-recently-used unpinned adapters to make room.

        The lock is held only for the bookkeeping, never while files are read or deltas built: handlers reading
        the registry (``/health``, ``/metrics``, ``/v1/models``) do not wait for a load.
        """
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return {"name": name, "loaded": True, "already_loaded": True, "bytes": self._loaded[name].nbytes,
                        "evicted": []}
            pinned = [e for e in self._loaded.values() if e.pins]
            pinned_bytes = sum(e.nbytes for e in pinned)
        folder = self.folder(name)
        files = _signature(folder)
        with self._lock:
            refused = self._refused.get(name)
        if refused is not None and refused[0] == files:
            e = refused[1]
            raise type(e)(str(e), e.status, e.code)
        if len(pinned) >= self.max_adapters:
            raise CacheFull(f"cannot load adapter {name!r}: all {len(pinned)} loaded adapters "
                            f"(--max-adapters {self.max_adapters}) are in use; retry shortly")
        weights = folder / WEIGHTS_NAME  # its size estimates the tensors: no load only to find no room
        estimate = weights.stat().st_size if weights.is_file() else 0
        if estimate <= self.max_bytes < pinned_bytes + estimate:
            raise CacheFull(f"cannot load adapter {name!r} (~{estimate} bytes): the adapters in use fill the "
                            f"cache (--max-adapter-bytes {self.max_bytes}); retry shortly")
        try:
            nbytes, internal = self._build(name, folder)
        except AdapterError as e:
            if not isinstance(e, CacheFull):  # a property of the files, not of the moment
                with self._lock:
                    self._refused[name] = (files, e)
                    self._refused.move_to_end(name)
                    while len(self._refused) > _REFUSED_KEPT:
                        self._refused.popitem(last=False)
            raise
        with self._lock:
            self._refused.pop(name, None)
            evicted = []
            while len(self._loaded) >= self.max_adapters or self.loaded_bytes + nbytes > self.max_bytes:
                victim = self._evictable()
                if victim is None:
                    self.dm.delete(internal)
                    raise CacheFull(f"cannot load adapter {name!r} ({nbytes} bytes): the adapters in use fill the "
                                    f"cache (--max-adapter-bytes {self.max_bytes}); retry shortly")
                self._drop(victim)
                evicted.append(victim)
                self.evictions += 1
            self._loaded[name] = Loaded(internal, nbytes)
            return {"name": name, "loaded": True, "already_loaded": False, "bytes": nbytes, "evicted": evicted}

    def _build(self, name: str, folder: Path) -> tuple[int, str]:
        """Load the folder into the model as a new internal adapter, refusing what this server cannot serve."""
        internal = f"srv{next(self._ids)}"
        try:
            self.dm.load(folder, internal)
        except (AdapterFileError, ValueError, KeyError, FileNotFoundError, OSError) as e:
            msg = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)).replace(str(folder), name)
            raise AdapterError(f"adapter {name!r} cannot be loaded: {msg}", code="invalid_adapter_file") from None
        deltas = self.dm.deltas(internal)
        if any(d.input_level for d in deltas.values()):
            cfg_type = self.dm.configs[internal].type
            self.dm.delete(internal)
            raise AdapterError(f"adapter {name!r} is {cfg_type}, an input-level method (virtual tokens or "
                               f"prefixes for the whole batch); it cannot be routed per row, so this server "
                               f"does not serve it", code="adapter_not_routable")
        nbytes = _nbytes(deltas.values())
        if nbytes > self.max_bytes:
            self.dm.delete(internal)
            raise AdapterError(f"adapter {name!r} needs {nbytes} bytes, more than --max-adapter-bytes "
                               f"{self.max_bytes}", status=413, code="adapter_too_large")
        return nbytes, internal

    def unload(self, name: str) -> dict:
        """Free ``name``; refused (409) while a running request uses it."""
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None:
                self.folder(name)  # a bad or unknown name gets its own error
                raise AdapterError(f"adapter {name!r} is not loaded", status=404, code="adapter_not_loaded")
            if entry.pins:
                raise AdapterError(f"adapter {name!r} is in use by {entry.pins} running request(s); retry when "
                                   f"they finish", status=409, code="adapter_in_use")
            self._drop(name)
            return {"name": name, "unloaded": True}

    def _evictable(self) -> str | None:
        return next((n for n, e in self._loaded.items() if e.pins == 0), None)

    def _drop(self, name: str) -> None:
        entry = self._loaded.pop(name)
        self.dm.delete(entry.internal)


_REFUSED_KEPT = 1024  # refused adapters remembered (least recently refused forgotten first)


def _signature(folder: Path) -> tuple:
    """What identifies the files of an adapter folder without reading them: each file's size and mtime."""
    out = []
    for p in sorted(folder.iterdir()):
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _nbytes(deltas) -> int:
    seen: set[int] = set()
    total = 0
    for d in deltas:
        for t in [*d.parameters(), *d.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
