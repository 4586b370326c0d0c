"""Cross-entropy through the output head, in row chunks, without materialising the full logits.

For a causal LM the head ``logits = h W^T (+ b)`` over a 49k-token vocabulary is the largest tensor
of a training step (batch 8 x 128 tokens: 1024 x 49152 floats = 200 MB), and the standard path
keeps three of them alive (logits, log-softmax, its gradient) and sweeps each several times. Here the
forward pass walks the rows in chunks, and for each chunk computes the logits, the log-sum-exp, the
loss and, at once, the gradient ``dL/dlogits = (softmax - onehot) / N``, which it pushes straight
through the head (``dL/dh = dL/dlogits W``, and ``dL/dW``, ``dL/db`` when those are trained). Backward
then only scales the stored gradients by the incoming scalar. Same loss and gradients as
``F.cross_entropy(h @ W.T + b, targets)`` (mean over rows), in float32, with one chunk of logits alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.result_type(*tensors)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):  # noqa: D401 - autograd signature
        n = h.shape[0]
        dtype = _compute_dtype(h, weight)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        need = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if need[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # one logits buffer reused by every chunk: fresh 50 MB allocations cost page faults each time
        buf = torch.empty((min(chunk, n), weight.shape[0]), dtype=dtype, device=h.device)
        for s in range(0, n, chunk):
            hc = h[s:s + chunk].to(dtype)
            tc = targets[s:s + chunk]
            rows = torch.arange(len(tc), device=h.device)
            logits = torch.mm(hc, w.t(), out=buf[:len(tc)])
            if b is not None:
                logits.add_(b)
            logits = logits.float()  # a no-op in float32
            # stable log-sum-exp and softmax, in place on the chunk
            m = logits.amax(dim=-1, keepdim=True)
            logits.sub_(m)
            picked = logits[rows, tc]
            logits.exp_()
            z = logits.sum(dim=-1)
            total += (z.log() - picked).sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # dL/dlogits = (softmax - onehot) / n
            g = logits.div_(z[:, None])
            g[rows, tc] -= 1.0
            g.div_(n)
            gd = g.to(dtype)
            if grad_h is not None:
                if grad_h.dtype == dtype:
                    torch.mm(gd, w, out=grad_h[s:s + chunk])
                else:
                    grad_h[s:s + chunk] = (gd @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += (gd.t() @ hc).float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        gh, gw, gb = (next(saved) if has else None for has in ctx.has)
        scale = grad_out.float()
        gh = None if gh is None else gh * scale.to(gh.dtype)
        gw = None if gw is None else (gw * scale).to(ctx.dtypes[0])
        gb = None if gb is None else (gb * scale).to(ctx.dtypes[1])
        return gh, gw, gb, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(h, weight, bias)`` (rows of ``h``: (N, d)) against ``targets`` (N,).

    Computed in chunks of ``chunk`` rows; gradients flow to ``h``, ``weight`` and ``bias`` as usual.
    """
    if h.ndim != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy expects h (N, d) and targets (N,), got {tuple(h.shape)} and "
                         f"{tuple(targets.shape)}")
    if h.shape[0] == 0:
        raise ValueError("linear_cross_entropy: no labelled positions in the batch")
    if targets.min() < 0 or targets.max() >= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets must lie in [0, {weight.shape[0]}) (drop ignored positions, "
                         f"e.g. -100, before calling); got min {int(targets.min())}, max {int(targets.max())}")
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    if grads:
        return _LinearCrossEntropy.apply(h, weight, bias, targets, chunk)
    dtype = _compute_dtype(h, weight)
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = F.linear(h[s:s + chunk].to(dtype), w, b).float()
        total += F.cross_entropy(logits, targets[s:s + chunk], reduction="sum")
    return total / h.shape[0]
