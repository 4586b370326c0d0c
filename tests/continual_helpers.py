"""A tiny continual-learning world: a random tiny BERT with MiniLM's real tokenizer, and a synthetic stream of
separable classes (each class's texts are drawn from its own words)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("apple river stone cloud table green music paper horse light metal ocean chair bread storm glass tiger "
         "sugar train piano forest candle mirror rocket garden silver winter yellow castle pillow dragon engine "
         "lemon violin planet copper desert island orange rabbit").split()


def tokenizer():
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path

    path, _ = resolve_model_path("minilm-l6")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tiny_encoder(tok, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def write_stream(folder: Path, classes: int = 12, train: int = 16, test: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl``: class k's texts are 5 of its 3 own words, plus one shared word."""
    rng = random.Random(seed)
    own = {k: WORDS[3 * k: 3 * k + 3] for k in range(classes)}
    shared = WORDS[3 * classes:]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", train), ("test", test)):
        rows = []
        for k in range(classes):
            for _ in range(n):
                words = [rng.choice(own[k]) for _ in range(5)] + [rng.choice(shared)]
                rng.shuffle(words)
                rows.append({"text": " ".join(words), "label": f"c{k:02d}"})
        p = folder / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]
