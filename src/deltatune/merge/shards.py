"""Safetensors checkpoints read one tensor at a time, and shards written as a stream.

Reading: a checkpoint is a Hugging Face folder (``model.safetensors``, or shards listed by
``model.safetensors.index.json``, or any ``*.safetensors`` files) or a single ``.safetensors`` file. Only
the headers are parsed up front (8-byte little-endian length, then JSON ``{name: {dtype, shape,
data_offsets}}``); a tensor is read when asked with ``safe_open`` (memory-mapped) and the file is closed
right after. Keeping the file open would keep every page already read mapped into the process, so its
resident size would grow to the whole checkpoint over a merge; closing it keeps it at the tensors in use.

Writing: :class:`ShardWriter` writes one safetensors file whose header is computed before any data (all
names, shapes and dtypes are known before merging), then takes the tensors in header order, in one piece
or in row blocks, and streams their bytes to disk: nothing of a shard accumulates in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class CheckpointError(ValueError):
    """An input that cannot be read: missing, not safetensors, a broken index or header."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file (name -> file, dtype, shape), from its header alone."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{file}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 2**20:
                raise CheckpointError(f"{file}: header length {n} is implausible; not a safetensors file?")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the header is not a JSON object; not a safetensors file?")
    out, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            info = TensorInfo(file, ST_DTYPES[meta["dtype"]], tuple(int(x) for x in meta["shape"]))
            start, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has an unsupported or malformed header entry "
                                  f"{meta}") from None
        if stop - start != info.nbytes or start < 0:
            raise CheckpointError(f"{file}: tensor {name!r} spans bytes {start}..{stop}, but its shape and dtype "
                                  f"need {info.nbytes}")
        out[name], end = info, max(end, stop)
    size = file.stat().st_size
    if 8 + n + end > size:  # a truncated copy or download: found now, not halfway through a merge
        raise CheckpointError(f"{file}: truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return out


class Checkpoint:
    """A checkpoint's tensors by name; :meth:`read` loads one (or a block of rows of one) at a time."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: only .safetensors checkpoints are read (no pickle files)")
            self.folder, files = path.parent, [path]
        elif path.is_dir():
            self.folder, files = path, self._files(path)
        else:
            raise FileNotFoundError(f"{path}: checkpoint not found")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {self.tensors[name].file.name} "
                                          f"and {f.name}")
                self.tensors[name] = info

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        index = folder / INDEX
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                files = sorted({folder / v for v in wm.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid index ({e!r})") from None
            root = folder.resolve()
            outside = [str(f) for f in files if root not in f.resolve().parents]
            if outside:  # "../../secret.safetensors" or an absolute path: an index only names shards beside it
                raise CheckpointError(f"{index}: names shard files outside the model folder: {outside[:3]}")
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
            return files
        if (folder / SINGLE).is_file():
            return [folder / SINGLE]
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            hint = f" (found {pickles}: pickle files are not read; convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"{folder}: no .safetensors weights in this folder{hint}")
        return files

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Tensor ``name`` (or its rows ``[a, b)`` along dim 0), read with the file open only meanwhile."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                if rows is None:
                    return f.get_tensor(name)
                return f.get_slice(name)[rows[0]:rows[1]]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({e})") from None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"


# -- writing ---------------------------------------------------------------------------------------
def shard_plan(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    """Split tensors (in order) into shards of at most ``max_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        n = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class ShardWriter:
    """Stream one safetensors file: header first (computed from the planned entries), then data in order.

    ``write(name, part)`` appends ``part`` (the whole tensor, or its next block of rows); the file is
    complete when every tensor got all its bytes, which :meth:`close` checks.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.sizes: list[tuple[str, int, torch.dtype]] = []
        for name, dtype, shape in entries:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes.append((name, n, dtype))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self.total = offset
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i = 0       # the tensor being written
        self._done = 0    # bytes of it written so far

    def write(self, name: str, part: Tensor) -> None:
        if self._i >= len(self.sizes):
            raise RuntimeError(f"{self.path.name}: tensor {name!r} is not planned for this shard")
        want, size, dtype = self.sizes[self._i]
        if name != want:
            raise RuntimeError(f"{self.path.name}: expected tensor {want!r} next, got {name!r}")
        if part.dtype != dtype:
            raise RuntimeError(f"{self.path.name}: {name} planned as {dtype}, got {part.dtype}")
        data = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._done + data.nbytes > size:
            raise RuntimeError(f"{self.path.name}: {name} gets more than its {size} bytes")
        self._f.write(memoryview(data))
        self._done += data.nbytes
        if self._done == size:
            self._i, self._done = self._i + 1, 0

    def close(self) -> None:
        self._f.close()
        if self._i != len(self.sizes):
            raise RuntimeError(f"{self.path.name}: closed before tensor {self.sizes[self._i][0]!r} was written")

    def abort(self) -> None:
        self._f.close()
