"""Evaluate a model (with or without an adapter) on a data file: loss, accuracy, BLEU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core.model import owner_of
from ..generation import bleu, generate
from .data import Collator, detect_format, load_dataset, read_rows
from .trainer import evaluate_dataset


def evaluate_file(model: nn.Module, tokenizer, path: str | Path, *, task: str = "causal-lm", max_length: int = 512,
                  batch_size: int = 8, max_new_tokens: int = 64, bleu_limit: int = 200) -> dict[str, Any]:
    """Loss on every file; accuracy for classification; BLEU for prompt/completion data.

    For BLEU, rows sharing a prompt are grouped, their completions serving as multiple references;
    at most ``bleu_limit`` distinct prompts are generated for.
    """
    fmt = "classification" if task == "classification" else None
    ds = load_dataset(path, tokenizer, format=fmt, max_length=max_length)
    inner = model.model if owner_of(model) is model else model
    metrics = evaluate_dataset(inner, ds, Collator(tokenizer), task=task, batch_size=batch_size)
    result: dict[str, Any] = {"rows": len(ds), **metrics}
    rows = read_rows(path)
    if task != "classification" and detect_format(rows) == "prompt_completion":
        refs: dict[str, list[str]] = {}
        for r in rows:
            refs.setdefault(r["prompt"], []).append(r["completion"].strip())
        prompts = list(refs)[:bleu_limit]
        hyps = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=False,
                        batch_size=batch_size)
        result["bleu"] = bleu(hyps, [refs[p] for p in prompts])
        result["bleu_prompts"] = len(prompts)
    return result

