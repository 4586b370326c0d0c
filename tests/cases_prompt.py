"""Input-level methods: prompt tuning and prefix tuning (see ``deltatune.methods.prompt_tuning``/``prefix_tuning``).

They sit at the input embeddings, change the output from the start (no identity init), are not mergeable, act on a
whole batch (no per-row routing), and only one of them is active at a time. Prompt tuning's causal LM logits also
cover its virtual tokens (as in PEFT). Counts come from the config's recorded geometry and the embedding's shape.
"""

from __future__ import annotations

from torch import nn

import deltatune as dt
from method_cases import Case

N = 4
INPUT_LEVEL = dict(identity=False, mergeable=False, additive=False, routable=False, several_active=False,
                   file_prefix="base_model.")


# A handful of virtual tokens or a raw prefix table moves the frozen *random* tiny models only a little: their
# attention is near uniform and their head weights tiny, so what an input can change is bounded (measured on tiny
# llama: prompt tuning's loss floor is 2.7% below the start after 200 steps at lr 0.1; 30 steps at lr 1e-2 give
# 1.7%, a raw prefix table 1.3%). These cases ask 30 steps for a 1% drop; the MLP-reparameterised prefix makes 5%.
WEAK = dict(min_drop=0.01)


def prompt_count(module: nn.Module, path: str, cfg: dt.DeltaConfig) -> tuple[int, int]:
    """n virtual tokens of the embedding's width."""
    n = cfg.num_virtual_tokens * module.weight.shape[1]
    return n, n


def prefix_count(module: nn.Module, path: str, cfg: dt.DeltaConfig) -> tuple[int, int]:
    """Table n x (layers * 2 * kv width); with the projection: embedding n x d, Linear d->h, Linear h->table width."""
    n, d, width = cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers * 2 * cfg.token_dim
    if cfg.prefix_projection:
        h = cfg.encoder_hidden_size
        total = n * d + (d * h + h) + (h * width + width)
    else:
        total = n * width
    return total, total


def prompt(**kw):
    return lambda: dt.config("prompt_tuning", num_virtual_tokens=N, **kw)


def prefix(**kw):
    return lambda: dt.config("prefix_tuning", num_virtual_tokens=N, **kw)


CASES: list[Case] = [
    Case("prompt-tuning", prompt(), ("llama", "gpt2", "bert"), prompt_count, extra_positions=N, **INPUT_LEVEL, **WEAK),
    Case("prompt-tuning-text", prompt(init="text", init_token_ids=[5, 9, 11]), ("llama",), prompt_count,
         extra_positions=N, **INPUT_LEVEL, **WEAK),
    Case("prefix-tuning", prefix(), ("llama", "gpt2", "bert"), prefix_count, **INPUT_LEVEL, **WEAK),
    Case("prefix-tuning-projection", prefix(prefix_projection=True, encoder_hidden_size=24), ("llama", "gpt2", "bert"),
         prefix_count, **INPUT_LEVEL),
]
