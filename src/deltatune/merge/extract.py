"""Extract a LoRA from a full fine-tune: truncated SVD of each weight difference.

For every targeted linear weight (default: all linear layers except the output head)::

    dW = W_tuned - W_base  (out, in)  ~=  U_r S_r V_r^T  =  B A,
    B = U_r sqrt(S_r)  (out, r),   A = sqrt(S_r) V_r^T  (r, in),   alpha = r  (scale alpha / r = 1)

By Eckart-Young this is the best rank-r approximation in Frobenius norm, with relative error
``||dW - B A||_F / ||dW||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``. The rank is either fixed (``rank``) or
the smallest keeping a fraction ``energy`` of the squared spectrum (capped by ``rank`` if both are given);
modules whose rank differs from the adapter's ``r`` get ``rank_pattern`` / ``alpha_pattern`` entries, so
every module keeps scale 1. GPT-2's ``Conv1D`` stores its weight as (in, out); it is transposed first.

The checkpoints are HF folders of safetensors (one file or shards with an index), read one tensor at a
time; the model's module structure (which tensors are linear weights, which is the head) comes from
its ``config.json``, instantiated on the meta device (no memory, no weights). Tensors the LoRA does not
cover but that changed (biases, norms, embeddings, the head, untargeted linears) are reported with their
relative change, and the relative norm of everything the adapter cannot represent is reported too.
The factors are saved in float32 whatever the checkpoints' dtype.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .._version import __version__
from ..core.config import DeltaConfig, TargetSpec
from ..core.registry import config as method_config
from ..core.targeting import ALL_LINEAR, is_linear, select
from ..io.adapter import FORMAT_VERSION, WEIGHTS_NAME, adapter_blob, exact_targets, write_adapter_folder
from ..models import meta_model, resolve_model_path

REPORT_NAME = "extract_report.json"


class Checkpoint:
    """An HF folder of safetensors, read lazily: tensor names and shapes from the headers, tensors one by one."""

    def __init__(self, spec: str | os.PathLike):
        folder, gguf = resolve_model_path(spec)
        if gguf is not None:
            raise ValueError(f"{spec}: a GGUF file; LoRA extraction reads HF folders of safetensors")
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors") if p.name != WEIGHTS_NAME)
            if not files:
                bins = sorted(p.name for p in folder.glob("*.bin"))
                hint = f" (it has {', '.join(bins)}: pickle files are not read; convert to safetensors)" if bins else ""
                raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")
        self._handles: dict[str, Any] = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index.name} but missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - any header failure is a bad file
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                if key in self.location:
                    raise ValueError(f"{folder}: tensor {key!r} is in both {self.location[key]} and {name}")
                self.location[key] = name

    def keys(self) -> list[str]:
        return list(self.location)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.location[key]].get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        return self._handles[self.location[key]].get_tensor(key)


def choose_rank(s: Tensor, rank: int | None, energy: float | None) -> int:
    """The kept rank for singular values ``s`` (descending): fixed, or the smallest reaching ``energy``
    of ``sum s_i^2`` (``rank`` then caps it); never above ``len(s)``."""
    r = len(s)
    if energy is not None:
        cum = torch.cumsum(s.double() ** 2, 0)
        frac = cum / cum[-1]
        r = int(torch.searchsorted(frac, torch.tensor([energy - 1e-9], dtype=frac.dtype)).item()) + 1
    if rank is not None:
        r = min(r, rank)
    return max(1, min(r, len(s)))


def factorize(dw: Tensor, rank: int | None, energy: float | None) -> tuple[Tensor, Tensor, float]:
    """``(B, A, energy_kept)`` with ``B A`` the best rank-r approximation of ``dw`` (out, in), float32."""
    u, s, vh = torch.linalg.svd(dw.float(), full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum())
    return (u[:, :r] * root).contiguous(), (root[:, None] * vh[:r]).contiguous(), kept


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *,
                 rank: int | None = None, energy: float | None = None, targets: TargetSpec = ALL_LINEAR,
                 exclude: TargetSpec = None) -> dict[str, Any]:
    """Write a PEFT-format LoRA to ``out`` approximating ``tuned - base``; return the report (also saved
    as ``out/extract_report.json``).

    ``targets``/``exclude`` use deltatune's targeting rules (``"all-linear"``, a list of names/suffixes,
    or a regex). Nothing is written unless every targeted tensor was read and factorised.
    """
    if rank is None and energy is None:
        raise ValueError("give rank (fixed rank, or cap) and/or energy (fraction of the squared spectrum to keep)")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    cb, ct = Checkpoint(base), Checkpoint(tuned)
    _check_same_tensors(cb, ct)
    model = meta_model(cb.folder, require_class=True)
    sel = select(model, DeltaConfig(targets=targets, exclude=exclude), supported=is_linear)
    weights = {f"{path}.weight": path for path in sel.names}
    missing = [k for k in weights if k not in cb.location]
    if missing:
        raise ValueError(f"{cb.folder}: no tensor for the targeted weight(s) {missing[:5]}; the checkpoint's names "
                         f"do not follow the module names of {type(model).__name__}")

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    modules: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    others: dict[str, float] = {}
    total_sq = missed_sq = 0.0
    for key in cb.keys():
        wb, wt = cb.get(key), ct.get(key)
        d = wt.float() - wb.float()
        d_sq = float(d.double().pow(2).sum())
        total_sq += d_sq
        path = weights.get(key)
        if path is None:
            if d_sq > 0:
                others[key] = math.sqrt(d_sq) / max(float(wb.double().norm()), 1e-30)
                missed_sq += d_sq
            continue
        if d_sq == 0:
            unchanged.append(path)
            continue
        if not isinstance(sel.modules[path], nn.Linear):  # GPT-2 Conv1D: weight is (in, out)
            d = d.T
        b, a, kept = factorize(d, rank, energy)
        resid_sq = float((d - b @ a).double().pow(2).sum())
        missed_sq += resid_sq
        factors[path] = (b, a)
        modules[path] = {"rank": a.shape[0], "shape": list(d.shape), "energy_kept": round(kept, 6),
                         "rel_error": math.sqrt(resid_sq / d_sq)}
    if not factors:
        raise ValueError(f"{ct.folder}: no targeted weight differs from {cb.folder}; nothing to extract")

    ranks = {p: m["rank"] for p, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    paths = sorted(factors)
    target_modules = exact_targets(model, paths)
    cfg = method_config("lora", r=r, alpha=float(r), targets=target_modules, rank_pattern=pattern,
                     alpha_pattern={k: float(v) for k, v in pattern.items()})
    config = _adapter_config(cfg, target_modules, str(base))
    tensors = {}
    for p in paths:
        b, a = factors[p]
        tensors[f"base_model.model.{p}.lora_A.weight"] = a
        tensors[f"base_model.model.{p}.lora_B.weight"] = b
    errors = [m["rel_error"] for m in modules.values()]
    report = {
        "base": str(base), "tuned": str(tuned), "out": str(out), "r": r, "rank": rank, "energy": energy,
        "modules": {p: modules[p] for p in paths}, "unchanged_modules": unchanged,
        "max_rel_error": max(errors), "mean_rel_error": sum(errors) / len(errors),
        "changed_not_represented": others,
        # ||everything the adapter misses|| / ||tuned - base|| over all tensors
        "unrepresented_rel_norm": math.sqrt(missed_sq / total_sq) if total_sq else 0.0,
    }
    folder = Path(out)
    blob, save_id = adapter_blob(tensors)
    report["adapter_bytes"] = len(blob)
    write_adapter_folder(folder, blob, save_id, config, {REPORT_NAME: json.dumps(report, indent=2)})
    return report


def _check_same_tensors(cb: Checkpoint, ct: Checkpoint) -> None:
    kb, kt = set(cb.keys()), set(ct.keys())
    if kb != kt:
        only_b, only_t = sorted(kb - kt), sorted(kt - kb)
        parts = [f"missing from {ct.folder}: {only_b[:5]}" if only_b else "",
                 f"not in {cb.folder}: {only_t[:5]}" if only_t else ""]
        raise ValueError("the checkpoints hold different tensors; " + "; ".join(p for p in parts if p))
    for key in sorted(kb):
        sb, st = cb.shape(key), ct.shape(key)
        if sb != st:
            raise ValueError(f"tensor {key!r} has shape {list(sb)} in {cb.folder} but {list(st)} in {ct.folder}")


def _adapter_config(cfg: DeltaConfig, target_modules: str | list[str], base: str) -> dict[str, Any]:
    config = cfg.to_peft(target_modules)
    config["base_model_name_or_path"] = base
    config["deltatune"] = {"type": cfg.type, "format": FORMAT_VERSION, "version": __version__,
                           "config": cfg.to_dict()}
    return config


def truncate_lora(cfg: DeltaConfig, tensors: dict[str, Tensor], rank: int,
                  where: str = "adapter") -> tuple[DeltaConfig, dict[str, Tensor]]:
    """A LoRA adapter truncated to ``rank``: per module the best rank-k approximation of ``s B A``.

    ``tensors`` are the file's tensors (full keys). The SVD of ``B A`` (out, r)(r, in) comes from QR of
    both factors, ``B = Q_b R_b``, ``A^T = Q_a R_a``: ``B A = Q_b (R_b R_a^T) Q_a^T``, so only an r x r matrix
    is decomposed. The new factors carry ``sqrt(S_k / s')`` each, with ``s'`` the module's new scale
    (alpha unchanged, r -> min(r, k)); modules already at rank <= k stay exact. Returns the new config and
    tensors (other tensors, e.g. DoRA magnitudes, unchanged).
    """
    if not cfg.low_rank_pairs:  # LoRA or DoRA
        raise ValueError(f"{where}: rank truncation needs a LoRA adapter; this is a {cfg.type!r} adapter")
    pairs = {}
    for key in tensors:
        for a_name, b_name in cfg.low_rank_pairs:
            stem = key[: -len(a_name)]
            if key.endswith("." + a_name) and stem + b_name in tensors:
                pairs[stem[:-1].removeprefix(cfg.peft_prefix)] = (key, stem + b_name)
    if not pairs:
        raise ValueError(f"{where}: no lora_A/lora_B pairs found; rank truncation needs a LoRA adapter")
    top = max(tensors[a].shape[0] for a, _ in pairs.values())
    if rank > top:
        raise ValueError(f"{where}: rank {rank} is larger than the adapter's (its largest rank is {top})")
    new_cfg = cfg.model_copy(update={"r": min(cfg.r, rank),
                                     "rank_pattern": {p: min(v, rank) for p, v in cfg.rank_pattern.items()}})
    out = dict(tensors)
    for path, (ka, kb) in pairs.items():
        a, b = tensors[ka], tensors[kb]
        k = min(a.shape[0], rank)
        if new_cfg.rank(path) != k:
            raise ValueError(f"{where}: module {path!r} has rank {a.shape[0]} in the file but "
                             f"{cfg.rank(path)} in the config")
        qb, rb = torch.linalg.qr(b.flatten(1).double())
        qa, ra = torch.linalg.qr(a.flatten(1).double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        s = s * (cfg.scaling(path) / new_cfg.scaling(path))
        kk = min(k, len(s))  # a layer narrower than r has rank < r
        root = torch.zeros(k, dtype=s.dtype)
        root[:kk] = s[:kk].sqrt()
        new_b = torch.zeros(b.shape[0], k, dtype=torch.float64)
        new_a = torch.zeros(k, a[0].numel(), dtype=torch.float64)
        new_b[:, :kk] = (qb @ u[:, :kk]) * root[:kk]
        new_a[:kk] = root[:kk, None] * (vh[:kk] @ qa.T)
        out[ka] = new_a.view(k, *a.shape[1:]).to(a.dtype).contiguous()
        out[kb] = new_b.view(b.shape[0], k, *b.shape[2:]).to(b.dtype).contiguous()
    return new_cfg, out
