"""The chunked head + cross-entropy equals the plain computation, in value and in every gradient."""

import pytest
import torch
import torch.nn.functional as F

from deltatune.train.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_cross_entropy(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 12, generator=g, requires_grad=True)
    w = torch.randn(30, 12, generator=g, requires_grad=True)
    b = torch.randn(30, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, 30, (50,), generator=g)
    ref = F.cross_entropy(F.linear(h, w, b), t)
    ref_grads = torch.autograd.grad(3.0 * ref, [x for x in (h, w, b) if x is not None])
    got = linear_cross_entropy(h, w, b, t, chunk=chunk)
    got_grads = torch.autograd.grad(3.0 * got, [x for x in (h, w, b) if x is not None])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_gives_same_loss():
    h = torch.randn(9, 4, requires_grad=True)
    w = torch.randn(11, 4)
    t = torch.randint(0, 11, (9,))
    loss = linear_cross_entropy(h, w, None, t, chunk=4)
    loss.backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, t, chunk=2), F.cross_entropy(h @ w.T, t))


def test_bf16_autocast_close_to_float32():
    h = torch.randn(20, 16, requires_grad=True)
    w = torch.randn(40, 16)
    t = torch.randint(0, 40, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, None, t, chunk=8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, t), atol=0.1, rtol=0.05)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), None, torch.tensor([1, -100]))
    with pytest.raises(ValueError, match="no labelled"):
        linear_cross_entropy(torch.randn(0, 4), torch.randn(5, 4), None, torch.zeros(0, dtype=torch.long))
