"""Targeting: which modules a config selects (CONFORMANCE.md item 17), on the tiny models of conftest.

Expected selections are spelled out or computed from ``named_modules`` here, never from the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import deltatune as dt

LLAMA_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def adapted_paths(model: nn.Module, name: str = "a", **kw) -> list[str]:
    """The modules a LoRA adapter with these targeting fields wraps (sorted)."""
    dm = dt.attach(model, dt.LoRAConfig(r=2, **kw), name)
    return sorted(p for p, d in dm.deltas(name).items() if not d.replaces_base)


def llama(layers=(0, 1), names=LLAMA_LINEAR) -> list[str]:
    return sorted(f"model.layers.{i}.{n}" for i in layers for n in names)


def gpt2(layers=(0, 1), names=GPT2_CONV1D) -> list[str]:
    return sorted(f"transformer.h.{i}.{n}" for i in layers for n in names)


# -- strings are regexes that must match the whole name ----------------------------------------------
@pytest.mark.parametrize("spec,want", [
    (r"model\.layers\.0\.self_attn\.q_proj", llama((0,), ("self_attn.q_proj",))),
    (r".*\.(q|v)_proj", llama(names=("self_attn.q_proj", "self_attn.v_proj"))),
    (r".*layers\.1\.mlp\..*", llama((1,), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))),
])
def test_string_targets_are_full_match_regexes(zoo, spec, want):
    assert adapted_paths(zoo.build("llama"), targets=spec) == want


@pytest.mark.parametrize("spec", ["q_proj", r"layers\.0\.self_attn\.q_proj", "lm_hea", r"model\.layers\.0\.self_attn\.q"])
def test_a_partial_regex_match_selects_nothing(zoo, spec):
    model = zoo.build("llama")
    with pytest.raises(ValueError, match="selected no module"):
        dt.attach(model, dt.LoRAConfig(targets=spec))
    assert not any(isinstance(m, dt.Site) for m in model.modules())


# -- lists match exact names or dotted suffixes --------------------------------------------------------
@pytest.mark.parametrize("spec,want", [
    (["q_proj"], llama(names=("self_attn.q_proj",))),
    (["self_attn.q_proj", "down_proj"], llama(names=("self_attn.q_proj", "mlp.down_proj"))),
    (["layers.1.self_attn.o_proj"], llama((1,), ("self_attn.o_proj",))),
    (["model.layers.0.mlp.up_proj"], llama((0,), ("mlp.up_proj",))),
    (["lm_head"], ["lm_head"]),  # a list may name the head; only "all-linear" leaves it out
    (["embed_tokens", "no_such_module"], ["model.embed_tokens"]),
])
def test_list_targets_match_exact_names_or_dotted_suffixes(zoo, spec, want):
    assert adapted_paths(zoo.build("llama"), targets=spec) == want


@pytest.mark.parametrize("spec", [["proj"], ["_proj"], ["q_pro"], ["attn.q_proj"], ["f_attn.q_proj"]])
def test_list_targets_never_match_substrings(zoo, spec):
    with pytest.raises(ValueError, match="selected no module"):
        dt.attach(zoo.build("llama"), dt.LoRAConfig(targets=spec))


# -- exclude, layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("exclude,want", [
    (["v_proj"], llama(names=("self_attn.q_proj",))),
    (r".*layers\.1\..*", llama((0,), ("self_attn.q_proj", "self_attn.v_proj"))),
    (["model.layers.0.self_attn.q_proj"],
     sorted(llama((1,), ("self_attn.q_proj",)) + llama(names=("self_attn.v_proj",)))),
])
def test_exclude_wins_over_targets(zoo, exclude, want):
    assert adapted_paths(zoo.build("llama"), targets=["q_proj", "v_proj"], exclude=exclude) == want


def test_exclude_applies_to_all_linear(zoo):
    want = llama(names=tuple(n for n in LLAMA_LINEAR if not n.startswith("mlp.")))
    assert adapted_paths(zoo.build("llama"), targets="all-linear", exclude=r".*\.mlp\..*") == want


def test_excluding_everything_selected_raises(zoo):
    with pytest.raises(ValueError, match="exclude"):
        dt.attach(zoo.build("llama"), dt.LoRAConfig(targets=["q_proj"], exclude=["self_attn.q_proj"]))


@pytest.mark.parametrize("kind,pattern,want", [
    ("llama", None, llama((1,))),
    ("llama", "layers", llama((1,))),
    ("gpt2", None, gpt2((1,))),
    ("gpt2", "h", gpt2((1,))),
    ("bert", None, sorted(f"bert.encoder.layer.1.{n}" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"))),
])
def test_layers_keep_only_the_given_blocks(zoo, kind, pattern, want):
    assert adapted_paths(zoo.build(kind), layers=[1], layers_pattern=pattern) == want


def test_layers_with_the_wrong_pattern_or_index_select_nothing(zoo):
    with pytest.raises(ValueError, match=r"layers=\[1\]"):
        dt.attach(zoo.build("gpt2"), dt.LoRAConfig(layers=[1], layers_pattern="layers"))
    with pytest.raises(ValueError, match=r"layers=\[7\]"):
        dt.attach(zoo.build("llama"), dt.LoRAConfig(layers=[7]))


# -- all-linear --------------------------------------------------------------------------------------
def linear_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_all_linear_on_llama_excludes_the_lm_head(zoo):
    model = zoo.build("llama")
    want = sorted(linear_names(model) - {"lm_head"})
    assert want == llama()
    assert adapted_paths(model, targets="all-linear") == want


def test_all_linear_on_gpt2_takes_conv1d_and_excludes_the_lm_head(zoo):
    model = zoo.build("gpt2")
    assert linear_names(model) == {"lm_head"}  # every other projection is transformers' Conv1D
    assert adapted_paths(model, targets="all-linear") == gpt2()


def test_all_linear_on_bert_excludes_the_classifier(zoo):
    model = zoo.build("bert")
    want = sorted(linear_names(model) - {"classifier"})
    assert "bert.pooler.dense" in want
    assert adapted_paths(model, targets="all-linear") == want


def test_all_linear_is_the_lora_default(zoo):
    assert adapted_paths(zoo.build("llama")) == llama()
    assert adapted_paths(zoo.build("mlp")) == ["0", "2", "4"]


# -- rank and alpha patterns ---------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_are_regexes_on_the_module_name(zoo, rslora):
    cfg = dt.LoRAConfig(r=4, alpha=8, use_rslora=rslora,
                        rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\..*": 6, "proj": 3},
                        alpha_pattern={"v_proj": 3.0, r".*\.1\.mlp\.up_proj": 5.0})
    dm = dt.attach(zoo.build("llama"), cfg)
    deltas = dm.deltas("default")
    assert sorted(deltas) == llama()
    for path, d in deltas.items():
        r = 2 if path.endswith("q_proj") else 6 if path.startswith("model.layers.1.mlp.") else 4
        alpha = 3.0 if path.endswith("v_proj") else 5.0 if path == "model.layers.1.mlp.up_proj" else 8.0
        assert d.lora_A.weight.shape[0] == r and d.lora_B.weight.shape[1] == r, path
        assert d.scaling == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r), path


def test_rank_pattern_on_the_layer_kinds(zoo):
    dm = dt.attach(zoo.build("gpt2"), dt.LoRAConfig(r=4, rank_pattern={r".*h\.0\.attn\.c_attn": 1}))
    ranks = {p: d.lora_A.weight.shape[0] for p, d in dm.deltas("default").items()}
    assert ranks == {p: 1 if p == "transformer.h.0.attn.c_attn" else 4 for p in gpt2()}


# -- clear errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [["nothing_here"], r"nothing\.here"])
def test_a_spec_that_selects_nothing_names_itself_and_lists_modules(zoo, spec):
    model = zoo.build("llama")
    with pytest.raises(ValueError) as e:
        dt.attach(model, dt.LoRAConfig(targets=spec))
    msg = str(e.value)
    assert repr(spec) in msg
    leaves = [n for n, m in model.named_modules() if n and not m._modules]
    assert sum(n in msg for n in leaves) >= 3


def test_selecting_only_unsupported_modules_says_so(zoo):
    with pytest.raises(ValueError, match="LlamaRMSNorm"):
        dt.attach(zoo.build("llama"), dt.LoRAConfig(targets=["input_layernorm"]))


# -- modules_to_save -----------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["query", "classifier"], r".*\.query|classifier", "all-linear"])
def test_modules_to_save_are_never_wrapped_by_the_delta(zoo, targets):
    model = zoo.build("bert")
    dm = dt.attach(model, dt.LoRAConfig(targets=targets, modules_to_save=["classifier", "pooler.dense"]))
    deltas = dm.deltas("default")
    for saved in ("classifier", "bert.pooler.dense"):
        assert type(deltas[saved]) is dt.ModuleCopy
    lora = sorted(p for p, d in deltas.items() if not isinstance(d, dt.ModuleCopy))
    assert lora and not any(p in ("classifier", "bert.pooler.dense") for p in lora)
    assert lora == sorted(p for p in linear_names(zoo.build("bert")) - {"classifier", "bert.pooler.dense"}
                          if targets == "all-linear" or p.endswith("query"))


def test_modules_to_save_that_match_nothing_raise(zoo):
    model = zoo.build("bert")
    with pytest.raises(ValueError, match="no_head"):
        dt.attach(model, dt.LoRAConfig(modules_to_save=["no_head"]))
    assert not any(isinstance(m, dt.Site) for m in model.modules())


def test_a_module_saved_by_one_adapter_cannot_be_adapted_by_another(zoo):
    dm = dt.attach(zoo.build("bert"), dt.LoRAConfig(modules_to_save=["classifier"]), "a")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    with pytest.raises(ValueError, match="classifier"):
        dm.add(dt.LoRAConfig(targets=["classifier"]), "b")
    assert list(dm.configs) == ["a"]
    assert list(dm.state_dict()) == list(before)


# -- inspect -------------------------------------------------------------------------------------------
def test_inspect_lists_rows_and_counts(zoo):
    model = zoo.build("llama")
    ins = dt.inspect(model, targets=["q_proj"])
    assert ins.rows == [(p, "Linear", (32, 32), 32 * 32) for p in llama(names=("self_attn.q_proj",))]
    assert ins.selected_params == 2 * 32 * 32
    assert ins.total_params == sum(p.numel() for p in model.parameters())
    text = str(ins)
    assert text.splitlines()[0] == f"2 modules selected, 2,048 of {ins.total_params:,} parameters"
    assert "model.layers.1.self_attn.q_proj" in text


def test_inspect_on_gpt2_conv1d_with_layers(zoo):
    ins = dt.inspect(zoo.build("gpt2"), "all-linear", layers=[0])
    want = {"transformer.h.0.attn.c_attn": (32, 96), "transformer.h.0.attn.c_proj": (32, 32),
            "transformer.h.0.mlp.c_fc": (32, 128), "transformer.h.0.mlp.c_proj": (128, 32)}
    assert {r[0]: r[2] for r in ins.rows} == want
    assert all(r[1] == "Conv1D" and r[3] == s[0] * s[1] + s[1] for r, s in zip(ins.rows, want.values()))


def test_inspect_sees_through_adapters_and_changes_nothing(zoo):
    model = zoo.build("llama")
    before = dt.inspect(model, "all-linear", exclude=["lm_head"])
    dm = dt.attach(model, dt.LoRAConfig(targets=["q_proj", "embed_tokens"]))
    state = {k: v.clone() for k, v in dm.state_dict().items()}
    assert dt.inspect(model, "all-linear", exclude=["lm_head"]).rows == before.rows
    assert all(torch.equal(v, state[k]) for k, v in dm.state_dict().items())


def test_inspect_raises_like_attach_when_nothing_matches(zoo):
    with pytest.raises(ValueError, match="nothing_here"):
        dt.inspect(zoo.build("mlp"), targets=["nothing_here"])
