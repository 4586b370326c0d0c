"""``deltatune doctor``: what a bug report needs first, gathered as plain data (the command line prints it).

Python, torch, transformers and peft versions, threads and device; each embedded model (installed, its pinned
release, files intact by sha256, and whether it loads); each optional extra (``serve``, ``test``) with every
requirement's installed version against deltatune's declared range; and the name the installed transformers gives
the KV cache argument (``core/kv.py``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from packaging.requirements import Requirement

from .core.kv import cache_name
from .models import EMBEDDED_MODELS, embedded_path, load_pretrained


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not installed, where that is allowed (an optional extra)
    detail: str


@dataclass
class Report:
    environment: dict[str, str]
    models: list[Check] = field(default_factory=list)
    extras: dict[str, list[Check]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every embedded model loads, and every requirement installed is in its declared range."""
        return all(c.ok for c in self.models) and all(c.ok is not False for cs in self.extras.values() for c in cs)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, str]:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda":
        device += f" ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    try:
        kv_arg = cache_name(transformers.LlamaForCausalLM)  # the class will do: only its forward's signature is read
    except Exception as e:  # the report says why, whatever it is
        kv_arg = f"unknown: {e}"
    return {
        "deltatune": _version("deltatune") or "not installed (running from source)",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (cuda {torch.version.cuda or 'none'})",
        "transformers": transformers.__version__,
        "peft": _version("peft") or "not installed",
        "threads": f"{torch.get_num_threads()} torch threads, {_cpus()} CPUs",
        "device": device,
        "kv cache argument": kv_arg,
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_model(name: str, load: bool) -> Check:
    entry = EMBEDDED_MODELS[name]
    try:
        embedded_path(name)  # installed, and its files match the pinned sha256
    except OSError as e:
        return Check(name, False, str(e))
    installed = _version(entry.pip)
    detail = f"{entry.pip} {installed}, files match sha256"
    if installed != entry.version:
        return Check(name, False, f"{detail}, but the pinned release is {entry.version}")
    if load:
        t = time.perf_counter()
        try:
            model, _ = load_pretrained(name)
        except Exception as e:  # the report says why, whatever it is
            return Check(name, False, f"{detail}; does not load: {type(e).__name__}: {e}")
        n = sum(p.numel() for p in model.parameters())
        detail += f"; loads ({type(model).__name__}, {n / 1e6:.1f}M parameters, {time.perf_counter() - t:.1f} s)"
    return Check(name, True, detail)


def check_extras(dist: str = "deltatune") -> dict[str, list[Check]]:
    """Each requirement of ``dist`` by group (``core``, then each optional extra): installed, and in range.

    A missing core requirement is a failure; a missing optional one only says the extra is not installed.
    """
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, list[Check]] = {}
    for line in requires:
        req = Requirement(line)
        group = "core" if req.marker is None else next(
            (e for e in ("serve", "test") if req.marker.evaluate({"extra": e})), None)
        if group is None:  # the "models" extra: the embedded models, checked above
            continue
        have = _version(req.name)
        if have is None:
            check = Check(req.name, False if group == "core" else None, f"not installed (wants {req.specifier})")
        elif req.specifier.contains(have, prereleases=True):
            check = Check(req.name, True, have)
        else:
            check = Check(req.name, False, f"{have}, outside the declared {req.specifier}")
        out.setdefault(group, []).append(check)
    return out


def diagnose(load: bool = True) -> Report:
    return Report(environment(), [check_model(n, load) for n in EMBEDDED_MODELS], check_extras())
