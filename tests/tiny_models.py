"""The tiny transformers (Llama, GPT-2, BERT) the per-method test files build, seeded, in eval mode.

Each test file adds its own perturbation on top (random biases / norm weights), so nothing hides behind
transformers' zero biases and unit norms.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny(kind: str, seed: int = 0) -> nn.Module:
    """A fresh tiny ``llama`` / ``gpt2`` / ``bert`` (classification, 3 labels); same weights for the same seed."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=2))
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         max_position_embeddings=64, num_labels=3))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return model.eval()
