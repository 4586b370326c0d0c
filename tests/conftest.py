"""Tiny models built in the test (seeded, eval mode) and their inputs, shared by the conformance tests.

Every model kind has a builder, an input builder and a way to read its output as one tensor. Models are
built once per (kind, dtype, width) and handed out as deep copies, so every test gets a fresh base with
exactly the same weights, and ``zoo.fresh(model)``-style roundtrips need no reseeding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 64
SEED = 0

# The models are tiny: one thread is faster than several, and immune to an oversubscribed machine
# (with other processes busy, OpenMP threads spin-waiting make a 1 ms forward take 0.5 s).
torch.set_num_threads(1)


# -- builders -------------------------------------------------------------------------------------
def build_mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 5))


class ConvNet(nn.Module):
    """Conv1d over a sequence, Conv2d over an image, a Linear head: every conv LoRA path in one model."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv1d(3, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1)
        self.conv3 = nn.Conv2d(width, width, kernel_size=(3, 1), bias=False)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, seq: Tensor, img: Tensor) -> Tensor:
        a = torch.relu(self.conv1(seq)).mean(-1)
        b = torch.relu(self.conv3(torch.relu(self.conv2(img)))).mean((-1, -2))
        return self.head(torch.cat([a, b], dim=-1))


def build_conv(width: int = 6) -> nn.Module:
    return ConvNet(width)


def build_llama(width: int = 32) -> nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def build_gpt2(width: int = 32) -> nn.Module:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def build_bert(width: int = 32) -> nn.Module:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * width, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


def _ids(rows: int = 3, cols: int = 6, seed: int = 1) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(2, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed))}


def _mlp_inputs(rows: int = 3) -> dict[str, Tensor]:
    return {"input": torch.randn(rows, 12, generator=torch.Generator().manual_seed(1))}


def _conv_inputs(rows: int = 3) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"seq": torch.randn(rows, 3, 10, generator=g), "img": torch.randn(rows, 3, 6, 6, generator=g)}


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable[..., nn.Module]  # build(width) -> an untrained model
    wide: int  # a width whose weight shapes differ from the default (for wrong-shape loads)
    inputs: Callable[[int], dict[str, Tensor]]  # inputs(rows), float inputs in float32
    generative: bool = False
    hf: bool = False


KINDS: dict[str, Kind] = {
    "mlp": Kind("mlp", build_mlp, 24, _mlp_inputs),
    "conv": Kind("conv", build_conv, 8, _conv_inputs),
    "llama": Kind("llama", build_llama, 48, lambda rows: _ids(rows), generative=True, hf=True),
    "gpt2": Kind("gpt2", build_gpt2, 48, lambda rows: _ids(rows), generative=True, hf=True),
    "bert": Kind("bert", build_bert, 48, lambda rows: _ids(rows), hf=True),
}


class Zoo:
    """Fresh copies of the tiny models, their inputs and their outputs."""

    def __init__(self) -> None:
        self._protos: dict[tuple[str, torch.dtype, bool], nn.Module] = {}

    def build(self, kind: str, dtype: torch.dtype = torch.float32, *, wide: bool = False) -> nn.Module:
        """A fresh base model: the same weights every call (seeded), eval mode, requires_grad as built."""
        key = (kind, dtype, wide)
        if key not in self._protos:
            k = KINDS[kind]
            torch.manual_seed(SEED)
            model = (k.build(k.wide) if wide else k.build()).to(dtype).eval()
            self._protos[key] = model
        return copy.deepcopy(self._protos[key])

    def inputs(self, kind: str, rows: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in KINDS[kind].inputs(rows).items()}

    @staticmethod
    def output(model: nn.Module, inputs: dict[str, Tensor], **kw) -> Tensor:
        with torch.no_grad():
            return logits(model(**inputs, **kw))

    def kind(self, kind: str) -> Kind:
        return KINDS[kind]


def logits(out) -> Tensor:
    """The output tensor of any of the tiny models (HF outputs carry ``.logits``)."""
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()
