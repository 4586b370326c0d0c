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
Operators: linear, task_arithmetic, ties, magnitude_prune, breadcrumbs(_ties), dare_linear/dare_ties,
della(_linear), slerp, model_stock, pcb, star. Defaults are mergekit's where it has the method, except
DARE/DELLA's ``rescale: inverse`` (the papers'; mergekit's ``rescale: true`` is ``rescale: l1``);
mergekit's ``lambda`` is ``lambda_`` here. Masks and rescales live in ``sparsify.py``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sparsify import (
    _check_density,
    _check_rescale,
    _combine,
    _out,
    _per_model,
    _pruned,
    _work_dtype,
    bernoulli_mask,
    magnitude_mask,
    magprune_keep,
    outlier_mask,
    pcb_balance,
    rescale_masked,
    sign_consensus,
    spectral_truncate,
    task_vectors,
)


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
    # How a streaming executor may split one big tensor into blocks of rows (None: never):
    # "elementwise": each output entry depends only on the same entry of the inputs;
    # "magnitude": elementwise once each model's magnitude ``cutoff`` (see sparsify.magnitude_cutoff)
    # is known, passed as the ``cutoff`` parameter (one value per model).
    blockwise: str | None = None


_OPS: dict[str, OpSpec] = {}


def op(name: str, *, needs_base: bool = True, per_model: Sequence[str] = ("weight",), random: bool = False,
       n_models: int | None = None, blockwise: str | None = None):
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
        if blockwise not in (None, "elementwise", "magnitude"):
            raise ValueError(f"operator {name!r}: blockwise must be None, 'elementwise' or 'magnitude'")
        if blockwise == "magnitude" and "cutoff" not in defaults:
            raise TypeError(f"operator {name!r}: blockwise='magnitude' needs a 'cutoff' keyword argument")
        _OPS[name] = OpSpec(name, fn, needs_base, tuple(per_model), defaults, random, n_models,
                            (fn.__doc__ or "").strip(), blockwise)
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


# -- averaging and task arithmetic ------------------------------------------------------------------
@op("linear", needs_base=False, blockwise="elementwise")
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


@op("task_arithmetic", blockwise="elementwise")
def task_arithmetic(tensors, base, *, weight: list[float] | None = None, normalize: bool = False,
                    lambda_: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): ``theta = theta_base + lambda * sum_i w_i tau_i``.

    Negative weights subtract a task (forgetting by negation). ``normalize`` divides by ``sum_i w_i``.
    """
    return _combine(task_vectors(tensors, base), base, weight, consensus=None, normalize=normalize,
                    lambda_=lambda_)


# -- magnitude sparsification: TIES, magnitude pruning, breadcrumbs -----------------------------------
@op("ties", per_model=("weight", "density"), blockwise="magnitude")
def ties(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
         normalize: bool = True, lambda_: float = 1.0, consensus: str = "sum", rescale: str = "none",
         cutoff: Sequence[float] | None = None) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    ``tau_i`` keeps its top-``density_i`` entries by magnitude; ``gamma = sign(sum_i w_i tau_i)``;
    ``theta = theta_base + lambda * sum_i w_i tau_i [sign(tau_i) = gamma] / sum_i w_i [sign(tau_i) = gamma]``
    (the division is skipped with ``normalize=False``; entries no model keeps stay at the base).
    ``rescale: l1`` rescales each trimmed ``tau_i`` to its L1 norm (mergekit's ``rescale: true``).
    ``cutoff`` (one per model, from ``sparsify.magnitude_cutoff`` over the WHOLE tensor) keeps
    ``|tau_i| >= cutoff_i`` instead of ranking this tensor: how a streaming merge trims a big tensor
    block by block (equal to the top-k unless magnitudes tie at the cut-off).
    """
    _check_density("ties", density)
    _check_rescale("ties", rescale, ("none", "l1"))
    taus = _pruned(tensors, base, density, _magnitude_fn(density, cutoff, rescale, "ties"), rescale)
    return _combine(taus, base, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


@op("magnitude_prune", per_model=("weight", "density"), blockwise="magnitude")
def magnitude_prune(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
                    normalize: bool = False, lambda_: float = 1.0, rescale: str = "none",
                    cutoff: Sequence[float] | None = None) -> Tensor:
    """Task arithmetic on magnitude-pruned task vectors: ``tau_i`` keeps its top-``density_i`` entries by
    ``|tau_i|`` (``k = max(1, int(density N))``), then ``theta = theta_base + lambda * sum_i w_i tau_i``
    (``/ sum_i w_i`` with ``normalize``). TIES without the sign election; ``cutoff`` as in ``ties``."""
    _check_density("magnitude_prune", density)
    _check_rescale("magnitude_prune", rescale, ("none", "l1"))
    taus = _pruned(tensors, base, density, _magnitude_fn(density, cutoff, rescale, "magnitude_prune"), rescale)
    return _combine(taus, base, weight, consensus=None, normalize=normalize, lambda_=lambda_)


def _magnitude_fn(density, cutoff, rescale: str, name: str):
    """The trim of ``ties`` / ``magnitude_prune``: top-k of this tensor, or ``|tau| >= cutoff``."""
    if cutoff is None:
        return lambda tau, i: magnitude_mask(tau, density[i])
    if len(cutoff) != len(density):
        raise ValueError(f"{name}: 'cutoff' has {len(cutoff)} values for {len(density)} models")
    if rescale != "none":
        raise ValueError(f"{name}: 'cutoff' (block-wise trimming) cannot be combined with rescale={rescale!r}, "
                         "which needs the whole tensor's norm")
    return lambda tau, i: tau.abs() >= cutoff[i] if density[i] < 1 else torch.ones_like(tau, dtype=torch.bool)


def _breadcrumbs(name, tensors, base, weight, density, gamma, normalize, lambda_, rescale, consensus):
    _check_density(name, density)
    _check_rescale(name, rescale, ("none", "l1"))
    for i, g in enumerate(gamma):
        if not 0 <= g < 1:
            raise ValueError(f"{name}: gamma must be in [0, 1), got {g} for model {i}")
    taus = _pruned(tensors, base, density, lambda tau, i: outlier_mask(tau, density[i], gamma[i]), rescale)
    return _combine(taus, base, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


@op("breadcrumbs", per_model=("weight", "density", "gamma"))
def breadcrumbs(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
                gamma: list[float] | None = 0.01, normalize: bool = False, lambda_: float = 1.0,
                rescale: str = "none") -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): each ``tau_i`` loses its largest ``gamma_i`` fraction
    (outliers) and its smallest entries, keeping ``density_i`` of them (see ``outlier_mask``); then task
    arithmetic ``theta = theta_base + lambda * sum_i w_i tau_i`` (``/ sum_i w_i`` with ``normalize``).
    Defaults are mergekit's (``density=1`` keeps everything: give a density)."""
    return _breadcrumbs("breadcrumbs", tensors, base, weight, density, gamma, normalize, lambda_, rescale, None)


@op("breadcrumbs_ties", per_model=("weight", "density", "gamma"))
def breadcrumbs_ties(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
                     gamma: list[float] | None = 0.01, normalize: bool = False, lambda_: float = 1.0,
                     rescale: str = "none", consensus: str = "sum") -> Tensor:
    """Breadcrumbs masks, then TIES' sign election and disjoint merge (see ``ties``)."""
    return _breadcrumbs("breadcrumbs_ties", tensors, base, weight, density, gamma, normalize, lambda_,
                        rescale, consensus)


# -- random drops: DARE, DELLA ----------------------------------------------------------------------
def _dare(name, tensors, base, weight, density, how, normalize, lambda_, consensus, generator):
    _check_density(name, density)
    _check_rescale(name, how, ("inverse", "l1", "none"))
    taus = task_vectors(tensors, base)
    for i, d in enumerate(density):
        if d < 1:  # one draw per model, in model order: the same RNG stream as mergekit's
            taus[i] = rescale_masked(taus[i], bernoulli_mask(d, taus[i], generator), how, keep=d)
    return _combine(taus, base, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


@op("dare_linear", per_model=("weight", "density"), random=True)
def dare_linear(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
                rescale: str = "inverse", normalize: bool = False, lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al. 2024), drop and rescale, then task arithmetic.

    Each entry of ``tau_i`` is dropped with probability ``p = 1 - density_i``: ``m ~ Bernoulli(1 - p)``,
    ``tau_i' = m * tau_i / (1 - p)`` (``rescale: inverse``, the paper's, unbiased: ``E[tau_i'] = tau_i``;
    ``l1``: mergekit's norm matching; ``none``); ``theta = theta_base + lambda * sum_i w_i tau_i'``
    (``/ sum_i w_i`` with ``normalize``). Seeded by ``generator``.
    """
    return _dare("dare_linear", tensors, base, weight, density, rescale, normalize, lambda_, None, generator)


@op("dare_ties", per_model=("weight", "density"), random=True)
def dare_ties(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
              rescale: str = "inverse", normalize: bool = False, lambda_: float = 1.0, consensus: str = "sum",
              generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop and rescale (see ``dare_linear``), then TIES' sign election and disjoint merge (``ties``).
    ``normalize`` defaults to mergekit's ``false`` for this method."""
    return _dare("dare_ties", tensors, base, weight, density, rescale, normalize, lambda_, consensus, generator)


def _della(name, tensors, base, weight, density, epsilon, how, normalize, lambda_, consensus, generator):
    _check_density(name, density)
    _check_rescale(name, how, ("inverse", "l1", "none"))
    for i, (d, e) in enumerate(zip(density, epsilon)):
        if d < 1 and not (e >= 0 and d - e > 0 and d + e <= 1):
            raise ValueError(f"{name}: epsilon must keep density +/- epsilon within (0, 1]; got density {d}, "
                             f"epsilon {e} for model {i}")
    taus = task_vectors(tensors, base)
    for i, d in enumerate(density):
        if d < 1:
            keep = magprune_keep(taus[i], d, epsilon[i])
            taus[i] = rescale_masked(taus[i], bernoulli_mask(keep, taus[i], generator), how, keep=keep)
    return _combine(taus, base, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


@op("della", per_model=("weight", "density", "epsilon"), random=True)
def della(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
          epsilon: list[float] | None = 0.15, rescale: str = "inverse", normalize: bool = True,
          lambda_: float = 1.0, consensus: str = "sum", generator: torch.Generator | None = None) -> Tensor:
    """DELLA-merging (Deep et al. 2024): MagPrune, then TIES' sign election and disjoint merge.

    MagPrune keeps entry ``k`` of ``tau_i`` with probability ``p_k = density_i - epsilon_i +
    2 epsilon_i r_k / (n - 1)``, ``r_k`` its magnitude rank within its row (0 = smallest; see
    ``magprune_keep``), and rescales survivors by ``1 / p_k`` (``rescale: inverse``, the paper's;
    ``l1``: mergekit's; ``none``). Seeded by ``generator``.
    """
    return _della("della", tensors, base, weight, density, epsilon, rescale, normalize, lambda_, consensus,
                  generator)


@op("della_linear", per_model=("weight", "density", "epsilon"), random=True)
def della_linear(tensors, base, *, weight: list[float] | None = None, density: list[float] | None = 1.0,
                 epsilon: list[float] | None = 0.15, rescale: str = "inverse", normalize: bool = False,
                 lambda_: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """DELLA's MagPrune (see ``della``), then task arithmetic ``theta_base + lambda * sum_i w_i tau_i'``."""
    return _della("della_linear", tensors, base, weight, density, epsilon, rescale, normalize, lambda_, None,
                  generator)


# -- geometry: SLERP, Model Stock ------------------------------------------------------------------
@op("slerp", needs_base=False, per_model=(), n_models=2)
def slerp(tensors, base, *, t: float | None = None, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical linear interpolation between two models (mergekit's convention: ``t = 0`` gives
    ``tensors[0]``, ``t = 1`` gives ``tensors[1]``).

    With ``a, b`` the flattened tensors and ``cos(Omega) = a.b / (|a| |b|)``:
    ``slerp = sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b``; when
    ``|cos(Omega)| > dot_threshold`` (nearly colinear or opposite) it falls back to ``(1 - t) a + t b``.
    """
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise ValueError(f"slerp: parameter 't' (a number; 0 gives the first model) is required, got {t!r}")
    dt = _work_dtype(tensors[0])
    a, b = (x.to(dt).flatten() for x in tensors)
    if a.numel() == 0:
        return tensors[0].clone()
    na, nb = a.norm(), b.norm()
    na, nb = (torch.where(x > eps, x, 1) for x in (na, nb))
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        omega = math.acos(dot)
        s = math.sin(omega)
        out = (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b
    return _out(out.view(tensors[0].shape), tensors[0])


@op("model_stock", per_model=())
def model_stock(tensors, base, *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024): interpolate the average of ``k >= 2`` fine-tuned models towards
    the base by their angle.

    ``cos`` = the mean over pairs ``i < j`` of ``cos(tau_i, tau_j)``; ``t = k cos / (1 + (k - 1) cos)``;
    ``theta = t * mean_i(theta_i) + (1 - t) * theta_base``. As mergekit: the angle is over the whole
    tensor (``filter_wise``: per row, i.e. along the last dimension; a 1-D tensor is one row), and where
    ``1 + (k - 1) cos`` vanishes ``t = 0`` (the base).
    """
    k = len(tensors)
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models besides the base, got {k}")
    dt = _work_dtype(base)
    shape = base.shape
    w0 = base.to(dt)
    ws = [x.to(dt) for x in tensors]
    if not filter_wise:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    elif w0.dim() < 2:
        w0, ws = w0.reshape(1, -1), [x.reshape(1, -1) for x in ws]
    taus = [x - w0 for x in ws]
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((taus[i] * taus[j]).sum(dim=-1) / norms).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    denom = 1 + (k - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, 0, k * c / torch.where(singular, 1, denom))
    avg = torch.stack(ws).mean(0)
    return _out((t * avg + (1 - t) * w0).reshape(shape), base)


# -- balancing and spectral: PCB, STAR -------------------------------------------------------------
@op("pcb", per_model=("weight", "density"))
def pcb(tensors, base, *, weight: list[float] | None = 1.0, density: list[float] | None = 0.1,
        lambda_: float = 1.0) -> Tensor:
    """PCB-merging (Du et al. 2024, Parameter Competition Balancing).

    From the task vectors ``d_i``, the balancing matrix ``b_i = b_intra_i * b_inter_i`` with
    ``b_intra_i = Softmax(n * Norm(d_i * d_i))`` and ``b_inter_i = sum_j Softmax(Norm(d_i * d_j))``
    (Norm: min-max over the tensor's entries; Softmax over them); drop: ``b_hat_i = b_i`` on the top
    ``density_i`` (the paper's ratio ``r``) of ``b_i``, 0 elsewhere (see ``sparsify.pcb_balance``); merge:

        theta = theta_base + lambda * sum_i w_i b_hat_i d_i / sum_i b_hat_i

    (entries no model keeps stay at the base; ``w_i = 1`` is the paper's). Per tensor, as mergekit
    works; the official code balances the whole flattened model, clamps outliers and uses exp/tanh in
    place of the softmaxes.
    """
    _check_density("pcb", density)
    taus = task_vectors(tensors, base)
    b_hat = pcb_balance(taus, density)
    total = b_hat.sum(0)
    mixed = (b_hat * taus * _per_model(weight, taus)).sum(0) / torch.where(total > 0, total, 1)
    return _out(base.to(mixed.dtype) + lambda_ * mixed, base)


@op("star", per_model=("weight",))
def star(tensors, base, *, weight: list[float] | None = 1.0, eta: float = 0.4, normalize: bool = True,
         lambda_: float = 1.0) -> Tensor:
    """STAR (Lee et al. 2025, Spectral Truncation And Rescale).

    Each task matrix ``tau_i = U diag(s) V^T`` keeps the fewest top singular values holding ``eta`` of
    its nuclear norm (``sum_{k<=r} s_k >= eta sum_k s_k``), rescaled by ``sum_k s_k / sum_{k<=r} s_k`` to
    restore it (see ``sparsify.spectral_truncate``); tensors with more than 2 dimensions are taken as
    ``(shape[0], -1)`` matrices, 1-D ones are kept whole. Then the paper's average:

        theta = theta_base + lambda * sum_i w_i tau_i' / sum_i w_i       (``normalize=False``: no division)
    """
    if not isinstance(eta, (int, float)) or not 0 < eta <= 1:
        raise ValueError(f"star: eta is the fraction of the nuclear norm kept, in (0, 1] (0.4 = 40%), got {eta!r}")
    taus = task_vectors(tensors, base)
    if taus.dim() >= 3:
        for i in range(taus.shape[0]):
            m = taus[i].reshape(taus.shape[1], -1)
            taus[i] = spectral_truncate(m, eta).view(taus.shape[1:])
    return _combine(taus, base, weight, consensus=None, normalize=normalize, lambda_=lambda_)


__all__ = ["OpSpec", "apply", "available", "get", "magnitude_mask", "op", "sign_consensus", "task_vectors"]
