"""Prompt tuning and prefix tuning: equations against direct computations, generate with the KV cache, the core's
input-level switching (disable, activate, delete, merge, routing), and PEFT interop both ways (forward logits and
greedy token ids, max abs diff <= 1e-5)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import DynamicCache

import deltatune as dt
from deltatune.core.kv import cache_name
from deltatune.train.trainer import causal_lm_loss
from test_peft_interop import tiny_bert, tiny_gpt2, tiny_llama

ATOL = 1e-5
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
N = 4


def ids(rows: int = 2, cols: int = 6) -> torch.Tensor:
    return torch.randint(2, 64, (rows, cols), generator=torch.Generator().manual_seed(1))


def prompt(**kw) -> dt.DeltaConfig:
    return dt.config("prompt_tuning", num_virtual_tokens=N, **kw)


def prefix(**kw) -> dt.DeltaConfig:
    return dt.config("prefix_tuning", num_virtual_tokens=N, **kw)


@torch.no_grad()
def out(model, **kw) -> torch.Tensor:
    return model(**kw).logits


def greedy(model, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=x, max_new_tokens=5, do_sample=False, **kw)


def delta(dm, name="default"):
    (d,) = dm.deltas(name).values()
    return d


# -- equations -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_prompt_tuning_prepends_virtual_tokens(kind):
    base = BUILD[kind]()
    x = ids()
    dm = dt.attach(copy.deepcopy(base), prompt()).eval()
    p = delta(dm).prompt_embeddings.detach()
    emb = base.get_input_embeddings()(x)
    want = out(base, inputs_embeds=torch.cat([p.expand(2, -1, -1), emb], 1))
    got = out(dm, input_ids=x, attention_mask=torch.ones_like(x))
    assert got.shape == want.shape
    assert (got - want).abs().max() <= ATOL
    if kind != "bert":
        assert got.shape[1] == N + x.shape[1]  # logits for the virtual positions too, as PEFT returns


def test_prompt_tuning_labels_mask_and_token_types():
    base = tiny_llama()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, -2:] = 0
    dm = dt.attach(copy.deepcopy(base), prompt()).eval()
    p = delta(dm).prompt_embeddings.detach().expand(2, -1, -1)
    lab = x.clone()
    lab[0, 2] = -100
    got = dm(input_ids=x, attention_mask=mask, labels=lab)
    emb = torch.cat([p, base.get_input_embeddings()(x)], 1)
    full_mask = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], 1)
    want = base(inputs_embeds=emb, attention_mask=full_mask, labels=torch.cat([torch.full((2, N), -100), lab], 1))
    assert (got.logits - want.logits).abs().max() <= ATOL and abs(got.loss - want.loss) <= ATOL
    # BERT: token types get leading zeros; classification labels stay as they are
    bert = tiny_bert()
    dmb = dt.attach(copy.deepcopy(bert), prompt()).eval()
    tt = torch.zeros_like(x)
    tt[:, 3:] = 1
    got = dmb(input_ids=x, token_type_ids=tt, labels=torch.tensor([0, 2]))
    pb = delta(dmb).prompt_embeddings.detach().expand(2, -1, -1)
    want = bert(inputs_embeds=torch.cat([pb, bert.get_input_embeddings()(x)], 1),
                token_type_ids=torch.cat([torch.zeros(2, N, dtype=tt.dtype), tt], 1), labels=torch.tensor([0, 2]))
    assert (got.logits - want.logits).abs().max() <= ATOL and abs(got.loss - want.loss) <= ATOL


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_is_a_key_value_cache_prefix(kind, projection):
    base = BUILD[kind]()
    x = ids()
    dm = dt.attach(copy.deepcopy(base), prefix(prefix_projection=projection)).eval()
    d = delta(dm)
    cfg = dm.configs["default"]
    with torch.no_grad():
        table = d.table()
        if projection:  # P = Linear(tanh(Linear(E)))
            lin1, lin2 = d.transform[0], d.transform[2]
            assert torch.allclose(table, lin2(torch.tanh(lin1(d.embedding))))
    heads, hd = cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads
    kv = table.view(N, cfg.num_layers, 2, heads, hd)
    cache = DynamicCache([(kv[:, i, 0].permute(1, 0, 2).expand(2, -1, -1, -1),
                           kv[:, i, 1].permute(1, 0, 2).expand(2, -1, -1, -1)) for i in range(cfg.num_layers)])
    want = out(base, input_ids=x, attention_mask=torch.ones(2, N + x.shape[1]), past_key_values=cache)
    got = out(dm, input_ids=x, attention_mask=torch.ones_like(x))
    assert got.shape == out(base, input_ids=x).shape
    assert (got - want).abs().max() <= ATOL


def test_prefix_geometry_follows_peft_including_grouped_query_attention():
    for kind, (dim, heads) in {"llama": (16, 2), "gpt2": (32, 4), "bert": (32, 4)}.items():
        cfg = dt.attach(BUILD[kind](), prefix()).configs["default"]
        assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (dim, heads, 2)
        assert cfg.task_type == ("SEQ_CLS" if kind == "bert" else "CAUSAL_LM")


@pytest.mark.parametrize("make", [prompt, prefix], ids=["prompt", "prefix"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_the_cache_equals_without(make, kind):
    dm = dt.attach(BUILD[kind](), make()).eval()
    x = ids()
    cached = greedy(dm, x)
    assert cached.shape == (2, x.shape[1] + 5)
    assert torch.equal(cached, greedy(dm, x, use_cache=False))
    assert torch.equal(greedy(dm, x, attention_mask=torch.ones_like(x)), cached)
    with dm.disabled():
        assert torch.equal(greedy(dm, x), greedy(BUILD[kind](), x))


def test_text_and_vocab_init_copy_token_embeddings():
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach()
    dm = dt.attach(base, prompt(init="text", init_token_ids=[5, 9, 11]))
    assert torch.equal(delta(dm).prompt_embeddings.detach(), emb[[5, 9, 11, 5]])  # repeated to n, as PEFT does
    dm.add(dt.config("prompt_tuning", num_virtual_tokens=2, init="text", init_token_ids=[7, 8, 9]), "cut")
    assert torch.equal(delta(dm, "cut").prompt_embeddings.detach(), emb[[7, 8]])
    dm.add(prompt(init="vocab"), "vocab")
    rows = delta(dm, "vocab").prompt_embeddings.detach()
    assert all((emb == r).all(1).any() for r in rows)


# -- the core's input-level switching ----------------------------------------------------------------
def test_disable_activate_delete_switch_the_input_transform():
    base = tiny_llama()
    x = ids()
    y0 = out(base, input_ids=x)
    dm = dt.attach(base, prompt())
    dm.add(prefix(), "px")
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["q_proj"]), "lora")
    dm.eval()
    ya = out(dm, input_ids=x)
    with dm.disabled():
        assert torch.equal(out(dm, input_ids=x), y0)
    dm.activate("px")
    ypx = out(dm, input_ids=x)
    assert ypx.shape == y0.shape and not torch.equal(ypx, y0)
    with pytest.raises(ValueError, match="only one"):
        dm.activate(["default", "px"])
    dm.activate(["default", "lora"])  # input-level and weight-level together
    both = out(dm, input_ids=x)
    assert both.shape == ya.shape and not torch.equal(both, ya)
    dm.activate("lora")
    yl = out(dm, input_ids=x)
    assert yl.shape == y0.shape and not torch.equal(yl, y0)
    dm.delete("default")
    dm.delete("px")
    assert dm._input_hook is None and not dm.model._forward_pre_hooks
    assert torch.equal(out(dm, input_ids=x), yl)
    dm.delete("lora")
    assert torch.equal(out(base, input_ids=x), y0)


def test_merge_raises_naming_the_method_and_routing_is_refused():
    dm = dt.attach(tiny_gpt2(), prompt()).eval()
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["c_attn"]), "lora")
    x = ids()
    for names in (["default"], None):
        with pytest.raises(dt.MergeError, match="PromptTuning"):
            dm.merge(names)
    assert not any(s.merged for _, s in dm.sites())
    with pytest.raises(ValueError, match="prompt_tuning.*cannot be routed per row"):
        dm(input_ids=x, adapters=["default", None])
    assert out(dm, input_ids=x, adapters=["lora", None]).shape == (2, 6, 64)  # other adapters still route
    with pytest.raises(dt.MergeError, match="PrefixTuning"):
        dt.attach(tiny_llama(), prefix()).merge()


def test_trainer_loss_runs_the_whole_model_when_inputs_are_transformed():
    dm = dt.attach(tiny_llama(), prefix(prefix_projection=True))
    x = ids()
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    want = dm(**batch).loss
    assert abs(causal_lm_loss(dm.model, batch) - want) <= ATOL
    with dm.disabled():
        assert abs(causal_lm_loss(dm.model, batch) - dm.model(**batch).loss) <= ATOL


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors():
    mlp = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="needs a transformers model"):
        dt.attach(mlp, prompt())
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"input embeddings \('transformer.wte'\).*wpe"):
        dt.attach(model, prompt(targets=["wpe"]))
    assert dt.owner_of(model) is None
    with pytest.raises(ValueError, match="init_token_ids"):
        dt.attach(model, prompt(init="text", init_token_ids=[3, 999]))
    assert dt.owner_of(model) is None and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="init_token_ids, or init_text"):
        prompt(init="text")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        dt.config("prompt_tuning", num_virtual_tokens=0)
    with pytest.raises(ValueError, match="token_dim=16 in the config"):
        dt.attach(tiny_gpt2(), prefix(token_dim=16))


# -- PEFT interop ----------------------------------------------------------------------------------
def peft_load(base, folder) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


CASES = {
    "prompt-llama": ("llama", prompt, {}),
    "prompt-gpt2": ("gpt2", prompt, {}),
    "prompt-bert": ("bert", prompt, {"modules_to_save": ["classifier"]}),
    "prefix-llama": ("llama", prefix, {}),
    "prefix-gpt2": ("gpt2", prefix, {}),
    "prefix-projection-llama": ("llama", prefix, {"prefix_projection": True}),
    "prefix-bert": ("bert", prefix, {"modules_to_save": ["classifier"]}),
}


@torch.no_grad()
def peft_out(pm: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's forward logits. PEFT 0.21 refuses prefix tuning on a classifier under transformers >= 5.25 (it looks
    for ``past_key_values`` in the backbone's signature, which now says ``cache``): there, the same computation
    from PEFT's own prefix cache (``get_prompt``, built from the loaded file) on PEFT's model, mask extended by N."""
    try:
        return pm(input_ids=input_ids, attention_mask=attention_mask).logits
    except ValueError as e:
        if "does not support past key values" not in str(e):
            raise
    b, n = input_ids.shape[0], pm.peft_config[pm.active_adapter].num_virtual_tokens
    mask = torch.ones(b, n + input_ids.shape[1]) if attention_mask is None else \
        torch.cat([torch.ones(b, n, dtype=attention_mask.dtype), attention_mask], 1)
    cache = {cache_name(pm.base_model): pm.get_prompt(b)}
    return pm.base_model(input_ids=input_ids, attention_mask=mask, **cache).logits


def forward_greedy(pm: PeftModel, x: torch.Tensor, steps: int = 5, mask: bool = False) -> torch.Tensor:
    """Greedy decoding by full forwards, no KV cache: what ``generate`` must produce. PEFT 0.21's own ``generate``
    is not the reference: under transformers 5.25 its cached prompt-learning decode departs from its forward."""
    for _ in range(steps):
        nxt = peft_out(pm, x, torch.ones_like(x) if mask else None)[:, -1].argmax(-1)
        x = torch.cat([x, nxt[:, None]], 1)
    return x


def compare(kind: str, ours, theirs) -> None:
    x = ids()
    mask = torch.ones_like(x)
    for kw in ({"input_ids": x}, {"input_ids": x, "attention_mask": mask}):
        a, b = out(ours, **kw), peft_out(theirs, **kw)
        assert a.shape == b.shape, (a.shape, b.shape)
        assert (a - b).abs().max() <= ATOL, f"max abs diff {(a - b).abs().max():.3g}"
    if kind != "bert":
        for kw in ({}, {"attention_mask": mask}):
            assert torch.equal(greedy(ours, x, **kw), forward_greedy(theirs, x, mask=bool(kw)))


@torch.no_grad()
def perturb(params, seed=3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", list(CASES))
def test_deltatune_adapter_loads_in_peft_with_same_outputs(case, tmp_path):
    kind, make, kw = CASES[case]
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    y0 = out(base, input_ids=ids())
    dm = dt.attach(base, make(**kw)).eval()
    perturb(p for d in dm.deltas("default").values() for p in d.parameters())
    assert (out(dm, input_ids=ids())[:, -y0.shape[1]:] - y0).abs().max() > 1e-3
    dm.save(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "prompt_embeddings" in saved
    assert sorted(k for k in saved if k != "prompt_embeddings") == (
        ["base_model.classifier.bias", "base_model.classifier.weight"] if kind == "bert" else [])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["prefix_projection"] is False if "prefix" in case else cfg["peft_type"] == "PROMPT_TUNING"
    compare(kind, dm, peft_load(fresh, tmp_path))


def peft_config(make, kind: str, kw: dict):
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    kw = {k: v for k, v in kw.items() if k != "modules_to_save"}
    return (PromptTuningConfig if make is prompt else PrefixTuningConfig)(task_type=task, num_virtual_tokens=N, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_deltatune_with_same_outputs(case, tmp_path):
    kind, make, kw = CASES[case]
    base = BUILD[kind]()
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, peft_config(make, kind, kw))
    perturb(p for n, p in pm.named_parameters() if p.requires_grad)  # includes PEFT's SEQ_CLS classifier copy
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    dm = dt.load_adapter(fresh, tmp_path).eval()
    assert dm.configs["default"].type == ("prompt_tuning" if make is prompt else "prefix_tuning")
    compare(kind, dm, pm)
