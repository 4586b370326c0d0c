"""LoRA adapters combined exactly (rank concatenation), through SVD, or parameter by parameter.

Used by :func:`deltatune.merge.combine.combine`, whose docstring states the equations. Per module, A is
(r, in[, k...]) (``lora_A.weight``; embeddings: ``lora_embedding_A`` (r, num_embeddings)) and B is
(out, r[, 1...]) (``lora_B.weight``; embeddings: ``lora_embedding_B`` (dim, r)); ``dW = s B A`` with B and A
flattened to matrices, so one code path serves linear, convolutional and embedding LoRA.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.config import DeltaConfig

Item = tuple[Path, DeltaConfig, dict[str, Tensor]]  # (folder, config, tensors) of one adapter
Merge = Callable[[list[Tensor], list[float]], Tensor]


def work(t: Tensor) -> Tensor:
    """``t`` in the dtype arithmetic is done in: float32, or float64 if given."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def average(key: str, ts: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_i w_i t_i / sum_i w_i`` (whole tensors: modules_to_save, DoRA magnitudes, ...)."""
    total = sum(weights)
    if abs(total) < 1e-8:
        raise ValueError(f"{key}: a whole tensor is averaged with the weights, which sum to zero; "
                         f"give weights that do not cancel out")
    return sum(w * work(t) for w, t in zip(weights, ts)) / total


def _modules(folder: Path, cfg: DeltaConfig, delta: dict[str, Tensor]) -> dict[str, tuple[str, str]]:
    """Module path -> (A key, B key) of a low-rank adapter's tensors (its config's ``low_rank_pairs``); besides them
    only whole tensors (no role: DoRA's magnitudes) may be in the file."""
    mods = {}
    for k in delta:
        for a, b in cfg.low_rank_pairs:
            for name in (a, b):
                if k.endswith("." + name):
                    mods[k[: -len(name) - 1]] = (a, b)
    for path, (a, b) in mods.items():
        for key in (a, b):
            if f"{path}.{key}" not in delta:
                raise ValueError(f"{folder}: {cfg.type} module {path!r} has no {key}")
    known = {f"{p}.{k}" for p, pair in mods.items() for k in pair}
    extra = sorted(k for k in set(delta) - known if cfg.tensor_role(k)[0] is not None)
    if extra:
        raise ValueError(f"{folder}: unexpected tensors in a {cfg.type} adapter: {extra[:5]}")
    return mods


def _scale(folder: Path, cfg: DeltaConfig, path: str, r: int) -> float:
    if cfg.rank(path) != r:
        raise ValueError(f"{folder}: module {path!r} has rank {r} in the file but {cfg.rank(path)} in its config")
    return cfg.scaling(path)


def _out_config(cfg: DeltaConfig, ranks: dict[str, int], scales: dict[str, float]) -> DeltaConfig:
    """A config with each module's rank (the most common as ``r``, the others in ``rank_pattern``) and each
    module's scale ``scales[path]`` (the first adapter's, so its B is only multiplied by its weight)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r) * r
    data = cfg.model_dump()
    data.update(r=r, alpha=alpha, use_rslora=False, init="gaussian",
                rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
                alpha_pattern={re.escape(p): scales[p] * k for p, k in ranks.items()
                               if not math.isclose(alpha / k, scales[p], rel_tol=1e-9)})
    return type(cfg)(**data)


def _cat_weights(method: str, params: dict[str, Any], weights: list[float]) -> list[float]:
    """The plain weights ``c_i`` with ``result = sum_i c_i dW_i`` that linear / task_arithmetic compute."""
    if method not in ("linear", "task_arithmetic"):
        raise ValueError(f"combination='cat' is exact for weighted sums only (linear, task_arithmetic), not "
                         f"{method!r}; use combination='svd'")
    w = list(weights)
    if params.get("normalize", False):
        total = sum(w)
        if abs(total) < 1e-8:
            raise ValueError(f"{method}: the weights sum to zero; cannot normalize")
        w = [x / total for x in w]
    lam = float(params.get("lambda_", 1.0))
    return [lam * x for x in w]


def whole_tensors(cfg: DeltaConfig, delta: dict[str, Tensor]) -> list[str]:
    """The keys of a low-rank adapter's tensors outside its (A, B) pairs (DoRA's magnitudes): averaged."""
    pairs = {n for pair in cfg.low_rank_pairs for n in pair}
    return sorted(k for k in delta if not any(k.endswith("." + n) for n in pairs))


def combine_lora(items: list[Item], weights: list[float], method: str, params: dict[str, Any], merge: Merge,
                 combination: str, rank: int | None) -> tuple[DeltaConfig, dict[str, Tensor], dict[str, dict]]:
    """(config, tensors keyed like ``read_weights``, per-module report) of the combined LoRA adapter."""
    folder0, cfg0, delta0 = items[0]
    mods = _modules(folder0, cfg0, delta0)
    whole = whole_tensors(cfg0, delta0)
    for folder, cfg, delta in items:
        _modules(folder, cfg, delta)
        if whole_tensors(cfg, delta) and combination != "params":
            method = type(cfg).__name__.removesuffix("Config")
            raise ValueError(f"{folder}: {method} is not additive (its whole tensors, {whole_tensors(cfg, delta)[0]!r}"
                             f", ..., renormalise the weight), so combination={combination!r} cannot be exact; use "
                             f"combination='params' (approximate)")
    per_module = {}  # path -> (As, Bs, scales)
    for path, (ka, kb) in mods.items():
        As, Bs, scales = [], [], []
        for folder, cfg, delta in items:
            a, b = delta[f"{path}.{ka}"], delta[f"{path}.{kb}"]
            a0, b0 = delta0[f"{path}.{ka}"], delta0[f"{path}.{kb}"]
            if (a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]
                    or b.shape[1] != a.shape[0]):
                raise ValueError(f"module {path!r}: A {tuple(a0.shape)}, B {tuple(b0.shape)} in {folder0} but "
                                 f"A {tuple(a.shape)}, B {tuple(b.shape)} in {folder}")
            if combination == "params" and a.shape[0] != a0.shape[0]:
                raise ValueError(f"module {path!r}: rank {a0.shape[0]} in {folder0} but {a.shape[0]} in {folder}; "
                                 f"combination='params' needs equal ranks (use 'cat' or 'svd')")
            As.append(a)
            Bs.append(b)
            scales.append(_scale(folder, cfg, path, a.shape[0]))
        per_module[path] = (As, Bs, scales)
    run = {"cat": _cat, "svd": _svd, "params": _params}[combination]
    cfg, state, report = run(cfg0, mods, per_module, weights, method, params, merge, rank)
    for key in whole:
        state[key] = average(key, [d[key] for _, _, d in items], weights).to(delta0[key].dtype)
    return cfg, state, report


def _cat(cfg0, mods, per_module, weights, method, params, merge, rank):
    c = _cat_weights(method, params, weights)
    ranks = {p: sum(a.shape[0] for a in As) for p, (As, _, _) in per_module.items()}
    cfg = _out_config(cfg0, ranks, {p: sc[0] for p, (_, _, sc) in per_module.items()})
    state = {}
    for path, (As, Bs, scales) in per_module.items():
        ka, kb = mods[path]
        s_out = cfg.scaling(path)
        state[f"{path}.{ka}"] = torch.cat([work(a) for a in As]).to(As[0].dtype)
        state[f"{path}.{kb}"] = torch.cat([work(b) * (ci * si / s_out) for b, ci, si in zip(Bs, c, scales)],
                                          dim=1).to(Bs[0].dtype)
    return cfg, state, {p: {"rank": k} for p, k in ranks.items()}


def _svd(cfg0, mods, per_module, weights, method, params, merge, rank):
    factors, ranks = {}, {}
    for path, (As, Bs, scales) in per_module.items():
        dense = [s * (work(b).flatten(1) @ work(a).flatten(1)) for a, b, s in zip(As, Bs, scales)]  # (out, in*k)
        m = merge(dense, weights)
        k = min(rank or max(a.shape[0] for a in As), *m.shape)
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        factors[path] = (m, u[:, :k], sv[:k], vh[:k])
        ranks[path] = k
    cfg = _out_config(cfg0, ranks, {p: sc[0] for p, (_, _, sc) in per_module.items()})
    state, report = {}, {}
    for path, (m, u, sv, vh) in factors.items():
        (As, Bs, _), (ka, kb) = per_module[path], mods[path]
        s_out = cfg.scaling(path)
        root = (sv / s_out).sqrt()
        b, a = u * root, root[:, None] * vh
        norm = m.norm()
        err = float((m - s_out * (b @ a)).norm() / norm) if norm > 0 else 0.0
        k = ranks[path]
        state[f"{path}.{ka}"] = a.reshape(k, *As[0].shape[1:]).to(As[0].dtype).contiguous()
        state[f"{path}.{kb}"] = b.reshape(Bs[0].shape[0], k, *Bs[0].shape[2:]).to(Bs[0].dtype).contiguous()
        report[path] = {"rank": k, "rel_error": err}
    return cfg, state, report


def _params(cfg0, mods, per_module, weights, method, params, merge, rank):
    cfg = cfg0.model_copy(update={"init": "gaussian"})
    state = {}
    for path, (As, Bs, scales) in per_module.items():
        ka, kb = mods[path]
        s_out = cfg.scaling(path)
        state[f"{path}.{ka}"] = merge([work(a) for a in As], [abs(w) for w in weights]).to(As[0].dtype)
        state[f"{path}.{kb}"] = merge([work(b) * (s / s_out) for b, s in zip(Bs, scales)], weights).to(Bs[0].dtype)
    return cfg, state, {p: {"rank": As[0].shape[0]} for p, (As, _, _) in per_module.items()}
