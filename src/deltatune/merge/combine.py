"""Adapter arithmetic: combine saved adapters into one adapter (``dt.combine``, ``dt.negate``).

Adapters are read from their folders (deltatune's or PEFT's format); the result is a normal adapter folder.
Every adapter must have the same method and adapt the same modules. Weights ``w_i`` may be negative: a
single adapter with ``w = -1`` is its negation (forgetting, Zhang et al. 2023, "Composing Parameter-Efficient
Modules with Arithmetic Operations"); ``w = (1, 1)`` is addition.

LoRA (``dW = s B A``, ``s = alpha / r``, rsLoRA ``alpha / sqrt(r)``; B (out, r), A (r, in)), three ways:

- ``combination="cat"`` (exact; the default for ``linear`` / ``task_arithmetic``): ranks are concatenated,
  ``A' = [A_1; A_2; ...]`` (sum r_i, in), ``B' = [c_1 B_1, c_2 B_2, ...]`` (out, sum r_i) with
  ``c_i = w_i s_i / s'``, so ``s' B' A' = sum_i w_i s_i B_i A_i`` exactly, whatever the ranks or scales.
- ``combination="svd"`` (any operator of :mod:`deltatune.merge.ops`; the default for the others): the dense
  ``dW_i`` are the task vectors (base = 0), ``M = op(dW_1, ..., dW_n)``, then the truncated SVD
  ``M ~ U_k S_k V_k^T`` gives ``B' = U_k (S_k / s')^(1/2)``, ``A' = (S_k / s')^(1/2) V_k^T`` (Eckart-Young:
  the best rank-k approximation). ``rank`` defaults to the largest input rank; the report gives each module's
  ``||M - s' B' A'||_F / ||M||_F``.
- ``combination="params"`` (Zhang et al.'s parameter arithmetic, approximate): equal ranks only;
  ``A' = op(A_i; |w_i|)``, ``B' = op(s_i / s' B_i; w_i)``: a negative weight negates B only, as in the paper.
  The only way for DoRA (not additive: its magnitude vectors, whole tensors, are averaged), and its default.

Other methods combine parameter by parameter (``combination=None``), by what each tensor is:

- delta tensors that carry the sign (LoRA-like B, adapters' up-projection, BitFit biases, SSF shifts, VeRA's
  lambda_b, sparse values, OFT/BOFT generators, ...): ``op(theta_i; w_i)`` on task vectors from 0;
- their partners (A, down-projections, VeRA's lambda_d, ...): ``op(theta_i; |w_i|)``;
- scales whose identity is 1: IA3's ``l`` in log space by default, ``l = exp(sum_i w_i log l_i)`` (negation is
  ``1 / l``; needs ``l > 0``), or Zhang et al.'s linear form ``l = 1 + sum_i w_i (l_i - 1)``
  (``ia3_space="linear"``), with any operator in place of the sum; SSF scales and BOFT's ``s`` the linear way;
- whole tensors (``modules_to_save``, LN-tuning copies, prompt/prefix embeddings, DoRA magnitudes):
  the weighted average ``sum_i w_i theta_i / sum_i w_i``, whatever the operator.

For bottleneck adapters (non-linear) and multiplicative methods this is an approximation of combining their
functions (the paper's choice for adapters: the up-projection carries the sign). Operators are called as in
``ops``, except that ``linear`` defaults to the plain weighted sum here (``normalize=False``): at adapter level
the tensors ARE task vectors. Pass ``normalize=True`` for a weighted average.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.config import DeltaConfig
from ..core.targeting import matches
from ..io.adapter import adapter_blob, config_dict, read_config, read_weights, write_adapter_folder
from . import ops
from .combine_lora import average, combine_lora, whole_tensors, work

REPORT_NAME = "combine_report.json"
COMBINATIONS = ("cat", "svd", "params")

# config fields any two adapters may differ in (targeting is checked by the tensors, init does not change meaning);
# a method adds its own in its Config's ``combine_loose``; what each tensor is comes from its ``tensor_roles``
_LOOSE = {"targets", "exclude", "layers", "layers_pattern", "modules_to_save", "adapter_dtype", "dropout", "init",
          "init_weights"}


@dataclass
class _Adapter:
    folder: Path
    cfg: DeltaConfig
    delta: dict[str, Tensor]  # the method's tensors, keyed as read_weights returns them
    saved: dict[str, Tensor]  # modules_to_save tensors


class Merger:
    """One operator with its parameters, called on task vectors (``base = 0``) of one tensor position."""

    def __init__(self, method: str, params: dict[str, Any]):
        self.spec = ops.get(method)
        params = dict(params)
        seed = params.pop("seed", None)
        if method == "linear":
            params.setdefault("normalize", False)
        unknown = set(params) - set(self.spec.defaults)
        if unknown:
            raise ValueError(f"{method}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(self.spec.defaults)}")
        self.params = params
        self.generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    def __call__(self, taus: list[Tensor], weights: list[float]) -> Tensor:
        kw = dict(self.params)
        if "weight" in self.spec.defaults:
            kw["weight"] = weights
        elif any(w != 1 for w in weights):
            raise ValueError(f"{self.spec.name} takes no per-model weights; pass weights of 1")
        base = torch.zeros_like(taus[0]) if self.spec.needs_base else None
        return ops.apply(self.spec.name, taus, base, generator=self.generator, **kw)


def combine(adapters: Sequence[str | os.PathLike], weights: Sequence[float], method: str = "linear",
            out: str | os.PathLike | None = None, *, combination: str | None = None, rank: int | None = None,
            ia3_space: str = "log", keep_modules_to_save: str = "average", allow_pickle: bool = False,
            overwrite: bool = False, **params: Any) -> Path | dict[str, Any]:
    """Combine saved adapters into one, ``sum_i w_i delta_i`` or any operator of ``deltatune.merge.ops``.

    adapters: adapter folders (same method, same adapted modules); weights: one per adapter (may be < 0).
    method: an operator name (``linear``, ``task_arithmetic``, ``ties``, ...); ``params``: its parameters
        (``density=0.5``, ``lambda_=1.0``, ``seed=0`` for random operators).
    combination: LoRA only: ``"cat"`` (exact), ``"svd"`` (any operator, then rank-``rank`` SVD) or ``"params"``
        (Zhang et al.); ``None`` picks ``cat`` for linear/task_arithmetic, else ``svd`` (DoRA, which is not
        additive: ``params``, its magnitudes averaged). Other methods: ``None``.
    ia3_space: ``"log"`` (default) or ``"linear"``, how IA3 scales combine.
    keep_modules_to_save: ``"average"`` (weighted average; shapes must agree), ``"first"`` or ``"none"``.
    out: the folder to write (atomically; with ``combine_report.json``); returns its path. ``None``: returns
        ``{"config", "state", "report"}`` instead (``dm.add(res["config"], name, state=res["state"])`` loads it).

    Bad input raises a ``ValueError`` / ``FileNotFoundError`` naming the folder, module, key or shapes, and
    writes nothing.
    """
    folders = [Path(a) for a in adapters]
    weights = [float(w) for w in weights]
    if not folders:
        raise ValueError("combine: no adapters given")
    if len(weights) != len(folders):
        raise ValueError(f"combine: {len(weights)} weights for {len(folders)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"combine: weights must be finite, got {weights}")
    if combination is not None and combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS} or None, got {combination!r}")
    if ia3_space not in ("log", "linear"):
        raise ValueError(f"ia3_space must be 'log' or 'linear', got {ia3_space!r}")
    if keep_modules_to_save not in ("average", "first", "none"):
        raise ValueError(f"keep_modules_to_save must be 'average', 'first' or 'none', got {keep_modules_to_save!r}")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    if out is not None:
        _check_out(Path(out), overwrite)
    merge = Merger(method, params)
    ads = [_read(f, allow_pickle) for f in folders]
    _check_compatible(ads)
    first = ads[0]
    lora = bool(first.cfg.low_rank_pairs)  # a plain s B A update (LoRA, DoRA): exact rank-level combinations
    if combination is None and lora:
        exact = method in ("linear", "task_arithmetic")
        combination = "params" if whole_tensors(first.cfg, first.delta) else "cat" if exact else "svd"
    if combination is not None and not lora:
        raise ValueError(f"combination={combination!r} is for LoRA adapters; {first.cfg.type} adapters combine "
                         f"parameter by parameter (combination=None)")
    if rank is not None and combination != "svd":
        raise ValueError("rank applies to combination='svd' only")
    if not lora and min(weights) < 0 and not any(first.cfg.tensor_role(k)[0] in ("delta", "scale", "log_scale")
                                                 for k in first.delta):
        raise ValueError(f"{first.cfg.type}: its tensors are whole parameters, not deltas: negative weights (negation) "
                         f"mean nothing here; use non-negative weights (averaging)")
    report: dict[str, Any] = {"adapters": [str(f) for f in folders], "weights": weights, "method": method,
                              "params": {k: v for k, v in params.items()}, "type": first.cfg.type,
                              "combination": combination or "params"}
    if lora:
        cfg, state, modules = combine_lora([(a.folder, a.cfg, a.delta) for a in ads], weights, method, params,
                                           merge, combination, rank)
        report["modules"] = modules
        if combination == "svd":
            report["max_rel_error"] = max((m["rel_error"] for m in modules.values()), default=0.0)
    else:
        cfg = first.cfg
        state = _combine_params(ads, weights, merge, ia3_space)
    saved, mts = _combine_saved(ads, weights, keep_modules_to_save)
    state.update(saved)
    cfg = cfg.model_copy(update={"modules_to_save": mts})
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{k}: the combination holds NaN or inf values (non-finite inputs?); nothing was written")
    if out is None:
        return {"config": cfg, "state": state, "report": report}
    return _write(Path(out), cfg, state, report, overwrite)


def negate(adapter: str | os.PathLike, out: str | os.PathLike | None = None, **kw: Any) -> Path | dict[str, Any]:
    """The adapter's negation, ``-delta`` (``combine([adapter], [-1], out=out)``): LoRA negates B only, IA3
    inverts ``l`` (log space; ``ia3_space="linear"``: ``2 - l``), bottleneck adapters negate the up-projection."""
    return combine([adapter], [-1.0], "linear", out, **kw)


# -- reading and checking ----------------------------------------------------------------------------
def _read(folder: Path, allow_pickle: bool) -> _Adapter:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: adapter folder not found")
    cfg = read_config(folder)
    tensors = read_weights(folder, allow_pickle, cfg.peft_prefix)
    specs = cfg.modules_to_save or []
    saved, delta = {}, {}
    for k, t in tensors.items():
        bits = k.split(".")
        in_saved = bool(specs) and any(matches(specs, ".".join(bits[:i])) for i in range(1, len(bits)))
        (saved if in_saved else delta)[k] = t
    return _Adapter(folder, cfg, delta, saved)


def _module_of(cfg: DeltaConfig, key: str) -> str:
    """The module path in a tensor key, for messages (the part before the method's parameter name)."""
    name = cfg.tensor_role(key)[1]
    return key[: -len(name) - 1] if name else key.rsplit(".", 1)[0]


def _check_compatible(ads: list[_Adapter]) -> None:
    first = ads[0]
    loose = _LOOSE | first.cfg.combine_loose
    base = first.cfg.to_dict()
    for a in ads[1:]:
        if a.cfg.type != first.cfg.type:
            raise ValueError(f"cannot combine different methods: {first.folder} is {first.cfg.type}, "
                             f"{a.folder} is {a.cfg.type}")
        other = a.cfg.to_dict()
        for k in sorted(set(base) | set(other)):
            if k not in loose and base.get(k) != other.get(k):
                raise ValueError(f"config field {k!r} differs: {first.folder} has {base.get(k)!r}, {a.folder} has "
                                 f"{other.get(k)!r}; adapters to combine must share it")
        only0, only1 = sorted(set(first.delta) - set(a.delta)), sorted(set(a.delta) - set(first.delta))
        if only0 or only1:
            m0 = sorted({_module_of(first.cfg, k) for k in only0})[:5]
            m1 = sorted({_module_of(first.cfg, k) for k in only1})[:5]
            raise ValueError(f"different target modules: only {first.folder} adapts {m0}, only {a.folder} adapts {m1}")
        for k, t0 in first.delta.items():
            t = a.delta[k]
            fixed = k in first.cfg.shared_keys or not t0.is_floating_point()
            if fixed and not (t.shape == t0.shape and torch.equal(t, t0)):
                raise ValueError(f"{k}: {a.folder} and {first.folder} differ in this fixed tensor (shared projections "
                                 f"or indices must be identical to combine)")
            lora_rank_dim = any(k.endswith("." + n) for pair in first.cfg.low_rank_pairs for n in pair)
            if not lora_rank_dim and t.shape != t0.shape:
                raise ValueError(f"module {_module_of(first.cfg, k)!r}: {k} has shape {tuple(t0.shape)} in {first.folder} but "
                                 f"{tuple(t.shape)} in {a.folder}")


# -- combining ---------------------------------------------------------------------------------------
def _combine_tensor(cfg: DeltaConfig, key: str, ts: list[Tensor], weights: list[float], merge: Merger,
                    ia3_space: str) -> Tensor:
    xs = [work(t) for t in ts]
    role = cfg.tensor_role(key)[0]
    if role == "delta":
        res = merge(xs, weights)
    elif role == "factor":
        res = merge(xs, [abs(w) for w in weights])
    elif role in ("scale", "log_scale"):
        if role == "log_scale" and ia3_space == "log":
            if any((x <= 0).any() for x in xs):
                raise ValueError(f"{key}: IA3 scales <= 0 have no logarithm; use ia3_space='linear'")
            res = merge([x.log() for x in xs], weights).exp()
        else:
            res = 1 + merge([x - 1 for x in xs], weights)
    else:
        res = average(key, xs, weights)
    return res.to(ts[0].dtype)


def _combine_params(ads: list[_Adapter], weights: list[float], merge: Merger, ia3_space: str) -> dict[str, Tensor]:
    first, out = ads[0], {}
    for k, t0 in first.delta.items():
        if k in first.cfg.shared_keys or not t0.is_floating_point():
            out[k] = t0
        else:
            out[k] = _combine_tensor(first.cfg, k, [a.delta[k] for a in ads], weights, merge, ia3_space)
    return out


def _combine_saved(ads: list[_Adapter], weights: list[float], keep: str) -> tuple[dict[str, Tensor], list | None]:
    """modules_to_save tensors of the result and its ``modules_to_save`` list."""
    first = ads[0]
    if keep == "none":
        return {}, None
    if keep == "first":
        return dict(first.saved), first.cfg.modules_to_save
    for a in ads[1:]:
        if set(a.saved) != set(first.saved):
            mods = sorted({k.rsplit(".", 1)[0] for k in set(a.saved) ^ set(first.saved)})
            raise ValueError(f"modules_to_save differ: {mods} saved by only one of {first.folder}, {a.folder}; "
                             f"pass keep_modules_to_save='first' or 'none'")
        for k, t in a.saved.items():
            if t.shape != first.saved[k].shape:
                raise ValueError(f"modules_to_save module {k.rsplit('.', 1)[0]!r}: {k} has shape "
                                 f"{tuple(first.saved[k].shape)} in {first.folder} but {tuple(t.shape)} in {a.folder}; "
                                 f"pass keep_modules_to_save='first' or 'none'")
    out = {k: average(k, [a.saved[k] for a in ads], weights).to(t.dtype) for k, t in first.saved.items()}
    return out, first.cfg.modules_to_save


# -- writing -----------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pick another folder or pass overwrite=True "
                              f"(command line: --overwrite)")


def _write(out: Path, cfg: DeltaConfig, state: dict[str, Tensor], report: dict, overwrite: bool) -> Path:
    """Write the adapter folder into a temporary folder next to ``out``, then rename it into place."""
    config = config_dict(cfg, cfg.targets)
    tensors = {(k if "." not in k or k in cfg.shared_keys else cfg.peft_prefix + k): t.detach().cpu().contiguous()
               for k, t in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.combine-{os.getpid()}.tmp"
    old = out.parent / f".{out.name}.combine-{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_adapter_folder(tmp, *adapter_blob(tensors), config,
                             {REPORT_NAME: json.dumps(report, indent=2, default=str)})
        if out.is_dir() and any(out.iterdir()):
            _check_out(out, overwrite)
            out.rename(old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out
