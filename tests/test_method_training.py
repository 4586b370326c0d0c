"""Every method case learns: 30 AdamW steps on one fixed small batch of a tiny model lower the loss.

Causal LMs train on their own next-token loss, BERT on its classification loss, the MLP and conv
models on the squared error to a fixed random target.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from conftest import logits
from method_cases import CASES

STEPS = 30


def _loss(kind: str, model, x: dict, target: torch.Tensor | None) -> torch.Tensor:
    if kind in ("llama", "gpt2"):
        return model(**x, labels=x["input_ids"]).loss
    if kind == "bert":
        return model(**x, labels=torch.tensor([0, 1, 2])).loss
    return (logits(model(**x)).float() - target).square().mean()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_thirty_steps_lower_the_loss(zoo, case):
    kind = case.models[0]
    model = zoo.build(kind)
    x = zoo.inputs(kind)
    target = None
    if kind in ("mlp", "conv"):
        with torch.no_grad():
            out = logits(model(**x))
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    dm = dt.attach(model, case.make_config())
    params = [p for p in dm.parameters() if p.requires_grad]
    assert params, "no trainable parameters"
    opt = torch.optim.AdamW(params, lr=case.train_lr)
    dm.train()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(kind, dm, x, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < (1 - case.min_drop) * losses[0], f"{case.id} on {kind}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
