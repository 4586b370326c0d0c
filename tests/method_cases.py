"""The methods the conformance suite runs, one ``Case`` per method variant.

Adding a method to the suite means adding ``Case`` entries, nothing else: a config factory, the model
kinds (see ``conftest.KINDS``) it applies to, and what the method promises (mergeable? additive?
tolerances), plus an independent parameter count per adapted module. LoRA's cases live here; every other
method family keeps its cases in its own ``tests/cases_<family>.py`` (a module-level ``CASES`` list),
collected below in name order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import deltatune as dt

ALL_KINDS = ("mlp", "conv", "llama", "gpt2", "bert")


@dataclass(frozen=True)
class Case:
    """One method variant under test.

    make_config: the default config (identity at init unless ``identity=False``).
    make_random: a non-identity variant of the same config (e.g. ``init="random"``); ``None`` means the
        suite perturbs the freshly attached delta's parameters instead.
    models: the model kinds of ``conftest.KINDS`` the case applies to.
    count: (trainable, total) parameters the delta adds at one adapted module, computed from the
        config and the module's shapes, independently of the library.
    mergeable / additive: whether merging is supported / whether two active adapters add their effects.
    atol: merged vs unmerged outputs (float32); load_atol: outputs after a save/load roundtrip.
    shape_checked: loading onto a model with other weight shapes fails (the file's shapes give it away).
    weak_generation: model kinds where a random adapter of the method may leave greedy tokens unchanged (input
        rotations of the tiny GPT-2), so the generate test skips only its "differs from the base" check.
    merge_adds_params: merging may create parameters the base lacks (a bias on a bias-less layer), which
        ``merge_and_unload`` then keeps: its state-dict keys are a superset of the original ones, and the base
        library (whose config says "no bias") cannot reload them, so that check is skipped.
    """

    id: str
    make_config: Callable[[], dt.DeltaConfig]
    models: tuple[str, ...]
    count: Callable[[nn.Module, str, dt.DeltaConfig], tuple[int, int]]
    make_random: Callable[[], dt.DeltaConfig] | None = None
    identity: bool = True
    mergeable: bool = True
    additive: bool = True
    atol: float = 1e-5
    load_atol: float = 0.0
    half_atol: float = 5e-2  # merged vs unmerged on float16/bfloat16 bases
    shape_checked: bool = True  # False: the saved tensors do not depend on layer shapes (FourierFT's spectrum)
    weak_generation: tuple[str, ...] = ()  # kinds where a random adapter may not change greedy tokens (rotations)
    extra_positions: int = 0  # leading positions a causal LM's logits gain (prompt tuning's virtual tokens)
    routable: bool = True  # per-row routing works; else it raises "cannot be routed per row" (input-level methods)
    several_active: bool = True  # several adapters of the method can be active at once; else activate() raises
    file_prefix: str = "base_model.model."  # PEFT's key prefix for module weights (prompt learning: "base_model.")
    min_drop: float = 0.05  # relative loss drop 30 training steps must reach (test_method_training)
    train_lr: float = 1e-2  # AdamW learning rate of the 30-step training test (few-parameter methods need more)
    jitter_scale: float = 0.1  # std of the noise the suite adds to a fresh delta when make_random is None
    merge_adds_params: bool = False  # merging may create a parameter (a bias on a bias-less layer; see BitFit)


# -- LoRA ----------------------------------------------------------------------------------------
def _pattern(patterns: dict, path: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
            return value
    return default


def lora_count(module: nn.Module, path: str, cfg: dt.DeltaConfig) -> tuple[int, int]:
    """A: r x in (x kernel), B: out x r, DoRA: + out (magnitude); freeze_a keeps A out of the trainable count."""
    r = _pattern(cfg.rank_pattern, path, cfg.r)
    if isinstance(module, nn.Embedding):
        n = r * (module.num_embeddings + module.embedding_dim)
        return n, n
    if isinstance(module, nn.Linear):
        fan_in, fan_out, k = module.in_features, module.out_features, 1
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        fan_in, fan_out, k = module.in_channels, module.out_channels, math.prod(module.kernel_size)
    else:  # transformers Conv1D: weight (in, out)
        fan_in, fan_out, k = module.weight.shape[0], module.weight.shape[1], 1
    a, b = r * fan_in * k, fan_out * r
    total = a + b + (fan_out if cfg.use_dora else 0)
    return total - (a if cfg.freeze_a else 0), total


def lora(**kw) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.LoRAConfig(r=4, alpha=8, **kw)


def lora_random(**kw) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.LoRAConfig(r=4, alpha=8, init="random", **kw)


TRANSFORMERS = ("llama", "gpt2", "bert")
EMBED_TARGETS = ["embed_tokens", "wte", "q_proj", "v_proj", "c_attn"]
CONV_TARGETS = ["conv1", "conv2", "conv3", "head"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
PATTERNS = {"rank_pattern": {r"(0|2)": 2, r".*layers\.1\..*_proj": 6, "c_fc": 3},
            "alpha_pattern": {r".*\.(q|k)_proj": 3.0, "2": 1.5}}

CASES: list[Case] = [
    Case("lora", lora(), ("mlp", *TRANSFORMERS), lora_count, lora_random()),
    Case("lora-dora", lora(use_dora=True), ("mlp", "conv", "llama", "gpt2"), lora_count,
         lora_random(use_dora=True), additive=False),
    Case("dora", lambda: dt.config("dora", r=4, alpha=8), ("mlp", "llama"), lora_count,
         lambda: dt.config("dora", r=4, alpha=8, init="random"), additive=False),
    Case("lora-rslora", lora(use_rslora=True), ("mlp", "llama"), lora_count, lora_random(use_rslora=True)),
    # PiSSA saves as a rank-2r plain LoRA (the PEFT conversion): the same function, other rounding
    Case("lora-pissa", lora(init="pissa"), ("mlp", "llama", "gpt2"), lora_count, None, load_atol=1e-5),
    Case("lora-freeze-a", lora(freeze_a=True), ("mlp", "llama"), lora_count, lora_random(freeze_a=True)),
    Case("lora-dropout", lora(dropout=0.3), ("mlp", "llama"), lora_count, lora_random(dropout=0.3)),
    Case("lora-patterns", lora(**PATTERNS), ("mlp", "llama", "gpt2"), lora_count, lora_random(**PATTERNS)),
    Case("lora-embedding", lora(targets=EMBED_TARGETS), ("llama", "gpt2"), lora_count,
         lora_random(targets=EMBED_TARGETS)),
    Case("lora-conv", lora(targets=CONV_TARGETS), ("conv",), lora_count, lora_random(targets=CONV_TARGETS)),
    Case("lora-gpt2-conv1d", lora(targets=GPT2_TARGETS), ("gpt2",), lora_count, lora_random(targets=GPT2_TARGETS)),
    Case("lora-modules-to-save", lora(modules_to_save=["classifier"]), ("bert",), lora_count,
         lora_random(modules_to_save=["classifier"])),
]


def _collect() -> None:
    import importlib
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    for f in sorted(here.glob("cases_*.py")):
        CASES.extend(importlib.import_module(f.stem).CASES)
    ids = [c.id for c in CASES]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"duplicate case ids: {dup}")


_collect()
