"""A tiny random Llama saved as an HF folder with SmolLM2's real tokenizer (chat template included)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_lm_folder(folder: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from deltatune.models import resolve_model_path

    src, gguf = resolve_model_path("smollm2-135m")
    tok = PreTrainedTokenizerFast.from_pretrained(src, gguf_file=gguf, local_files_only=True)
    torch.manual_seed(seed)
    # a large init range makes the tiny model's logits expressive enough to learn from in a few steps
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
