"""Merge operators: pure functions on tensors, one registered per method (mergekit's shape).

Every operator merges ONE tensor position across models. The same function serves adapter-level
combination (``dt.combine``), checkpoint-level streaming merges (``deltatune merge RECIPE.yaml``)
and anything else that has a list of tensors.

Signature of an operator::

    fn(tensors: list[Tensor], base: Tensor | None, *, weight: list[float], <per-model params as
       lists, one value per model>, <shared params as scalars>, generator: torch.Generator | None)
       -> Tensor

- ``tensors`` are the models' tensors (same shape), ``base`` the base model's (``None`` for
  operators that do not need one). Task vectors are ``tau_i = tensors[i] - base``.
- Per-model parameters (``weight``, ``density``, ...) arrive as lists aligned with ``tensors``; the
  caller (``apply``) broadcasts scalars. Shared parameters are scalars.
- Arithmetic is done in float32 (or float64 if given) and the result is returned in the dtype of
  ``base`` (or of ``tensors[0]``); inputs are never modified.
- Random operators (DARE, DELLA) take a ``generator``: the same seed gives the same merge.

Register with ``@op("name", ...)``; ``apply(name, tensors, base, **params)`` validates and calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OpSpec:
    """What the executor needs to know about an operator, and nothing about how it works."""

    name: str
    fn: Callable[..., Tensor]
    needs_base: bool            # operates on task vectors theta_i - theta_base
    per_model: tuple[str, ...]  # parameters given one value per model (lists)
    defaults: dict              # every parameter's default (per-model and shared)
    random: bool                # takes a torch.Generator
    n_models: int | None        # exact number of non-base models required (slerp: 2), or None
    doc: str


_OPS: dict[str, OpSpec] = {}


def op(name: str, *, needs_base: bool = True, per_model: Sequence[str] = ("weight",), random: bool = False,
       n_models: int | None = None):
    """Decorator registering a merge operator under ``name`` (see the module docstring for the contract)."""

    def deco(fn):
        if name in _OPS:
            raise ValueError(f"merge operator {name!r} is already registered")
        sig = inspect.signature(fn)
        defaults = {k: p.default for k, p in sig.parameters.items()
                    if p.kind is p.KEYWORD_ONLY and k != "generator"}
        missing = [k for k in per_model if k not in defaults]
        if missing:
            raise TypeError(f"operator {name!r}: per-model parameters {missing} are not keyword arguments")
        _OPS[name] = OpSpec(name, fn, needs_base, tuple(per_model), defaults, random, n_models,
                            (fn.__doc__ or "").strip())
        return fn

    return deco


def get(name: str) -> OpSpec:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_OPS)


def apply(name: str, tensors: Sequence[Tensor], base: Tensor | None = None, *, seed: int | None = None,
          generator: torch.Generator | None = None, **params) -> Tensor:
    """Validate and run operator ``name`` on one tensor position.

    Per-model parameters may be scalars (same for every model) or sequences of ``len(tensors)``.
    Unknown parameters, wrong list lengths, a missing base and mismatched shapes are errors that
    name the problem.
    """
    spec = get(name)
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{name}: no models to merge")
    if spec.n_models is not None and len(tensors) != spec.n_models:
        raise ValueError(f"{name} merges exactly {spec.n_models} models, got {len(tensors)}")
    if spec.needs_base and base is None:
        raise ValueError(f"{name} works on task vectors and needs a base model")
    shape = (base if base is not None else tensors[0]).shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise ValueError(f"{name}: model {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    unknown = set(params) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(spec.defaults)}")
    kwargs = {}
    for k, default in spec.defaults.items():
        v = params.get(k, default)
        if k in spec.per_model:
            if v is None:
                raise ValueError(f"{name}: parameter {k!r} is required for every model")
            if isinstance(v, (int, float)):
                v = [float(v)] * len(tensors)
            v = [float(x) for x in v]
            if len(v) != len(tensors):
                raise ValueError(f"{name}: {k!r} has {len(v)} values for {len(tensors)} models")
        kwargs[k] = v
    if spec.random:
        if generator is None:
            generator = torch.Generator(device=tensors[0].device)
            generator.manual_seed(0 if seed is None else seed)
        kwargs["generator"] = generator
    return spec.fn(tensors, base, **kwargs)


# -- helpers shared by the operators -----------------------------------------------------------------
def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vectors(tensors: Sequence[Tensor], base: Tensor) -> Tensor:
    """Stack ``tau_i = theta_i - theta_base``: shape ``(n_models, *base.shape)``, float32."""
    dt = _work_dtype(base)
    b = base.to(dt)
    return torch.stack([t.to(dt) - b for t in tensors])


def _per_model(values: Sequence[float], like: Tensor) -> Tensor:
    """Weights as a tensor broadcastable against a stack of task vectors ``like``."""
    w = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries of ``tau`` with the largest |value| (bool mask)."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    k = int(density * tau.numel())
    if k <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    idx = tau.abs().flatten().topk(k, sorted=False).indices
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[idx] = True
    return mask.view_as(tau)


def sign_consensus(taus: Tensor, method: str = "sum") -> Tensor:
    """TIES' elected sign per entry and the mask of task-vector entries that agree with it.

    ``sum``: the sign of the summed (weighted) task vectors (the paper's, mergekit's default);
    ``count``: the majority of signs. Zero sums elect +.
    """
    sign = taus.sign()
    if method == "sum":
        elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    elif method == "count":
        elected = torch.where(sign.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {method!r}")
    return sign == elected


def _out(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


# -- operators ------------------------------------------------------------------------------------
@op("linear", needs_base=False)
def linear(tensors, base, *, weight: list[float] | None = None, normalize: bool = True) -> Tensor:
    """Weighted average of models (model soups): ``sum_i w_i theta_i / sum_i w_i``
    (``normalize=False``: the plain weighted sum)."""
    dt = _work_dtype(tensors[0])
    x = torch.stack([t.to(dt) for t in tensors])
    w = _per_model(weight, x)
    out = (x * w).sum(0)
    if normalize:
        total = float(sum(weight))
        if abs(total) < 1e-8:
            raise ValueError("linear: the weights sum to zero; cannot normalize (set normalize: false)")
        out = out / total
    return _out(out, tensors[0])


@op("task_arithmetic")
def task_arithmetic(tensors, base, *, weight: list[float] | None = None, normalize: bool = False,
                    lambda_: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta = theta_base + lambda * sum_i w_i tau_i``.

    Negative weights subtract a task (forgetting by negation). ``normalize`` divides by ``sum_i w_i``.
    """
    taus = task_vectors(tensors, base)
    w = _per_model(weight, taus)
    mixed = (taus * w).sum(0)
    if normalize:
        total = float(sum(weight))
        mixed = mixed / (total if abs(total) >= 1e-8 else 1.0)
    return _out(base.to(mixed.dtype) + lambda_ * mixed, base)


@op("ties", per_model=("weight", "density"))
def ties(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
         normalize: bool = True, lambda_: float = 1.0, consensus: str = "sum") -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    ``tau_i`` keeps its top-``density_i`` entries by magnitude; ``gamma = sign(sum_i w_i tau_i)``;
    ``theta = theta_base + lambda * sum_i w_i tau_i [sign(tau_i) = gamma] / sum_i w_i [sign(tau_i) = gamma]``
    (the division is skipped with ``normalize=False``; entries no model keeps stay at the base).
    """
    taus = task_vectors(tensors, base)
    for i, d in enumerate(density):
        taus[i] = taus[i] * magnitude_mask(taus[i], d)
    w = _per_model(weight, taus)
    taus = taus * w
    agree = sign_consensus(taus, consensus).to(taus.dtype)
    mixed = (taus * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return _out(base.to(mixed.dtype) + lambda_ * mixed, base)
