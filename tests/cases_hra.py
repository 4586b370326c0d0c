"""Conformance cases for HRA (methods/hra.py). Parameter count: one (in,) vector per reflection, from the shapes."""

from __future__ import annotations

from torch import nn

import deltatune as dt
from method_cases import Case


def hra_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """r vectors of the input width (nn.Linear: in_features; GPT-2 Conv1D: weight (in, out))."""
    inp = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]
    return inp * cfg.r, inp * cfg.r


def _pair(**kw):
    return (lambda: dt.config("hra", **kw)), (lambda: dt.config("hra", init_weights=False, **kw))


# multiplicative (two at one module do not add); like OFT, rotating the inputs of the tiny GPT-2's layers can leave
# its greedy tokens unchanged
_ORTH = {"additive": False, "weak_generation": ("gpt2",)}
CASES: list[Case] = [
    Case("hra", *_pair(r=4)[:1], ("mlp", "llama", "gpt2", "bert"), hra_count, _pair(r=4)[1], **_ORTH),
    # Gram-Schmidt turns PEFT's paired start into noise directions (warned): the GS case starts random
    Case("hra-gs", *_pair(r=4, apply_GS=True)[1:], ("mlp", "llama"), hra_count, _pair(r=4, apply_GS=True)[1],
         identity=False, **_ORTH),
]
