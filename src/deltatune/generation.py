"""Batched text generation and BLEU, shared by the CLI, the demo and the evaluator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def render_prompt(tokenizer, prompt: str, chat: bool | None = None) -> str:
    """The text the model sees: the chat template around a user turn where the tokenizer has one."""
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat is None else chat
    if not use_chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 16, chat: bool | None = None, adapters: Sequence[str | None] | None = None,
             **gen_kwargs) -> list[str]:
    """Greedy (unless ``do_sample`` is passed) completions of ``prompts``, batched with left padding.

    ``adapters`` (with a DeltaModel) routes each prompt to its own adapter.
    """
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            kwargs.update(gen_kwargs)
            if adapters is not None:
                kwargs["adapters"] = list(adapters[i:i + batch_size])
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu) of hypotheses against one or several references each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    width = max(len(r) for r in references)
    streams = [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(width)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams).score
