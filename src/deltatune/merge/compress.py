"""Compress a saved adapter: ComPEFT, DARE, LoRA rank truncation, int8; and report what it changes.

- ``compeft``, ``dare``, ``int8``: the codecs of :mod:`deltatune.io.codec` (their equations and stored layout are
  there, because every adapter load decodes them); ComPEFT and DARE apply to the factors of factorised methods
  (the ``delta``/``factor`` tensors a Config's ``tensor_roles`` names: LoRA's A and B, AdaLoRA's E, ...), other
  tensors (DoRA magnitudes, saved modules) are kept as they are; int8 applies to every floating-point tensor.
- ``rank``: LoRA truncated to rank k by SVD of ``s B A`` (exact, via QR of the factors: O((out + in) r^2));
  the result is a plain, smaller LoRA that PEFT loads too.

The report: size ratio, relative change of the delta ``||dW' - dW|| / ||dW||`` (low-rank adapters) and of the
parameters, and with a model the logits difference on a fixed random batch.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..core.model import DeltaModel, owner_of
from ..io.adapter import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    adapter_blob,
    read_config,
    read_weights,
    write_adapter_folder,
)
from ..io.codec import COMPRESSED_PEFT_TYPE, decode, encode
from ..models import load_pretrained
from .extract import truncate_lora

METHODS = ("compeft", "dare", "rank", "int8")
REPORT_NAME = "compress_report.json"


def compress_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, method: str, density: float = 0.1,
                     rank: int | None = None, seed: int = 0, alpha: float = 1.0, per_channel: bool = True,
                     model: str | os.PathLike | nn.Module | None = None) -> dict[str, Any]:
    """Write a compressed copy of the adapter folder ``adapter`` to ``out``; return the report (also saved
    as ``out/compress_report.json``): size ratio, relative change of the delta, and with ``model`` (a
    model spec or module) the logits difference on a fixed random batch. Nothing is written on error.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    if method in ("compeft", "dare") and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method == "rank" and (rank is None or rank <= 0):
        raise ValueError(f"method 'rank' needs rank > 0, got {rank}")
    src, dst = Path(adapter), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: adapter folder not found")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output folder must differ from the adapter folder")
    cfg = read_config(src)
    tensors = read_weights(src, prefix="")
    data = json.loads((src / CONFIG_NAME).read_text())
    if "compression" in data:  # compressing a compressed adapter: start from its decoded form
        data["peft_type"] = data.pop("compression").get("peft_type")
    scaling = cfg.scaling if cfg.low_rank_pairs else None  # saved LoRA files hold plain factors

    if method == "rank":  # a plain smaller LoRA: stored as it loads
        new_cfg, decoded = truncate_lora(cfg, tensors, rank, str(src))
        data.update({"r": new_cfg.r, "rank_pattern": new_cfg.rank_pattern})
        stored, entry, params, scaling_new = decoded, None, {"rank": rank}, new_cfg.scaling
    else:
        new_cfg = cfg
        stored, entry = encode(tensors, method, density=density, alpha=alpha, seed=seed, per_channel=per_channel,
                               factors=lambda k: cfg.factorised and cfg.tensor_role(k)[0] in ("delta", "factor"))
        params = entry["params"]
        if not entry["tensors"]:
            raise ValueError(f"{src}: no tensor to compress with {method} (it compresses the factors of factorised "
                             f"methods, LoRA's lora_A/lora_B, ...; this {cfg.type} adapter has {sorted(tensors)[:3]})")
        entry["peft_type"] = data.get("peft_type")
        decoded = decode(stored, entry, "(encoded in memory)")
        scaling_new = scaling
    report: dict[str, Any] = {"method": method, "params": params, "adapter": str(src), "out": str(dst)}
    report.update(delta_change(tensors, decoded, cfg.peft_prefix, scaling, scaling_new, cfg.low_rank_pairs))
    # ||theta' - theta|| / ||theta|| over the stored parameters (rank truncation changes their shapes)
    report["param_rel_change"] = None if method == "rank" else _rel([(tensors[k], decoded[k]) for k in tensors])
    if model is not None:
        report["logits"] = compare_outputs(model, src, new_cfg, decoded)

    if "deltatune" not in data or method == "rank":
        data["deltatune"] = {"type": new_cfg.type, "format": FORMAT_VERSION, "version": __version__,
                             "config": new_cfg.saved_config().to_dict()}
    if entry is not None:
        data["compression"] = entry
        data["peft_type"] = COMPRESSED_PEFT_TYPE
    before = (src / WEIGHTS_NAME).stat().st_size
    blob, save_id = adapter_blob(stored)  # adapters are small: serialise once, measure, then write
    report.update({"bytes_before": before, "bytes_after": len(blob), "size_ratio": len(blob) / before})
    write_adapter_folder(dst, blob, save_id, data, {REPORT_NAME: json.dumps(report, indent=2)})
    return report


def _rel(pairs: list[tuple[Tensor, Tensor]]) -> float:
    num = sum(float((b.double() - a.double()).pow(2).sum()) for a, b in pairs)
    den = sum(float(a.double().pow(2).sum()) for a, _ in pairs)
    return math.sqrt(num / den) if den else 0.0


def delta_change(old: dict[str, Tensor], new: dict[str, Tensor], prefix: str, scaling, scaling_new,
                 factor_pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """``||dW' - dW||_F / ||dW||_F`` over all LoRA modules (``dW = s B A``), and the worst module's."""
    if scaling is None:
        return {"delta_rel_change": None, "delta_rel_change_max": None}
    pairs, worst = [], 0.0
    for key in sorted(old):
        for a_name, b_name in factor_pairs:
            if not key.endswith("." + a_name):
                continue
            stem = key[: -len(a_name)]
            path = stem[:-1].removeprefix(prefix)
            if stem + b_name not in old:
                continue
            dw = scaling(path) * (old[stem + b_name].flatten(1).double() @ old[key].flatten(1).double())
            dw2 = scaling_new(path) * (new[stem + b_name].flatten(1).double() @ new[key].flatten(1).double())
            pairs.append((dw, dw2))
            worst = max(worst, _rel([(dw, dw2)]))
    if not pairs:
        return {"delta_rel_change": None, "delta_rel_change_max": None}
    return {"delta_rel_change": _rel(pairs), "delta_rel_change_max": worst}


def compare_outputs(model: str | os.PathLike | nn.Module, src: Path, new_cfg, new_tensors: dict[str, Tensor],
                    *, batch: tuple[int, int] = (2, 16), seed: int = 0) -> dict[str, Any]:
    """Max / mean |logits(original adapter) - logits(compressed)| on a fixed random token batch (a model
    without logits, e.g. a bare encoder: its first output)."""
    if not isinstance(model, nn.Module):
        model = load_pretrained(model)[0]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, batch, generator=torch.Generator().manual_seed(seed))
    prefix = new_cfg.peft_prefix
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in new_tensors.items()}
    dm = owner_of(model) or DeltaModel(model)
    before_active, names = dm.active, ("compress_original", "compress_new")
    try:
        dm.load(src, names[0])
        dm.add(dm.configs[names[0]].model_copy(update=_changed(new_cfg)), names[1], trainable=False, state=state)
        outs = []
        with torch.no_grad():
            for n in names:
                dm.activate(n)
                o = dm(input_ids=ids)
                outs.append((o.logits if hasattr(o, "logits") else o[0]).float())
    finally:
        for n in names:
            if n in dm.configs:
                dm.delete(n)
        if before_active and dm.configs:
            dm.activate(before_active)
    diff = (outs[1] - outs[0]).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "batch": list(batch),
            "seed": seed}


def _changed(cfg) -> dict[str, Any]:
    """The fields rank truncation changes (applied to the config as loaded on the model)."""
    return {"r": cfg.r, "rank_pattern": cfg.rank_pattern} if cfg.low_rank_pairs else {}
