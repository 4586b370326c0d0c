"""Shared by the server tests: a tiny LM with SmolLM2's tokenizer, an adapters folder, reference outputs."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import torch

import deltatune as dt
from deltatune.generation import generate as lib_generate
from tiny_lm import make_tiny_lm_folder

LORA = "a"
LORA2 = "b-2"
IA3 = "c.v1"
ROUTABLE = [LORA, LORA2, IA3]


def save_adapter(base: Path, folder: Path, cfg, seed: int) -> Path:
    """An adapter whose every parameter is pushed well away from its identity init, so it changes the output."""
    model, _ = dt.load_pretrained(base)
    torch.manual_seed(seed)
    dm = dt.attach(model, cfg)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    dm.save(folder)
    return folder


def make_world(root: Path) -> tuple[Path, Path, Path]:
    """(tiny model folder, adapters folder, a folder outside it) with good, bad and hostile adapters."""
    tiny = make_tiny_lm_folder(root / "tiny")
    adapters = root / "adapters"
    adapters.mkdir()
    save_adapter(tiny, adapters / LORA, dt.LoRAConfig(r=4), seed=1)
    save_adapter(tiny, adapters / LORA2, dt.LoRAConfig(r=8, targets=["q_proj", "v_proj"]), seed=2)
    save_adapter(tiny, adapters / IA3, dt.config("ia3"), seed=3)
    save_adapter(tiny, adapters / "prompt", dt.config("prompt_tuning", num_virtual_tokens=4), seed=4)
    bad = adapters / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters / LORA / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    (adapters / "empty").mkdir()  # no adapter_config.json: not an adapter
    outside = root / "outside"
    save_adapter(tiny, outside / "secret", dt.LoRAConfig(r=4), seed=5)
    (adapters / "escape").symlink_to(outside / "secret", target_is_directory=True)
    linked = adapters / "linked"  # a real folder whose weights file is a symlink out of the directory
    linked.mkdir()
    (linked / "adapter_config.json").write_text((outside / "secret" / "adapter_config.json").read_text())
    (linked / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    return tiny, adapters, outside


class Reference:
    """What ``deltatune generate`` answers (a fresh model, the adapter loaded alone), memoised."""

    def __init__(self, tiny: Path, adapters: Path):
        self.tiny, self.adapters = tiny, adapters
        self.model, self.tok = dt.load_pretrained(tiny)

    @functools.cache  # noqa: B019 - one instance per test module
    def __call__(self, adapter: str | None, prompt: str, max_new_tokens: int, chat: bool = False) -> str:
        model = copy.deepcopy(self.model)
        if adapter is not None:
            model = dt.load_adapter(model, self.adapters / adapter)
        return lib_generate(model, self.tok, [prompt], max_new_tokens=max_new_tokens, chat=chat)[0]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0
