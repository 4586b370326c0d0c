"""The Hugging Face PEFT format is deltatune's format: adapters cross over in both directions.

Every case builds a tiny random model, adapts it on one side (non-identity weights, so a dropped scale,
a transposed matrix or an ignored magnitude vector shows up), saves, loads on the other side onto an
untouched copy of the base, and compares logits in float32.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltatune as dt

ATOL = 1e-5
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


# -- tiny models -----------------------------------------------------------------------------------
@torch.no_grad()
def with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises biases to zero, which would hide a delta that mishandles them (DoRA)."""
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.normal_(0, 0.1)
    return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return with_random_biases(GPT2LMHeadModel(cfg).eval())


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return with_random_biases(BertForSequenceClassification(cfg).eval())


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))}


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(**batch()).logits


def assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> None:
    assert (want - base).abs().max() > 1e-3, "the adapter does not change the output: the comparison proves nothing"
    assert (got - want).abs().max() <= ATOL, f"max abs diff {(got - want).abs().max():.3g}"


@torch.no_grad()
def jitter(params, seed: int = 2) -> None:
    """Multiply parameters by (1 + noise): moves magnitude vectors, PiSSA factors and saved heads off their init."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))


def peft_load(base: torch.nn.Module, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT may note the `deltatune` key it does not know
        return PeftModel.from_pretrained(base, str(folder)).eval()


# -- deltatune -> peft -----------------------------------------------------------------------------
ATTN = ["q_proj", "v_proj"]
TO_PEFT = {
    "plain": ("llama", dict(targets=ATTN)),
    "dora": ("llama", dict(targets=ATTN, use_dora=True)),
    "rslora": ("llama", dict(targets=ATTN, use_rslora=True, alpha=6.0)),
    "pissa": ("llama", dict(targets=ATTN, init="pissa")),
    "pissa-rslora-patterns": ("llama", dict(targets=ATTN, init="pissa", use_rslora=True,
                                            rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*": 5.0})),
    "rank-alpha-pattern": ("llama", dict(targets=ATTN + ["down_proj"], rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                                         alpha_pattern={"v_proj": 3.0, "down_proj": 24.0})),
    "regex": ("llama", dict(targets=r"model\.layers\.\d+\.(self_attn\.(q|k)_proj|mlp\.down_proj)")),
    "all-linear": ("llama", dict(targets="all-linear")),
    "layers-exclude": ("llama", dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"], layers=[1], exclude=["k_proj"])),
    "embedding": ("llama", dict(targets=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(targets=["c_attn", "c_proj", "c_fc"])),
    "gpt2-dora": ("gpt2", dict(targets=["c_attn", "c_fc"], use_dora=True)),
    "bert-modules-to-save": ("bert", dict(targets=["query", "value"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(TO_PEFT))
def test_deltatune_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    kind, kw = TO_PEFT[case]
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, dt.LoRAConfig(r=4, **{"init": "random", **kw}))
    jitter(p for d in dm.deltas("default").values() for p in d.parameters())
    want = logits(dm)
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    # PEFT must adapt exactly our modules (a module adapted only there would start as the identity and go unseen)
    assert lora_modules(pm) == {p for p, d in dm.deltas("default").items() if not d.replaces_base}
    assert_same(logits(pm), want, base_out)


def lora_modules(pm: PeftModel) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


def test_pissa_adapter_is_saved_relative_to_the_original_base(tmp_path):
    """PEFT sees a rank-2r plain LoRA: the base it loads onto is the untouched original."""
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, dt.LoRAConfig(r=4, init="pissa", targets=ATTN))
    dm.save(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 32.0, True)
    # untrained PiSSA is the identity, both here and in PEFT
    assert (logits(peft_load(fresh, tmp_path)) - base_out).abs().max() <= ATOL


def test_non_default_adapter_is_saved_in_a_subfolder_peft_loads(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, dt.LoRAConfig(r=4, init="random", targets=ATTN), name="task_a")
    want = logits(dm)
    dm.save(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    assert sorted(p.name for p in (tmp_path / "task_a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same(logits(peft_load(fresh, tmp_path / "task_a")), want, base_out)


def test_two_deltatune_adapters_switch_like_peft_set_adapter(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, dt.LoRAConfig(r=4, init="random", targets=ATTN))
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["k_proj", "o_proj", "up_proj"], use_dora=True), "other")
    jitter(p for d in dm.deltas("other").values() for p in d.parameters())
    want = {}
    for name in ("default", "other"):
        dm.activate(name)
        want[name] = logits(dm)
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        pm.set_adapter(name)
        assert_same(logits(pm), want[name], base_out)


# -- peft -> deltatune -----------------------------------------------------------------------------
FROM_PEFT = {
    "plain": ("llama", dict(target_modules=ATTN)),
    "dora": ("llama", dict(target_modules=ATTN, use_dora=True)),
    "rslora": ("llama", dict(target_modules=ATTN, use_rslora=True)),
    "rank-alpha-pattern": ("llama", dict(target_modules=ATTN + ["gate_proj"], rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
                                         alpha_pattern={"v_proj": 3, "gate_proj": 20})),
    "all-linear": ("llama", dict(target_modules="all-linear")),
    "regex": ("llama", dict(target_modules=r".*\.layers\.1\.(mlp\.up_proj|self_attn\.k_proj)")),
    "exclude-modules": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=r".*\.layers\.0\.self_attn\.k_proj")),
    "layers-to-transform": ("llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1])),
    "layers-to-transform-pattern": ("llama", dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern="layers")),
    "gpt2-fan-in-fan-out": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "bert-modules-to-save": ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


def peft_adapted(kind: str, save_to: Path, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(base logits, PEFT-adapted logits, untouched copy of the base), the adapter saved to ``save_to``."""
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    jitter(p for n, p in pm.named_parameters() if "lora_magnitude_vector" in n or "modules_to_save" in n)
    want = logits(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(save_to))
    return base_out, want, fresh


@pytest.mark.parametrize("case", list(FROM_PEFT))
def test_peft_adapter_loads_in_deltatune_with_same_logits(case, tmp_path):
    kind, kw = FROM_PEFT[case]
    base_out, want, fresh = peft_adapted(kind, tmp_path, **kw)
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, base_out)


def test_peft_sequence_classification_adapter_loads_in_deltatune(tmp_path):
    """task_type="SEQ_CLS" is how PEFT users adapt classifiers; PEFT then adds "classifier" and "score"
    to modules_to_save itself, and treats entries that match no module as simply absent."""
    base_out, want, fresh = peft_adapted("bert", tmp_path, task_type="SEQ_CLS", target_modules=["query", "value"])
    assert "score" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, base_out)


def test_peft_embedding_adapter_loads_ignoring_the_saved_base_embedding(tmp_path):
    base_out, want, fresh = peft_adapted("llama", tmp_path, target_modules=["embed_tokens", "q_proj"])
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in f.keys()  # what PEFT writes
    with pytest.warns(UserWarning, match=r"ignoring the saved base weight model\.embed_tokens\.base_layer\.weight"):
        dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, base_out)


def test_peft_multi_adapter_save_loads_as_two_deltatune_adapters(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False))
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "down_proj"], use_dora=True,
                                       init_lora_weights=False))
    jitter(p for n, p in pm.named_parameters() if "lora_magnitude_vector" in n)
    want = {}
    for name in ("default", "other"):
        pm.set_adapter(name)
        want[name] = logits(pm)
    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()

    dm = dt.load_adapter(fresh, tmp_path, name="first")
    dm.load(tmp_path / "other", "second")
    assert sorted(dm.configs) == ["first", "second"]
    for ours, theirs in (("first", "default"), ("second", "other"), ("first", "default")):
        dm.activate(ours)
        assert_same(logits(dm), want[theirs], base_out)


# -- the files themselves --------------------------------------------------------------------------
def test_saved_config_has_peft_field_names_and_a_deltatune_section(tmp_path):
    base = tiny_llama()
    cfg = dt.LoRAConfig(r=4, alpha=12.0, init="random", targets=ATTN, use_dora=True, use_rslora=True,
                        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 6.0})
    dt.attach(base, cfg).save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert (saved["r"], saved["lora_alpha"], saved["use_dora"], saved["use_rslora"]) == (4, 12.0, True, True)
    assert sorted(saved["target_modules"]) == ATTN
    assert (saved["rank_pattern"], saved["alpha_pattern"]) == ({"v_proj": 2}, {"q_proj": 6.0})
    assert saved["bias"] == "none" and saved["fan_in_fan_out"] is False
    ours = saved["deltatune"]
    assert (ours["type"], ours["format"], ours["version"]) == ("lora", 1, dt.__version__)
    assert dt.LoRAConfig.from_dict(ours["config"]).use_dora is True
    # PEFT parses it into the same hyperparameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = LoraConfig.from_pretrained(str(tmp_path))
    assert (theirs.r, theirs.lora_alpha, theirs.use_dora, theirs.use_rslora) == (4, 12.0, True, True)
    assert set(theirs.target_modules) == set(ATTN)


KEYS = {
    "llama-dora": ("llama", dict(targets=ATTN, use_dora=True), dict(target_modules=ATTN, use_dora=True)),
    "llama-embedding": ("llama", dict(targets=["embed_tokens", "o_proj"]), dict(target_modules=["embed_tokens", "o_proj"])),
    "llama-rank-pattern": ("llama", dict(targets=ATTN, rank_pattern={"q_proj": 2}), dict(target_modules=ATTN, rank_pattern={"q_proj": 2})),
    "gpt2": ("gpt2", dict(targets=["c_attn", "c_proj"]), dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert-classifier": ("bert", dict(targets=["query"], modules_to_save=["classifier"]),
                        dict(target_modules=["query"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(KEYS))
def test_safetensors_keys_and_shapes_are_the_ones_peft_writes(case, tmp_path):
    kind, ours, theirs = KEYS[case]
    dt.attach(BUILD[kind](), dt.LoRAConfig(r=4, **ours)).save(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert all(k.startswith("base_model.model.") for k in got)
    lora_keys = [k for k in got if not k.startswith("base_model.model.classifier.")]
    assert lora_keys and all(k.endswith(PEFT_SUFFIXES) for k in lora_keys)
    pm = get_peft_model(BUILD[kind](), LoraConfig(r=4, **theirs))
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(pm, save_embedding_layers=False).items()}
    assert got == want
