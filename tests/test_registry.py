"""The registry: every method is reachable by name, and its defaults work on Llama, GPT-2 and BERT untargeted."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import logits

METHODS = [m for m in dt.available_methods() if m not in ("union", "fusion")]  # both combine other configs
NOT_IDENTITY_BY_DEFAULT = {"fourierft"}
# the tiny models' 16 x 32 weights have fewer entries than FourierFT's default 1000 frequencies (a clear error)
TINY = {"fourierft": {"n_frequency": 100}}  # PEFT's default spectrum init is N(0, 1); init_weights=True gives zeros


def test_every_method_is_listed_and_built_by_name():
    assert len(METHODS) >= 22
    for m in METHODS:
        cfg = dt.config(m)
        assert cfg.type == m
        assert getattr(dt, type(cfg).__name__) is type(cfg)  # dt.<Config class> works for every method
    with pytest.raises(ValueError, match="unknown method 'nope'.*lora"):
        dt.config("nope")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_defaults_work_untargeted(zoo, method, kind):
    model = zoo.build(kind)
    x = zoo.inputs(kind)
    y0 = zoo.output(model, x)
    torch.manual_seed(0)
    dm = dt.attach(model, dt.config(method, **TINY.get(method, {})))
    trainable, total = dm.num_parameters()
    assert 0 < trainable < total
    y = zoo.output(dm, x)
    if method == "prompt_tuning" and kind != "bert":
        y = y[:, -y0.shape[1]:]  # a causal LM's logits gain the virtual positions, as in PEFT
    assert torch.isfinite(y).all()
    if method not in NOT_IDENTITY_BY_DEFAULT and not dm.transforms_inputs:
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=0)
    dm.train()
    out = dm(**x)
    logits(out).float().square().mean().backward()
    assert any(p.grad is not None for p in dm.parameters() if p.requires_grad)
