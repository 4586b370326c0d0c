"""Compressed adapter files: the ComPEFT, DARE and int8 codecs, their stored layout, and decoding on load.

- ``compeft`` (Yadav et al. 2023, "ComPEFT"): per tensor tau, keep the top-``density`` entries by magnitude
  and replace each by its sign times one scale: ``tau' = alpha * sigma(tau) * sign(tau) * m`` (m the top-k
  mask, sigma the population std of the whole original tensor, alpha a multiplier, default 1). For LoRA the
  compressed tensors are the A and B factors (ComPEFT compresses the PEFT parameters themselves), so the
  delta becomes ``s B' A'``.
- ``dare`` (Yu et al. 2024): drop each entry with probability ``p = 1 - density`` and rescale the survivors by
  ``1 / (1 - p)`` (seeded); on LoRA factors as for ComPEFT.
- ``int8``: absmax 8-bit per channel (per tensor with ``per_channel=False``): ``x ~ q * scale``,
  ``scale = max|x| / 127`` over the channel, ``q = round(x / scale)``, so ``|x - q scale| <= scale / 2``. A tensor
  is seen as (shape[0], rest) and its channels run along the shorter side: for LoRA, one scale per rank
  channel (the rows of A (r, in), the columns of B (out, r)), so the scales cost almost nothing.

Which tensors are encoded is the caller's choice (``encode(..., factors=...)``; :mod:`deltatune.merge.compress`
passes the factors of factorised methods for ComPEFT and DARE).

Stored layout (compeft, dare, int8): ``adapter_model.safetensors`` holds, for an encoded tensor ``K``::

    compeft: K.compeft_mask  uint8 [ceil(n/8)]  bit (p % 8), LSB first, of byte p // 8 set <=> flat entry p kept
             K.compeft_sign  uint8 [ceil(k/8)]  one bit per kept entry, in flat order; 1 = negative
             K.compeft_scale float32 [1]        alpha * sigma(tau)
    dare:    K.dare_mask     uint8 as above;    K.dare_values  [k] (K's dtype) kept entries / density
    int8:    K.int8_q        int8, K's shape;   K.int8_scale   float32 [channels] (see int8_axis) or [1]

and ``adapter_config.json`` a ``compression`` entry ``{"method", "format", "params", "peft_type", "tensors":
{K: {"shape", "dtype"}}}``; unencoded tensors keep their keys. Its ``peft_type`` is set to
``DELTATUNE_COMPRESSED`` (the original is kept in the entry) so PEFT refuses the folder instead of loading
an adapter with missing weights; :func:`decode_folder`, called by :func:`deltatune.io.adapter.read_weights`,
decodes on load, so ``dt.load_adapter`` needs no flag.

The pipeline that compresses a saved adapter and reports the change is :mod:`deltatune.merge.compress`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .folder import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

CODEC_FORMAT = 1
COMPRESSED_PEFT_TYPE = "DELTATUNE_COMPRESSED"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_PARTS = {"compeft": ("compeft_mask", "compeft_sign", "compeft_scale"), "dare": ("dare_mask", "dare_values"),
          "int8": ("int8_q", "int8_scale")}


# -- bit packing ----------------------------------------------------------------------------------
def pack_bits(bits: Tensor) -> Tensor:
    """Bool vector -> uint8 [ceil(n/8)], bit i % 8 (LSB first) of byte i // 8."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = bits.flatten().to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool vector."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.to(torch.uint8)[:, None] >> shifts) & 1).flatten()[:n].bool()


# -- codecs: encode(t) -> parts; decode(parts, shape, dtype) -> t ------------------------------------
def compeft_encode(t: Tensor, density: float, alpha: float = 1.0) -> dict[str, Tensor]:
    x = t.detach().float().flatten()
    mask = torch.zeros(x.numel(), dtype=torch.bool)  # the top max(1, int(density n)) entries by magnitude
    mask[x.abs().topk(min(x.numel(), max(1, int(density * x.numel()))), sorted=False).indices] = True
    mask &= x != 0
    scale = alpha * float(x.std(correction=0)) if x.numel() else 0.0
    return {"compeft_mask": pack_bits(mask), "compeft_sign": pack_bits(x[mask] < 0),
            "compeft_scale": torch.tensor([scale], dtype=torch.float32)}


def compeft_decode(parts: dict[str, Tensor], shape: list[int], dtype: torch.dtype) -> Tensor:
    n = math.prod(shape)
    mask = unpack_bits(_sized(parts, "compeft_mask", (n + 7) // 8), n)
    k = int(mask.sum())
    neg = unpack_bits(_sized(parts, "compeft_sign", (k + 7) // 8), k)
    scale = _sized(parts, "compeft_scale", 1).float()
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = torch.where(neg, -scale, scale)
    return out.view(shape).to(dtype)


def dare_encode(t: Tensor, density: float, generator: torch.Generator) -> dict[str, Tensor]:
    x = t.detach().flatten()
    keep = torch.rand(x.numel(), generator=generator) < density
    return {"dare_mask": pack_bits(keep), "dare_values": (x[keep].float() / density).to(t.dtype)}


def dare_decode(parts: dict[str, Tensor], shape: list[int], dtype: torch.dtype) -> Tensor:
    n = math.prod(shape)
    mask = unpack_bits(_sized(parts, "dare_mask", (n + 7) // 8), n)
    out = torch.zeros(n, dtype=dtype)
    out[mask] = _sized(parts, "dare_values", int(mask.sum())).to(dtype)
    return out.view(shape)


def int8_axis(shape: list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    """``(rows, cols, axis)`` of a tensor seen as (shape[0], rest); per-channel scales run along the shorter
    side (``axis`` 0: one per row, 1: one per column), so for LoRA there is one scale per rank channel."""
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows if rows else 0
    return rows, cols, 0 if rows <= cols else 1


def int8_encode(t: Tensor, per_channel: bool = True) -> dict[str, Tensor]:
    rows, cols, axis = int8_axis(tuple(t.shape))
    x = t.detach().float().reshape(rows, cols)
    if per_channel:
        scale = x.abs().amax(1 - axis) / 127
    else:
        scale = x.abs().amax().reshape(1) / 127
    s = scale.view(-1, 1) if per_channel and axis == 0 else scale.view(1, -1)
    q = torch.round(x / torch.where(s > 0, s, 1.0)).clamp(-127, 127)
    return {"int8_q": q.to(torch.int8).view(t.shape), "int8_scale": scale}


def int8_decode(parts: dict[str, Tensor], shape: list[int], dtype: torch.dtype) -> Tensor:
    q = parts["int8_q"]
    if list(q.shape) != list(shape) or q.dtype != torch.int8:
        raise ValueError(f"int8_q is {q.dtype} {list(q.shape)}, expected int8 {shape}")
    rows, cols, axis = int8_axis(shape)
    scale = parts["int8_scale"].float().flatten()
    channels = (rows, cols)[axis]
    if scale.numel() not in (1, channels):
        raise ValueError(f"int8_scale has {scale.numel()} values; expected 1 or {channels}")
    s = scale.view(-1, 1) if scale.numel() > 1 and axis == 0 else scale.view(1, -1)
    return (q.float().reshape(rows, cols) * s).view(shape).to(dtype)


_DECODERS = {"compeft": compeft_decode, "dare": dare_decode, "int8": int8_decode}


def _sized(parts: dict[str, Tensor], name: str, n: int) -> Tensor:
    t = parts[name].flatten()
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} values, expected {n}")
    return t


# -- decoding a folder (the read-path hook) -----------------------------------------------------------
def decode(tensors: dict[str, Tensor], entry: Any, where: str) -> dict[str, Tensor]:
    """The adapter's plain tensors from a file's ``tensors`` and its config's ``compression`` entry."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
        raise AdapterFileError(f"{where}: malformed 'compression' entry (expected an object with 'method' and "
                               f"'tensors')")
    method = entry.get("method")
    if method not in _DECODERS:
        raise AdapterFileError(f"{where}: unknown compression method {method!r}; deltatune decodes "
                               f"{', '.join(_DECODERS)}")
    if not isinstance(entry.get("format"), int) or entry["format"] > CODEC_FORMAT:
        raise AdapterFileError(f"{where}: compression format {entry.get('format')!r} is not readable by this "
                               f"release (reads format {CODEC_FORMAT})")
    out = dict(tensors)
    for key, spec in entry["tensors"].items():
        names = _PARTS[method]
        missing = [n for n in names if f"{key}.{n}" not in out]
        if missing:
            raise AdapterFileError(f"{where}: compressed tensor {key!r}: part {missing[0]!r} is missing")
        parts = {n: out.pop(f"{key}.{n}") for n in names}
        try:
            shape = [int(s) for s in spec["shape"]]
            dtype = _DTYPES[spec["dtype"]]
            out[key] = _DECODERS[method](parts, shape, dtype)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise AdapterFileError(f"{where}: compressed tensor {key!r} ({method}) cannot be decoded: {e}") from None
    stray = [k for k in out if any(k.endswith("." + n) for ns in _PARTS.values() for n in ns)]
    if stray:
        raise AdapterFileError(f"{where}: tensor(s) {stray[:3]} look encoded but the 'compression' entry does not "
                               f"list them")
    return out


def decode_folder(folder: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` decoded if ``folder``'s adapter_config.json has a ``compression`` entry, else unchanged."""
    file = folder / CONFIG_NAME
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return tensors  # read_config reports a missing or broken config
    if not isinstance(data, dict) or "compression" not in data:
        return tensors
    return decode(tensors, data["compression"], str(folder / WEIGHTS_NAME))


# -- encoding (merge.compress calls it) -------------------------------------------------------------
def encode(tensors: dict[str, Tensor], method: str, *, density: float = 0.1, alpha: float = 1.0, seed: int = 0,
           per_channel: bool = True, factors: Callable[[str], bool] = lambda key: True,
           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(stored tensors, compression entry)`` for ``compeft``/``dare``/``int8`` (see the module doc); tensors
    the method does not apply to are stored as they are. ``factors(key)``: which tensors compeft and dare encode
    (the adapter's low-rank factors). :func:`decode` inverts it (up to the method's loss)."""
    gen = torch.Generator().manual_seed(seed)
    pick = factors if method in ("compeft", "dare") else (lambda k: True)
    todo = [k for k in sorted(tensors) if pick(k) and tensors[k].is_floating_point() and tensors[k].numel()]
    stored = {k: v for k, v in tensors.items() if k not in todo}
    specs = {}
    for k in todo:
        t = tensors[k]
        parts = (compeft_encode(t, density, alpha) if method == "compeft" else
                 dare_encode(t, density, gen) if method == "dare" else int8_encode(t, per_channel))
        stored.update({f"{k}.{n}": p.contiguous() for n, p in parts.items()})
        specs[k] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    params = {"compeft": {"density": density, "alpha": alpha}, "dare": {"density": density, "seed": seed},
              "int8": {"per_channel": per_channel}}[method]
    return stored, {"method": method, "format": CODEC_FORMAT, "params": params, "tensors": specs}


