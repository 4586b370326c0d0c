"""Conformance cases for AdaLoRA and DyLoRA (``deltatune.methods.adalora`` / ``.dylora``)."""

from __future__ import annotations

import math

from torch import nn

from deltatune.methods.adalora import AdaLoRAConfig
from deltatune.methods.dylora import DyLoRAConfig
from method_cases import Case

TRANSFORMERS = ("llama", "gpt2", "bert")


def _fan(module: nn.Module) -> tuple[int, int]:
    """(fan_in incl. kernel, fan_out) from the module's shapes."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels * math.prod(module.kernel_size), module.out_channels
    return module.weight.shape[0], module.weight.shape[1]  # transformers Conv1D: weight (in, out)


def adalora_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """Q: r x in(*k), lambda: r, P: out x r; r = init_r, or the kept triplets of a saved rank_pattern."""
    pattern = (cfg.rank_pattern or {}).get(f"{path}.lora_E")
    r = sum(pattern) if pattern is not None else cfg.init_r
    fan_in, fan_out = _fan(module)
    n = r * fan_in + r + fan_out * r
    return n, n


def dylora_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """A: r x in, B: out x r (the full nested rank is held, whatever rank is used)."""
    fan_in, fan_out = _fan(module)
    n = cfg.r * (fan_in + fan_out)
    return n, n


def ada(**kw):
    return lambda: AdaLoRAConfig(init_r=4, target_r=2, total_step=10, **kw)


def ada_random(**kw):
    return lambda: AdaLoRAConfig(init_r=4, target_r=2, total_step=10, init="random", **kw)


def dy(**kw):
    return lambda: DyLoRAConfig(r=4, alpha=8, **kw)


def dy_random(**kw):
    return lambda: DyLoRAConfig(r=4, alpha=8, init="random", **kw)


# a pruned AdaLoRA as loaded from a file written after masking: module 0 keeps 2 of 4, module 2 one (rank 0 is tested in test_method_adalora)
PRUNED = {"rank_pattern": {"0.lora_E": [True, False, True, False], "2.lora_E": [False, False, False, True]}}
CONV = ["conv2", "conv3", "head"]

CASES: list[Case] = [
    Case("adalora", ada(), ("mlp", *TRANSFORMERS), adalora_count, ada_random()),
    # the suite's jitter (0.1 noise) on P, lambda, Q: a larger alpha makes the cubic-small delta visible
    Case("adalora-jitter", ada(alpha=64.0), ("mlp", "llama", "gpt2"), adalora_count, None),
    Case("adalora-dropout", ada(dropout=0.3), ("mlp", "llama"), adalora_count, ada_random(dropout=0.3)),
    Case("adalora-pruned", ada(**PRUNED), ("mlp",), adalora_count, ada_random(**PRUNED)),
    Case("adalora-conv2d", ada(targets=CONV), ("conv",), adalora_count, ada_random(targets=CONV)),
    Case("adalora-modules-to-save", ada(modules_to_save=["classifier"]), ("bert",), adalora_count,
         ada_random(modules_to_save=["classifier"])),
    Case("dylora", dy(), ("mlp", *TRANSFORMERS), dylora_count, dy_random()),
    Case("dylora-jitter", dy(), ("mlp", "llama", "bert"), dylora_count, None),
    Case("dylora-eval-rank", dy(eval_rank=2), ("mlp", "llama", "gpt2"), dylora_count, dy_random(eval_rank=2)),
    Case("dylora-update-all", dy(update="all", r_min=2), ("mlp", "gpt2"), dylora_count,
         dy_random(update="all", r_min=2)),
    Case("dylora-dropout", dy(dropout=0.3), ("mlp", "llama"), dylora_count, dy_random(dropout=0.3)),
]
