"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

A checkpoint is a folder ``checkpoints/step-N/``. It is assembled under a temporary name, its files and the
folder fsynced, and renamed into place once (the parent fsynced too), with ``trainer_state.json`` written last,
so a run killed at any moment leaves either a complete checkpoint or none. ``manifest.json`` records every file's
size and sha256: resuming checks them and falls back, with a warning, to the newest checkpoint that is intact
(a disk that lost what was not yet on it, a file truncated or changed since). Nothing here is pickled: tensors go
to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io.adapter import atomic_write, file_sha256, fsync, save_adapter

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _split_hook_states(states: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Training hooks' states by hook key: their tensors (as ``key/name``) for safetensors, the rest for JSON."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for hook, st in states.items():
        rest[hook] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{hook}/{k}"] = v.detach().cpu().contiguous()
            else:
                rest[hook][k] = v
    return tensors, rest


def _join_hook_states(tensors: dict[str, torch.Tensor], rest: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {hook: dict(st) for hook, st in rest.items()}
    for key, t in tensors.items():
        hook, k = key.split("/", 1)
        out.setdefault(hook, {})[k] = t
    return out


def save_checkpoint(folder: Path, dm, adapter: str, opt, sched, trainer_state: dict[str, Any],
                    hook_states: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write checkpoint ``folder`` (e.g. .../checkpoints/step-50) atomically; returns it. ``hook_states``: the
    ``state_dict()`` of each training hook with state, by a key naming the hook (class name and occurrence)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(dm, adapter, tmp)  # a loadable adapter, for users
    raw = {f"{p}.{k}": v.detach().cpu().contiguous()  # exact training state (e.g. PiSSA unconverted)
           for p, d in dm.deltas(adapter).items() for k, v in d.state_dict().items()}
    save_file(raw, str(tmp / "delta_state.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    hook_tensors, hook_rest = _split_hook_states(dict(hook_states or {}))
    save_file(hook_tensors, str(tmp / "hooks.safetensors"))
    pystate = random.getstate()
    extra = {"optimizer": opt_meta, "scheduler": sched.state_dict(),
             "python_rng": [pystate[0], list(pystate[1]), pystate[2]], "hooks": hook_rest}
    (tmp / "extra_state.json").write_text(json.dumps(extra))
    files = sorted(f for f in tmp.iterdir() if f.is_file())
    manifest = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    atomic_write(tmp / STATE_FILE, lambda f: f.write_text(json.dumps(trainer_state, indent=2)))
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    fsync(folder.parent)
    return folder


def damage(folder: Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (None when intact): a missing state file, or a file whose size or
    sha256 differs from its manifest. Checkpoints written before manifests existed are taken as they are."""
    if not (folder / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    if not (folder / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in manifest.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['size']}"
        if file_sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under ``root``; newer damaged ones are skipped with a warning naming the
    checkpoint and what is wrong (see :func:`damage`)."""
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]), reverse=True)
    for p in steps:
        problem = damage(p)
        if problem is None:
            return p
        warnings.warn(f"checkpoint {p} is damaged ({problem}); falling back to an older one", RuntimeWarning,
                      stacklevel=2)
    return None


def load_checkpoint(folder: Path, dm, adapter: str, opt, sched) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Restore adapter weights, optimizer, scheduler and RNG in place; returns the trainer state and the training
    hooks' states by hook key (empty from checkpoints written before hooks had state)."""
    state = json.loads((folder / STATE_FILE).read_text())
    raw = load_file(str(folder / "delta_state.safetensors"))
    for path, d in dm.deltas(adapter).items():
        d.load_state_dict({k[len(path) + 1:]: v for k, v in raw.items() if k.startswith(path + ".")})
    extra = json.loads((folder / "extra_state.json").read_text())
    opt.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), extra["optimizer"]))
    sched.load_state_dict(extra["scheduler"])
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["torch"])
    v, inner, gauss = extra["python_rng"]
    random.setstate((v, tuple(inner), gauss))
    hooks = extra.get("hooks")
    if hooks is None:
        return state, {}
    tensors = load_file(str(folder / "hooks.safetensors")) if (folder / "hooks.safetensors").is_file() else {}
    return state, _join_hook_states(tensors, hooks)


def prune_checkpoints(root: Path, keep: int) -> None:
    done = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
