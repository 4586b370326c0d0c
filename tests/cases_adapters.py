"""Conformance cases: bottleneck adapters (Houlsby, Pfeiffer, parallel, Compacter) and unions of methods.

Parameter counts are computed here from the modules' shapes and the paper's layer sizes, never from the
library; which modules a union member adapts is decided here too (suffix lists / the default regexes).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

import deltatune as dt
from method_cases import Case, lora_count

TRANSFORMERS = ("llama", "gpt2", "bert")


def _in_out(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[0], m.weight.shape[1]
    if type(m).__name__ == "LlamaMLP":
        return m.hidden_size, m.hidden_size
    if type(m).__name__ == "GPT2MLP":
        return m.c_fc.weight.shape[0], m.c_proj.weight.shape[1]
    if type(m).__name__ == "BertIntermediate":
        return m.dense.in_features, m.dense.out_features
    raise AssertionError(f"no shapes for {type(m).__name__}")


def _r(cfg, d: int) -> int:
    return cfg.bottleneck_size or max(1, int(d // cfg.reduction_factor))


def bottleneck_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """down: Linear(d, r) + bias r; up: Linear(r, d) + bias d; ln_before: LayerNorm(d) (2d); d = the output size."""
    d = _in_out(module)[1]
    r = _r(cfg, d)
    n = d * r + r + r * d + d + (2 * d if cfg.ln_before else 0)
    return n, n


def parallel_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """Whole FFN: down (d_in -> r) + up (r -> d_out), with biases. BERT: down on intermediate, up on output.dense."""
    d_in, d_out = _in_out(module)
    if type(module).__name__ == "BertIntermediate":
        r = _r(cfg, d_in)
        n = d_in * r + r
    elif re.fullmatch(r".*layer\.\d+\.output\.dense", path):
        r = _r(cfg, d_out)  # the bottleneck of the FFN input, which has BERT's hidden size = d_out
        n = r * d_out + d_out
    else:
        r = _r(cfg, d_in)
        n = d_in * r + r + r * d_out + d_out
    return n, n


def compacter_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """Two PHM layers (d -> r, r -> d): each n^3 (A_i) + n (in/n) k (W_left) + n k (out/n) (W_right) + out (bias)."""
    d = _in_out(module)[1]
    n, k = cfg.phm_dim, cfg.phm_rank
    r = _r(cfg, d)
    r = -(-r // n) * n
    phm = lambda i, o: n ** 3 + n * (i // n) * k + n * k * (o // n) + o  # noqa: E731
    total = phm(d, r) + phm(r, d) + (2 * d if cfg.ln_before else 0)
    return total, total


# -- which modules a union member adapts (independently of the library) ------------------------------
DEFAULTS = {
    "adapter_houlsby": r"(?:.*\.)?(?:o_proj|attn\.c_proj|attention\.output\.dense|down_proj|mlp\.c_proj"
                       r"|layer\.\d+\.output\.dense)",
    "adapter_pfeiffer": r"(?:.*\.)?(?:down_proj|mlp\.c_proj|layer\.\d+\.output\.dense)",
    "compacter": r"(?:.*\.)?(?:down_proj|mlp\.c_proj|layer\.\d+\.output\.dense)",
    "adapter_parallel": r"(?:.*\.)?(?:mlp|intermediate|layer\.\d+\.output\.dense)",
}
HEADS = ("lm_head", "classifier", "score")


def _selects(member, path: str, module: nn.Module) -> bool:
    t = member.targets
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if t is None and member.type == "lora" or t == "all-linear":
        ok = linear and path.rsplit(".", 1)[-1] not in HEADS
    elif t is None:
        ok = re.fullmatch(DEFAULTS[member.type], path) is not None
    elif isinstance(t, list):
        ok = any(path == s or path.endswith("." + s) for s in t)
    else:
        ok = re.fullmatch(t, path) is not None
    if member.type == "lora":
        ok = ok and (linear or isinstance(module, nn.Embedding))
    return ok


COUNTS = {"lora": lora_count, "adapter_houlsby": bottleneck_count, "adapter_pfeiffer": bottleneck_count,
          "adapter_parallel": parallel_count, "compacter": compacter_count}


def union_count(module: nn.Module, path: str, cfg) -> tuple[int, int]:
    """The sum over the members that adapt ``path``."""
    parts = [COUNTS[m.type](module, path, m) for m in cfg.members if _selects(m, path, module)]
    assert parts, path
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


# -- cases ---------------------------------------------------------------------------------------
def make(method: str, **kw) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.config(method, **kw)


def union(*members: Callable[[], dt.DeltaConfig]) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.config("union", members=[m() for m in members])


ATTN = ["q_proj", "v_proj", "c_attn", "query", "value"]
MLP_SEQ = dict(targets=["0", "2"], bottleneck_size=3, non_linearity="gelu")
MLP_PAR = dict(targets=["2", "4"], bottleneck_size=4, scaling=2.0)
# On the tiny random transformers the projection outputs the sequential adapters read are ~1e-2 (o_proj) and
# ~1e-3 (down_proj), too small to learn from in 30 steps: their cases normalise the adapter input (ln_before,
# AdapterHub's option). The default configuration is checked on the mlp model and in test_method_adapters.py.
LN = dict(ln_before=True)
CMP = dict(reduction_factor=4, ln_before=True)  # bottleneck 8, a multiple of phm_dim=4


def lora(**kw) -> Callable[[], dt.DeltaConfig]:
    return lambda: dt.LoRAConfig(r=4, alpha=8, **kw)


SEQ = dict(mergeable=False, additive=False)
PAR = dict(mergeable=False, additive=True)

CASES: list[Case] = [
    Case("adapter-houlsby", make("adapter_houlsby", **LN), TRANSFORMERS, bottleneck_count,
         make("adapter_houlsby", init="random", **LN), **SEQ),
    Case("adapter-houlsby-mlp", make("adapter_houlsby", **MLP_SEQ), ("mlp",), bottleneck_count,
         make("adapter_houlsby", init="random", **MLP_SEQ), **SEQ),
    Case("adapter-pfeiffer", make("adapter_pfeiffer", **LN), TRANSFORMERS, bottleneck_count,
         make("adapter_pfeiffer", init="random", **LN), **SEQ),
    Case("adapter-parallel", make("adapter_parallel"), TRANSFORMERS, parallel_count,
         make("adapter_parallel", init="random"), **PAR),
    Case("adapter-parallel-mlp", make("adapter_parallel", **MLP_PAR), ("mlp",), parallel_count,
         make("adapter_parallel", init="random", **MLP_PAR), **PAR),
    Case("compacter", make("compacter", **CMP), TRANSFORMERS, compacter_count, None, **SEQ),
    # unions: LoRA on attention + a parallel adapter on the FFN (MAM-like), as one adapter
    Case("union-lora-parallel", union(lora(targets=ATTN), make("adapter_parallel")), TRANSFORMERS, union_count,
         union(lora(targets=ATTN, init="random"), make("adapter_parallel", init="random")), **PAR),
    # two LoRAs sharing some modules: composed per module, mergeable (the sum of the weight deltas)
    Case("union-lora-lora", union(lora(targets=ATTN), lora(targets=["v_proj", "down_proj", "c_attn", "value"])),
         TRANSFORMERS, union_count,
         union(lora(targets=ATTN, init="random"), lora(targets=["v_proj", "down_proj", "c_attn", "value"],
                                                       init="random")), mergeable=True, additive=True),
    Case("union-lora-lora-mlp", union(lora(targets=["0", "2"]), lora(targets=["2", "4"], use_rslora=True)), ("mlp",),
         union_count, union(lora(targets=["0", "2"], init="random"), lora(targets=["2", "4"], use_rslora=True, init="random"))),
    # LoRA on every linear layer + Houlsby adapters: composed at the output projections (LoRA first)
    Case("union-lora-houlsby", union(lora(), make("adapter_houlsby")), ("llama", "bert"), union_count,
         union(lora(init="random"), make("adapter_houlsby", init="random")), **SEQ),
    Case("compacter-mlp", make("compacter", targets=["0", "2"], bottleneck_size=4), ("mlp",), compacter_count, None,
         **SEQ),
]
