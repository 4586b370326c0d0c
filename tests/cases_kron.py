"""Conformance cases for LoHa, LoKr (methods/lycoris.py), OFT and BOFT (methods/orthogonal.py).

Parameter counts are derived here from the module shapes and the config (LoKr's Kronecker split uses PEFT's
own ``factorization``), independently of deltatune.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

import deltatune as dt
from method_cases import Case

ALL = ("mlp", "llama", "gpt2", "bert")
CONV_TARGETS = ["conv1", "conv2", "conv3", "head"]
BOFT_CONV_TARGETS = ["conv1", "conv2", "conv3"]  # flattened filter widths 9, 27, 18 (24 when wide): block size 3
PATTERNS = {"rank_pattern": {r".*layers\.1\..*_proj": 2, "0": 6}, "alpha_pattern": {r".*\.(q|k)_proj": 3.0, "2": 5.0}}


def _pattern(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default


def shapes(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) from the module's own attributes."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    return module.weight.shape[1], module.weight.shape[0], ()  # GPT-2 Conv1D (in, out)


def _effective(module: nn.Module, cfg) -> bool:
    return cfg.use_effective_conv2d and isinstance(module, (nn.Conv1d, nn.Conv2d)) and math.prod(module.kernel_size) > 1


def loha_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """Two Hadamard factors: per factor A (out x r) + B (r x in*k), or effective conv: core r*r*k + r*out + r*in."""
    r = _pattern(cfg.rank_pattern, path, cfg.r)
    out, inp, kernel = shapes(module)
    k = math.prod(kernel)
    n = 2 * (r * r * k + r * out + r * inp) if _effective(module, cfg) else 2 * (out * r + r * inp * k)
    return n, n


def lokr_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """W1 (a x c) or r(a + c); W2 (b x d x k), or b*r + r*d*k, or effective r*r*k + r*b + r*d."""
    r = _pattern(cfg.rank_pattern, path, cfg.r)
    out, inp, kernel = shapes(module)
    k = math.prod(kernel)
    a, b = peft_factorization(out, cfg.decompose_factor)
    c, d = peft_factorization(inp, cfg.decompose_factor)
    w1 = r * (a + c) if cfg.decompose_both and r < max(a, c) / 2 else a * c
    if r >= max(b, d) / 2:
        w2 = b * d * k
    elif _effective(module, cfg):
        w2 = r * r * k + r * b + r * d
    else:
        w2 = b * r + r * d * k
    return w1 + w2, w1 + w2


def oft_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """b(b-1)/2 skew entries per block; in/b blocks (one with block_share). The cases use sizes that divide."""
    _, inp, _ = shapes(module)
    b = cfg.oft_block_size or inp // cfg.r
    n = (1 if cfg.block_share else inp // b) * b * (b - 1) // 2
    return n, n


def boft_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """m factors x D blocks x b x b, plus the per-output scale (out)."""
    out, inp, kernel = shapes(module)
    n_flat = inp * math.prod(kernel)
    b = cfg.boft_block_size or n_flat // cfg.boft_block_num
    n = cfg.boft_n_butterfly_factor * n_flat * b + out
    return n, n


def make(name: str, **kw) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.config(name, **kw)


def pair(name: str, **kw) -> tuple[Callable[[], dt.DeltaConfig], Callable[[], dt.DeltaConfig]]:
    """(default-init config, non-identity config) of one variant.

    LoHa's random start is a Hadamard product of two small products: a larger alpha makes its effect big
    enough to change greedy generations of the tiny models."""
    boost = {"alpha": 8 * kw["alpha"]} if name == "loha" else {}
    return make(name, **kw), make(name, **{**kw, "init_weights": False, **boost})


def case(id: str, models: tuple[str, ...], count, name: str, **kw) -> Case:
    extra = {k: kw.pop(k) for k in ("additive", "load_atol", "weak_generation") if k in kw}
    default, rand = pair(name, **kw)
    return Case(id, default, models, count, rand, **extra)


# multiplicative: two at one module do not add. Rotating the inputs of the tiny random GPT-2's layers (norms
# preserved, weights ~0.02 under a dominant residual stream) moves its logits too little to flip greedy tokens
ORTH = {"additive": False, "weak_generation": ("gpt2",)}

CASES: list[Case] = [
    case("loha", ALL, loha_count, "loha", r=4, alpha=8),
    case("loha-conv", ("conv",), loha_count, "loha", r=2, alpha=4, targets=CONV_TARGETS),
    case("loha-conv-effective", ("conv",), loha_count, "loha", r=2, alpha=4, targets=CONV_TARGETS,
         use_effective_conv2d=True),
    case("loha-patterns", ("llama",), loha_count, "loha", r=4, alpha=8, **PATTERNS),
    case("loha-rank-dropout", ("mlp", "llama"), loha_count, "loha", r=4, alpha=8, rank_dropout=0.3),
    case("lokr", ALL, lokr_count, "lokr", r=4, alpha=8),
    case("lokr-low-rank", ("mlp", "llama", "gpt2"), lokr_count, "lokr", r=1, alpha=2, decompose_both=True),
    case("lokr-factor", ("llama", "bert"), lokr_count, "lokr", r=2, alpha=4, decompose_factor=4),
    case("lokr-conv", ("conv",), lokr_count, "lokr", r=1, alpha=2, targets=CONV_TARGETS),
    case("lokr-conv-effective", ("conv",), lokr_count, "lokr", r=1, alpha=2, targets=CONV_TARGETS,
         use_effective_conv2d=True),
    case("lokr-rank-dropout", ("llama",), lokr_count, "lokr", r=4, alpha=8, rank_dropout=0.3,
         rank_dropout_scale=True),
    Case("lokr-lycoris-init", make("lokr", r=4, alpha=8, init_weights="lycoris"), ("mlp", "llama"), lokr_count,
         make("lokr", r=4, alpha=8, init_weights=False)),
    case("oft", ALL, oft_count, "oft", oft_block_size=4, **ORTH),
    case("oft-cayley", ("mlp", "llama"), oft_count, "oft", oft_block_size=4, use_cayley_neumann=False, **ORTH),
    case("oft-block-share", ("mlp", "llama", "gpt2"), oft_count, "oft", r=2, oft_block_size=0, block_share=True,
         **ORTH),
    # COFT projects its parameters in place at every forward: a reload re-projects (last-bit differences)
    case("oft-coft", ("mlp", "llama"), oft_count, "oft", oft_block_size=4, coft=True, eps=3.0, load_atol=1e-6, **ORTH),
    case("boft", ALL, boft_count, "boft", boft_block_size=4, **ORTH),
    case("boft-butterfly", ("mlp", "llama"), boft_count, "boft", boft_block_size=2, boft_n_butterfly_factor=2,
         **ORTH),
    case("boft-block-num", ("llama", "gpt2"), boft_count, "boft", boft_block_size=0, boft_block_num=4,
         boft_n_butterfly_factor=3, **ORTH),
    case("boft-conv", ("conv",), boft_count, "boft", boft_block_size=3, targets=BOFT_CONV_TARGETS, **ORTH),
]
