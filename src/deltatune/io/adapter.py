"""Save and load adapters in the Hugging Face PEFT format.

A folder holds ``adapter_config.json`` (PEFT's fields, plus a ``deltatune`` key PEFT ignores) and
``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<module>.lora_A.weight``, ...).
Tensors an adapter shares across its modules (``DeltaConfig.export_shared``, e.g. VeRA's ``base_model.vera_A``)
are saved under their own full keys and handed back to ``import_shared`` on load. Non-default adapter names go to
a subfolder per name, as PEFT does. Files are written to a temporary
name and renamed, so an interrupted save never leaves a broken adapter. Only safetensors load unless the
caller explicitly allows pickle files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from .._version import __version__
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.model import register_store
from ..core.registry import available_methods, config_class
from ..core.targeting import exact_targets, iter_modules, matches, select
from . import peft as _peft  # noqa: F401  (registers the PEFT mapper behind DeltaConfig.to_peft / from_peft)
from .codec import decode_folder
from .folder import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, AdapterFileError

if TYPE_CHECKING:
    from ..core.model import DeltaModel

PREFIX = "base_model.model."
FORMAT_VERSION = 1


# -- writing -------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` then rename over ``path``: readers never see a partial file."""
    atomic_write_all({path: write})


def atomic_write_all(files: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file to a temporary name first (fsynced), then rename them all into place (folders fsynced).

    If any write fails, no file is replaced: the previous versions stay intact and no temp file remains.
    """
    tmps = {path: path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in files}
    try:
        for path, write in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmps[path])
            fsync(tmps[path])
        for path, tmp in tmps.items():
            os.replace(tmp, path)
        for parent in {p.parent for p in files}:
            fsync(parent)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (so a rename inside it survives a crash), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB pieces (a model file never sits in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


SAVE_ID = "deltatune_save_id"  # in the weights' safetensors metadata and in the config's deltatune section


def adapter_blob(tensors: dict[str, Tensor]) -> tuple[bytes, str]:
    """The weights file's bytes, tagged with a fresh save id that :func:`write_adapter_folder` puts in the config."""
    save_id = uuid.uuid4().hex
    return save(tensors, metadata={"format": "pt", SAVE_ID: save_id}), save_id


def write_adapter_folder(folder: Path, blob: bytes, save_id: str, config: dict[str, Any],
                         extra: dict[str, str] | None = None) -> None:
    """Write an adapter folder (weights from :func:`adapter_blob`, config, ``extra`` text files) crash-safely.

    A new folder is assembled under a temporary name, fsynced, and renamed into place once. Over an existing
    adapter the files are replaced one by one (each fsynced, then the folder); the config and the weights carry the
    same save id, so the pair a crash between two renames would leave (new weights, old config) is refused at load
    by name, never served. A weights file rewritten by another tool has no id and is not questioned.
    """
    config = {**config, "deltatune": {**config.get("deltatune", {}), "save_id": save_id}}
    texts = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True), **(extra or {})}
    if folder.exists():
        atomic_write_all({folder / WEIGHTS_NAME: lambda f: f.write_bytes(blob),
                          **{folder / n: (lambda f, t=t: f.write_text(t)) for n, t in texts.items()}})
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / WEIGHTS_NAME).write_bytes(blob)
        for n, t in texts.items():
            (tmp / n).write_text(t)
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
        os.replace(tmp, folder)
        fsync(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapters(dm: DeltaModel, path: str | os.PathLike, names: list[str] | None = None) -> None:
    root = Path(path)
    names = list(dm.configs) if names is None else names
    dm._require(*names)
    for name in names:
        save_adapter(dm, name, root if name == "default" else root / name)


def config_dict(cfg: DeltaConfig, targets) -> dict[str, Any]:
    """The ``adapter_config.json`` of a config: PEFT's fields where the method maps to PEFT, plus ours."""
    try:
        config: dict[str, Any] = cfg.to_peft(targets)
    except NotImplementedError:
        config = {}
    config["deltatune"] = {"type": cfg.type, "format": FORMAT_VERSION, "version": __version__, "config": cfg.to_dict()}
    return config


def save_adapter(dm: DeltaModel, name: str, folder: Path) -> None:
    cfg = dm.configs[name]
    deltas = dm.deltas(name)
    adapted = [p for p, d in deltas.items() if not d.replaces_base]
    targets = exact_targets(dm.model, adapted)
    saved = cfg.saved_config().model_copy(
        update={"targets": targets, "exclude": None, "layers": None, "layers_pattern": None}
    )
    config = config_dict(saved, targets)
    # input-level deltas (prompt/prefix tuning) save top-level keys (``prompt_embeddings``), as PEFT does
    tensors = {(k if d.input_level else f"{cfg.peft_prefix}{p}.{k}"): t.detach().to("cpu").contiguous()
               for p, d in deltas.items() for k, t in d.export_state().items()}
    shared = cfg.export_shared({p: d for p, d in deltas.items() if not d.replaces_base})
    tensors.update({k: t.detach().to("cpu").contiguous() for k, t in shared.items()})
    write_adapter_folder(folder, *adapter_blob(tensors), config)


# -- reading -------------------------------------------------------------------------------------
def read_config(folder: Path) -> DeltaConfig:
    """The config an adapter folder was saved with (deltatune's own section, else PEFT's fields)."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config here (is {folder} an adapter folder?)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise AdapterFileError(f"{file}: JSON nested too deeply to be an adapter config") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: an adapter config is a JSON object, not a {type(data).__name__}")
    try:
        ours = data.get("deltatune")
        if isinstance(ours, dict) and "type" in ours:
            if not isinstance(ours.get("config", {}), dict):
                raise AdapterFileError(f"{file}: deltatune.config must be a JSON object, "
                                       f"not a {type(ours['config']).__name__}")
            if ours.get("format", FORMAT_VERSION) > FORMAT_VERSION:
                warnings.warn(f"{file}: written in format {ours['format']} by deltatune {ours.get('version')}; "
                              f"this release reads format {FORMAT_VERSION} and may miss newer fields", stacklevel=3)
            try:
                cls = config_class(ours["type"])
            except ValueError as e:
                raise AdapterFileError(f"{file}: {e}") from None
            return cls.from_dict(ours.get("config", {}))
        peft_type = data.get("peft_type")
        for name in available_methods():
            cls = config_class(name)
            if peft_type is not None and cls.peft_type == peft_type:
                return cls.from_peft(data)
    except ValidationError as e:
        raise AdapterFileError(f"{file}: invalid config: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a field of the wrong kind, or missing
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{file}: missing or malformed field ({type(e).__name__}: {e})") from None
    raise AdapterFileError(f"{file}: unknown method type {peft_type!r}; deltatune reads: {available_methods()}")


def read_weights(folder: Path, allow_pickle: bool = False, prefix: str = PREFIX) -> dict[str, Tensor]:
    """The adapter tensors, keys without PEFT's ``base_model.model.`` prefix (the method's ``peft_prefix``)."""
    file = folder / WEIGHTS_NAME
    if file.is_file():
        try:
            tensors = load_file(str(file))
            with safe_open(str(file), "pt") as f:
                got = (f.metadata() or {}).get(SAVE_ID)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFileError(f"{file}: not a readable safetensors file ({e})") from None
        want = _save_id(folder)
        if got is not None and want is not None and got != want:
            raise AdapterFileError(f"{file} and {folder / CONFIG_NAME} come from two different saves (an interrupted "
                                   f"save?): save the adapter again")
    else:
        pickled = [folder / n for n in PICKLE_NAMES if (folder / n).is_file()]
        if not pickled:
            raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} in this folder")
        if not allow_pickle:
            raise AdapterFileError(
                f"{pickled[0]} is a pickle file, which can run code when loaded; deltatune loads only "
                f"safetensors by default. If you trust its source, pass allow_pickle=True "
                f"(command line: --allow-pickle), or convert it to {WEIGHTS_NAME}."
            )
        try:
            tensors = torch.load(pickled[0], map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{pickled[0]}: cannot be read ({e})") from None
    tensors = _decompress(folder, tensors)
    for k, t in tensors.items():  # a NaN or inf weight would poison every output it touches: refuse it here
        if t.is_floating_point() and not torch.isfinite(t).all():
            source = file if file.is_file() else folder
            raise AdapterFileError(f"{source}: tensor {k} holds NaN or inf values")
    out = {}
    for k, t in tensors.items():
        k = k[len(prefix):] if k.startswith(prefix) else k
        if k.endswith(".base_layer.weight"):  # PEFT saves whole embedding matrices alongside embedding LoRA
            warnings.warn(f"{file}: ignoring the saved base weight {k}; the model's own is used", stacklevel=3)
            continue
        out[k] = t
    return out


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def read_header(folder: Path, prefix: str = PREFIX) -> dict[str, tuple[tuple[int, ...], int]] | None:
    """Key -> (shape, bytes) of every tensor in the folder's safetensors file, read from its header alone (no
    tensor data); keys as :func:`read_weights` returns them. None when the tensors are not stored as they load:
    a pickle file, or a compressed adapter (its stored tensors are codes; they are checked once decoded)."""
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        return None
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
        if isinstance(data, dict) and "compression" in data:
            return None
    except (OSError, ValueError, RecursionError):
        pass  # read_config reports a broken config
    out = {}
    try:
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = tuple(sl.get_shape())
                out[k[len(prefix):] if k.startswith(prefix) else k] = (
                    shape, math.prod(shape) * _DTYPE_BYTES.get(sl.get_dtype(), 8))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file}: not a readable safetensors file ({e})") from None
    return out


def _meta_deltas(dm: DeltaModel, cfg: DeltaConfig) -> dict[str, Delta]:
    """``cfg``'s deltas on ``dm``'s model as :meth:`DeltaModel.add` builds them (unions member by member), without
    saved modules; call under ``torch.device("meta")``."""
    return cfg.for_model(dm.model).build(
        lambda one: one.make_deltas(select(dm.model, one, one.supports, one.default_targets).modules))


def _input_keys_placed(dm: DeltaModel, cfg: DeltaConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """PEFT saves prompt-learning weights as top-level keys (``prompt_embeddings``); give them the module path of
    the adapter's input-level delta, as every other key has, for :meth:`DeltaModel.add`."""
    if all("." in k for k in state):
        return state
    try:
        with torch.device("meta"):
            made = _meta_deltas(dm, cfg)
    except Exception:  # noqa: BLE001 - a method that needs real tensors to build (prompt tuning's text init)
        try:
            made = _meta_deltas(dm, cfg)  # small: the sizes were checked against the file already
        except Exception:  # noqa: BLE001 - the real build in DeltaModel.add reports anything wrong
            return state
    paths = [p for p, d in made.items() if d.input_level]
    if len(paths) != 1:
        return state
    return {(k if "." in k else f"{paths[0]}.{k}"): t for k, t in state.items()}


_Plan = dict[str, tuple[tuple[int, ...], "Delta | None", str]]


def _planned(dm: DeltaModel, cfg: DeltaConfig) -> _Plan | None:
    """Key (as in :func:`read_weights`) -> (shape, delta, key in the delta) of every tensor ``cfg``'s deltas would
    save on this model, from deltas built on the meta device, which allocates nothing (shared tensors have no
    delta). None for a method whose construction needs real tensors (its shapes are checked on import)."""
    try:
        with torch.device("meta"):
            made = _meta_deltas(dm, cfg)
            plan: _Plan = {(k if d.input_level else f"{p}.{k}"): (tuple(t.shape), d, k)
                           for p, d in made.items() for k, t in d.export_state().items()}
            shared = cfg.export_shared({p: d for p, d in made.items() if not d.replaces_base})
            plan.update({k: (tuple(t.shape), None, k) for k, t in shared.items()})
    except Exception:  # noqa: BLE001 - the real build reports anything wrong
        return None
    return plan


def check_against_config(dm: DeltaModel, cfg: DeltaConfig, stored: dict[str, tuple[tuple[int, ...], int]],
                         folder: Path) -> None:
    """Refuse, before any tensor is read or allocated, weights that do not fit the config on this model: a tensor
    whose stored shape is not the one the config gives it here (naming the key and both shapes), or a config whose
    deltas would need far more memory than the file holds (``r: 1000000000`` beside small weights)."""
    plan = _planned(dm, cfg)
    if plan is None:
        return
    need = sum(math.prod(s) * 4 for s, _, _ in plan.values())  # float32 at most
    have = sum(n for _, n in stored.values())
    if need > 4 * have + (16 << 20):
        raise AdapterFileError(f"{folder / CONFIG_NAME}: this {cfg.type} config needs {need / 2**20:.0f} MiB of "
                               f"parameters, but {WEIGHTS_NAME} holds {have / 2**20:.1f} MiB: the config's sizes "
                               f"(r, ...) do not describe these weights")
    file = folder / WEIGHTS_NAME
    for key, (shape, _) in stored.items():
        if key not in plan or plan[key][0] == tuple(shape):
            continue
        want, delta, sub = plan[key]
        msg = (f"{file}: tensor {key} has shape {tuple(shape)}, but {CONFIG_NAME} ({cfg.type}) gives it {want} on "
               f"this model (r, target modules or the model differ)")
        if delta is not None and type(delta).import_state is not Delta.import_state:
            # the method's own import check, run on empty tensors of the stored shapes, may know why
            mine = {k: dk for k, (_, d, dk) in plan.items() if d is delta and k in stored}
            try:
                with torch.device("meta"):
                    delta.import_state({dk: torch.empty(stored[k][0]) for k, dk in mine.items()},
                                       key[: -len(sub) - 1] or key)
            except (KeyError, ValueError) as e:
                msg += f": {_message(e)}"
        raise AdapterFileError(msg)


def _save_id(folder: Path) -> str | None:
    """The save id the folder's config records (None: not recorded, e.g. written by PEFT)."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None  # read_config reports a missing or broken config, naming it
    ours = data.get("deltatune") if isinstance(data, dict) else None
    sid = ours.get("save_id") if isinstance(ours, dict) else None
    return sid if isinstance(sid, str) else None


def _decompress(folder: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Decode a compressed adapter (a ``compression`` entry in its config: ComPEFT, DARE, int8; see
    :mod:`deltatune.io.codec`); other adapters pass through unchanged."""
    return decode_folder(folder, tensors)


def _message(e: Exception) -> str:
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


def load_adapter_into(dm: DeltaModel, path: str | os.PathLike, name: str | None = None, *,
                      trainable: bool = False, allow_pickle: bool = False) -> str:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: adapter folder not found")
    name = name or "default"
    if name in dm.configs:
        raise ValueError(f"an adapter named {name!r} already exists; delete it first or pick another name")
    cfg = read_config(folder)
    if cfg.modules_to_save:  # PEFT lists candidates (e.g. "classifier", "score"); absent ones mean nothing
        present = [m for m in cfg.modules_to_save if any(n and matches([m], n) for n, _ in iter_modules(dm.model))]
        cfg = cfg.model_copy(update={"modules_to_save": present or None})
    try:
        cfg.for_model(dm.model)  # the config's own sizes against the model's (prompt tuning's token_dim, ...)
    except (KeyError, ValueError) as e:
        raise AdapterFileError(f"{folder}: does not fit this model: {_message(e)}") from None
    header = read_header(folder, cfg.peft_prefix)
    if header is not None:  # shapes and size from the file's header, before any tensor is read
        check_against_config(dm, cfg, header, folder)
    state = read_weights(folder, allow_pickle, cfg.peft_prefix)
    if header is None:  # pickled or compressed: the same check on the tensors as they load
        check_against_config(dm, cfg, {k: (tuple(t.shape), t.numel() * t.element_size()) for k, t in state.items()},
                             folder)
    state = _input_keys_placed(dm, cfg, state)
    try:
        dm.add(cfg, name, trainable=trainable, state=state)
    except (KeyError, ValueError) as e:
        raise AdapterFileError(f"{folder}: does not fit this model: {_message(e)}") from None
    return name


register_store(save_adapters, load_adapter_into)  # behind DeltaModel.save / .load
