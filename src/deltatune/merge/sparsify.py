"""What the merge operators do to task vectors before they combine them: drop, rescale, elect, balance.

Pure functions on float tensors (``deltatune.merge.ops`` calls them in float32, or float64 if given);
they return new tensors and never modify their inputs. ``tau`` is one task vector (any shape),
``taus`` a stack of them, shape ``(n_models, *shape)``.

| function | drops | used by |
|---|---|---|
| ``magnitude_mask`` | all but the top-``density`` entries by ``|tau|`` | ties, magnitude_prune |
| ``outlier_mask`` | the top ``gamma`` (outliers) and the smallest, to keep ``density`` | breadcrumbs |
| ``bernoulli_mask`` | each entry with probability ``1 - keep`` | dare (scalar keep), della (per entry) |
| ``magprune_keep`` | keep probabilities rising with magnitude rank, mean ``density`` | della |
| ``pcb_balance`` | all but the top-``density`` of the PCB balancing matrix | pcb |
| ``spectral_truncate`` | the small singular values, then restores the nuclear norm | star |
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RESCALES = ("inverse", "l1", "none")


def magnitude_mask(tau: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries of ``tau`` with the largest ``|value|`` (bool mask).

    ``k = max(1, int(density * numel))`` as mergekit rounds it: a positive density keeps at least one
    entry; ``density >= 1`` keeps all, ``density <= 0`` none.
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    k = max(1, int(density * tau.numel()))
    idx = tau.abs().flatten().topk(k, sorted=False).indices
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[idx] = True
    return mask.view_as(tau)


def magnitude_cutoff(abs_tau: Tensor, density: float) -> float:
    """The magnitude ``c`` such that ``|tau| >= c`` keeps what ``magnitude_mask`` keeps (the k-th largest
    ``|tau|``, ``k = max(1, int(density * numel))``; more only where magnitudes tie at ``c``).

    ``abs_tau`` holds ``|tau|`` (any shape; it is not modified). ``density >= 1`` gives 0 (keep all)."""
    n = abs_tau.numel()
    if density >= 1 or n == 0:
        return 0.0
    if density <= 0:
        return float("inf")
    k = max(1, int(density * n))
    return float(abs_tau.reshape(-1).kthvalue(n - k + 1).values)


def outlier_mask(tau: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2023): drop the ``gamma`` fraction of largest
    ``|tau|`` (outliers) and the smallest, so that ``int(density * numel)`` entries remain.

    With ``N = numel``, ascending order by magnitude, keep ranks ``[N - k - g, N - g)`` where
    ``k = int(density N)``, ``g = int(gamma N)``; when ``density + gamma > 1`` the top cut shrinks to
    ``N - k``. ``density >= 1`` keeps everything (mergekit's convention).
    """
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.sort(tau.abs().flatten(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom:bottom + keep]] = True
    return mask.view_as(tau)


def bernoulli_mask(keep: float | Tensor, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A 0/1 float mask shaped like ``like``: each entry is 1 with probability ``keep`` (a scalar or a
    tensor of per-entry probabilities). Drawn in float32 with one ``torch.bernoulli`` call, so the same
    generator state gives the same mask as mergekit's draw from the global RNG."""
    if isinstance(keep, Tensor):
        probs = keep.to(torch.float32).expand_as(like)
    else:
        probs = torch.full(like.shape, keep, dtype=torch.float32, device=like.device)
    return torch.bernoulli(probs, generator=generator).to(like.dtype)


def magprune_keep(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities (Deep et al. 2024), shaped like ``tau``.

    Within each row (``tau.reshape(shape[0], -1)``; a 1-D tensor is one row) entries are ranked by
    magnitude, ``r = 0`` smallest ... ``n - 1`` largest, and kept with probability

        p_keep = (density - epsilon) + 2 epsilon * r / (n - 1)

    i.e. drop probabilities fall linearly with magnitude, and the mean keep rate is ``density``.
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(tau, density, dtype=torch.float32)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    rank_norm = ranks / (n - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).view(tau.shape)


def rescale_masked(tau: Tensor, mask: Tensor, how: str, keep: float | Tensor = 1.0, eps: float = 1e-7) -> Tensor:
    """``tau * mask`` rescaled so the pruned vector stands for the whole.

    ``inverse``: divide survivors by their keep probability (DARE's ``1 / (1 - p)``, DELLA's per-entry
    ``1 / (1 - p_i)``), unbiased: ``E[result] = tau``; ``l1``: multiply by ``||tau||_1 / ||tau * mask||_1``
    (mergekit's ``rescale: true``; skipped when either norm is below ``eps``); ``none``: plain mask.
    """
    masked = tau * mask
    if how == "none":
        return masked
    if how == "inverse":
        return masked / keep
    if how == "l1":
        before, after = tau.abs().sum(), masked.abs().sum()
        if before < eps or after < eps:
            return masked
        return masked * (before / after)
    raise ValueError(f"rescale must be one of {RESCALES}, got {how!r}")


def sign_consensus(taus: Tensor, method: str = "sum") -> Tensor:
    """TIES' elected sign per entry and the mask of task-vector entries that agree with it.

    ``sum``: the sign of the summed (weighted) task vectors (the paper's, mergekit's default);
    ``count``: the majority of signs. Zero sums elect +; zero entries never agree.
    """
    sign = taus.sign()
    if method == "sum":
        elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    elif method == "count":
        elected = torch.where(sign.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {method!r}")
    return sign == elected


def _minmax(x: Tensor) -> Tensor:
    """Min-max normalise each row of ``x`` to [0, 1] (a constant row becomes 0)."""
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)


def pcb_balance(taus: Tensor, density: Sequence[float]) -> Tensor:
    """PCB-Merging's dropped balancing matrix ``b_hat`` (Du et al. 2024), shape ``taus.shape``.

    With ``n`` task vectors ``d_i`` flattened, Norm = min-max normalisation over a vector's entries and
    Softmax over them:

        b_intra_i = Softmax(n * Norm(d_i * d_i))                  intra-balancing (self-awareness)
        b_inter_i = sum_j Softmax(Norm(d_i * d_j)), j = 1..n       inter-balancing (cross-awareness)
        b_i       = b_intra_i * b_inter_i
        b_hat_i   = b_i * [b_i among the top density_i of b_i]     drop (the paper's ratio r)
    """
    n = taus.shape[0]
    flat = taus.reshape(n, -1)
    intra = torch.softmax(n * _minmax(flat * flat), dim=-1)
    inter = torch.zeros_like(flat)
    for j in range(n):  # one (n, D) product at a time: memory O(n D), not O(n^2 D)
        inter += torch.softmax(_minmax(flat * flat[j]), dim=-1)
    b = intra * inter
    keep = torch.stack([magnitude_mask(b[i], density[i]) for i in range(n)])
    return (b * keep).view_as(taus)


def spectral_truncate(matrix: Tensor, eta: float) -> Tensor:
    """STAR's truncate-and-rescale of one task matrix (Lee et al. 2025), shape ``(m, n)``.

    ``matrix = U diag(s) V^T``; keep the smallest rank ``r`` whose singular values hold ``eta`` of the
    nuclear norm, ``sum_{k<=r} s_k >= eta * sum_k s_k``, and rescale them to restore it:

        result = U_r diag(s_r * sum_k s_k / sum_{k<=r} s_k) V_r^T          (||result||_* = ||matrix||_*)
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = s.sum()
    if total <= 0:
        return torch.zeros_like(matrix)
    r = min(int((s.cumsum(0) < eta * total).sum()) + 1, s.numel())
    kept = s[:r] * (total / s[:r].sum())
    return (u[:, :r] * kept) @ vh[:r]


# -- shared by the operators: task vectors, validation, the generalized task-arithmetic combine -------
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


def _out(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


def _check_density(name: str, density: Sequence[float]) -> None:
    for i, d in enumerate(density):
        if not 0 < d <= 1:
            raise ValueError(f"{name}: density must be in (0, 1], got {d} for model {i}")


def _check_rescale(name: str, how: str, allowed: Sequence[str]) -> None:
    if how not in allowed:
        raise ValueError(f"{name}: rescale must be one of {list(allowed)}, got {how!r} "
                         "('inverse' = the paper's 1/keep-probability, 'l1' = mergekit's rescale: true, "
                         "'none' = mergekit's rescale: false)")


def _combine(taus: Tensor, base: Tensor, weight: Sequence[float], *, consensus: str | None,
             normalize: bool, lambda_: float) -> Tensor:
    """mergekit's generalized task arithmetic on (already sparsified) task vectors:
    ``theta = theta_base + lambda * sum_i w_i tau_i m_i / D`` with ``m_i`` the sign-consensus mask
    (all ones without consensus) and ``D = sum_i w_i m_i`` if ``normalize`` else 1."""
    w = _per_model(weight, taus)
    taus = taus * w
    if consensus is not None:
        agree = sign_consensus(taus, consensus).to(taus.dtype)
        mixed = (taus * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = taus.sum(0)
        total = float(sum(weight))
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return _out(base.to(mixed.dtype) + lambda_ * mixed, base)


def _pruned(tensors, base, density, mask_fn, how: str) -> Tensor:
    """Task vectors, each masked by ``mask_fn(tau_i, i)`` (skipped at density 1) and rescaled."""
    taus = task_vectors(tensors, base)
    for i, d in enumerate(density):
        if d < 1:
            taus[i] = rescale_masked(taus[i], mask_fn(taus[i], i), how)
    return taus
