"""Conformance cases for the simple per-feature / sparse methods: IA3, SSF, BitFit, LN tuning, sparse FT.

Each count function computes, from the module's shapes and the config alone, how many parameters the
delta adds at one module.
"""

from __future__ import annotations

import re

from torch import nn

import deltatune as dt
from method_cases import Case

TRANSFORMERS = ("llama", "gpt2", "bert")
IA3_FF = ("down_proj", "mlp.c_proj", "output.dense", "dense_4h_to_h")


def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    if isinstance(module, nn.Linear):
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # GPT-2 Conv1D stores (in, out)


def _suffix(names, path: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def ia3_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """One vector: the input width on feedforward modules, the output width elsewhere."""
    fan_in, fan_out = _in_out(module)
    ff = _suffix(cfg.feedforward_modules if cfg.feedforward_modules is not None else IA3_FF, path)
    n = fan_in if ff else fan_out
    return n, n


def ssf_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """A scale and a shift per output feature."""
    n = 2 * (module.weight.shape[-1] if module.weight.dim() == 1 else _in_out(module)[1])
    return n, n


def bitfit_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """One bias entry per output feature (norms: per hidden feature)."""
    n = module.weight.shape[0] if module.weight.dim() == 1 else _in_out(module)[1]
    return n, n


def ln_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """A full copy of the norm's weight (and bias)."""
    n = module.weight.numel() + (module.bias.numel() if getattr(module, "bias", None) is not None else 0)
    return n, n


def sparse_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """round(density * numel) values (at least one); the indices are a buffer, not parameters."""
    numel = module.weight.numel()
    n = max(1, min(numel, round(cfg.density * numel)))
    return n, n


def cfg(cls, **kw):
    return lambda: cls(**kw)


IA3 = type(dt.config("ia3"))
SSF = type(dt.config("ssf"))
BITFIT = type(dt.config("bitfit"))
LN = type(dt.config("ln_tuning"))
SPARSE = type(dt.config("sparse_ft"))

CASES: list[Case] = [
    # the scaled activations barely matter in a random tiny model: IA3 learns slowly (gpt2 trains best)
    Case("ia3", cfg(IA3), ("gpt2", "llama", "bert"), ia3_count, additive=False, jitter_scale=4.0, train_lr=0.3),
    Case("ia3-mlp", cfg(IA3, targets=["0", "2", "4"], feedforward_modules=["2"]), ("mlp",), ia3_count,
         additive=False),
    Case("ssf", cfg(SSF), ("mlp", *TRANSFORMERS), ssf_count, additive=False, merge_adds_params=True),
    Case("ssf-norms", cfg(SSF, targets=["ln_1", "ln_f", "LayerNorm"]), ("gpt2", "bert"), ssf_count, additive=False,
         jitter_scale=2.0, train_lr=0.1),
    Case("bitfit", cfg(BITFIT), ("mlp", *TRANSFORMERS), bitfit_count, merge_adds_params=True),
    Case("bitfit-norms", cfg(BITFIT, include_norms=True), ("gpt2", "bert"), bitfit_count, train_lr=0.1),
    Case("ln_tuning", cfg(LN), TRANSFORMERS, ln_count, additive=False, jitter_scale=2.0, train_lr=0.1),
    Case("sparse_ft", cfg(SPARSE, density=0.05), ("mlp", *TRANSFORMERS), sparse_count),
    Case("sparse_ft-random", cfg(SPARSE, density=0.02, mask="random"), ("mlp", "llama"), sparse_count),
]
