"""Bottleneck adapters and unions: placement, the papers' equations against direct computations, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import deltatune as dt

SEQ_METHODS = ("adapter_houlsby", "adapter_pfeiffer", "compacter")


def captured(model: nn.Module, path: str, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the module at ``path`` (a Site shows its wrapped module's input and final output)."""
    seen = {}
    root = model.model if isinstance(model, dt.DeltaModel) else model
    h = root.get_submodule(path).register_forward_hook(lambda m, a, o: seen.update(i=a[0], o=o))
    with torch.no_grad():
        model(**x)
    h.remove()
    return seen["i"], seen["o"]


def randomise(dm: dt.DeltaModel, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


# -- default placement -------------------------------------------------------------------------------
PLACES = {
    ("adapter_houlsby", "llama"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("adapter_houlsby", "gpt2"): ["transformer.h.{i}.attn.c_proj", "transformer.h.{i}.mlp.c_proj"],
    ("adapter_houlsby", "bert"): ["bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"],
    ("adapter_pfeiffer", "llama"): ["model.layers.{i}.mlp.down_proj"],
    ("adapter_pfeiffer", "gpt2"): ["transformer.h.{i}.mlp.c_proj"],
    ("adapter_pfeiffer", "bert"): ["bert.encoder.layer.{i}.output.dense"],
    ("compacter", "llama"): ["model.layers.{i}.mlp.down_proj"],
    ("adapter_parallel", "llama"): ["model.layers.{i}.mlp"],
    ("adapter_parallel", "gpt2"): ["transformer.h.{i}.mlp"],
    ("adapter_parallel", "bert"): ["bert.encoder.layer.{i}.intermediate", "bert.encoder.layer.{i}.output.dense"],
}


@pytest.mark.parametrize("method,kind", list(PLACES))
def test_default_sites_and_identity_at_init(zoo, method, kind):
    model = zoo.build(kind)
    x = zoo.inputs(kind)
    y0 = zoo.output(model, x)
    dm = dt.attach(model, dt.config(method))
    want = sorted(p.format(i=i) for i in (0, 1) for p in PLACES[method, kind])
    assert sorted(dm.deltas("default")) == want
    torch.testing.assert_close(zoo.output(dm, x), y0, atol=1e-6, rtol=0)


# -- equations -----------------------------------------------------------------------------------------
ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


@pytest.mark.parametrize("act", ["relu", "gelu", "swish", "tanh"])
@pytest.mark.parametrize("ln", [False, True])
def test_sequential_adapter_is_y_plus_up_act_down_y(zoo, act, ln):
    model = zoo.build("llama")
    x = zoo.inputs("llama")
    path = "model.layers.0.self_attn.o_proj"
    cfg = dt.config("adapter_houlsby", non_linearity=act, bottleneck_size=5, scaling=0.7, ln_before=ln)
    dm = dt.attach(model, cfg)
    randomise(dm)
    d = dm.deltas("default")[path]
    assert d.adapter_down.weight.shape == (5, 32) and d.adapter_up.weight.shape == (32, 5)
    site_in, site_out = captured(dm, path, x)
    base = dm.model.get_submodule(path).base
    with torch.no_grad():
        y = base(site_in)
        h = F.layer_norm(y, (32,), d.adapter_norm_before.weight, d.adapter_norm_before.bias) if ln else y
        want = y + 0.7 * (ACT[act](h @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T
                          + d.adapter_up.bias)
    torch.testing.assert_close(site_out, want, atol=1e-6, rtol=0)


def test_reduction_factor_sets_the_bottleneck(zoo):
    dm = dt.attach(zoo.build("llama"), dt.config("adapter_pfeiffer", reduction_factor=8))
    assert {d.adapter_down.weight.shape for d in dm.deltas("default").values()} == {(4, 32)}
    dm = dt.attach(zoo.build("llama"), dt.config("adapter_pfeiffer", reduction_factor=64))
    assert {d.adapter_down.weight.shape for d in dm.deltas("default").values()} == {(1, 32)}  # at least 1


@pytest.mark.parametrize("kind,path", [("llama", "model.layers.1.mlp"), ("gpt2", "transformer.h.1.mlp")])
def test_parallel_adapter_adds_a_scaled_branch_from_the_ffn_input(zoo, kind, path):
    model = zoo.build(kind)
    x = zoo.inputs(kind)
    dm = dt.attach(model, dt.config("adapter_parallel", scaling=3.0))
    randomise(dm)
    d = dm.deltas("default")[path]
    assert d.adapter_down.weight.shape == (16, 32)  # r = 32 // 2
    site_in, site_out = captured(dm, path, x)
    with torch.no_grad():
        ffn = dm.model.get_submodule(path).base(site_in)
        want = ffn + 3.0 * d.adapter_up(F.relu(d.adapter_down(site_in)))
    torch.testing.assert_close(site_out, want, atol=1e-6, rtol=0)


def test_parallel_adapter_on_bert_is_added_next_to_the_whole_ffn_before_residual_and_layernorm(zoo):
    model = zoo.build("bert")
    x = zoo.inputs("bert")
    dm = dt.attach(model, dt.config("adapter_parallel", non_linearity="gelu"))
    randomise(dm)
    layer = "bert.encoder.layer.1"
    deltas = dm.deltas("default")
    down, up = deltas[f"{layer}.intermediate"], deltas[f"{layer}.output.dense"]
    assert type(down).__name__ == "ParallelAdapterDown" and type(up).__name__ == "ParallelAdapterUp"
    seen = {}
    out_mod = dm.model.get_submodule(f"{layer}.output")
    h = out_mod.register_forward_hook(lambda m, a, o: seen.update(inter=a[0], x=a[1], out=o))
    with torch.no_grad():
        dm(**x)
    h.remove()
    xin = seen["x"]  # the FFN input (attention output), which BertOutput also adds as the residual
    base_dense = dm.model.get_submodule(f"{layer}.output.dense").base
    with torch.no_grad():
        branch = up.adapter_up(F.gelu(down.adapter_down(xin)))
        want = out_mod.LayerNorm(base_dense(seen["inter"]) + 4.0 * branch + xin)
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=0)


def test_parallel_adapters_are_additive_sequential_ones_are_not(zoo):
    dm = dt.attach(zoo.build("bert"), dt.config("adapter_parallel"))
    assert all(d.additive for d in dm.deltas("default").values())
    for m in SEQ_METHODS:
        dm.add(dt.config(m), m)
        assert not any(d.additive for d in dm.deltas(m).values())


def test_compacter_phm_weight_is_a_sum_of_kronecker_products(zoo):
    dm = dt.attach(zoo.build("llama"), dt.config("compacter", phm_dim=4, phm_rank=2, bottleneck_size=8))
    randomise(dm)
    d = dm.deltas("default")["model.layers.0.mlp.down_proj"]
    for phm, shape in ((d.adapter_down, (32, 8)), (d.adapter_up, (8, 32))):
        assert phm.phm_rule.shape == (4, 4, 4)
        assert phm.W_left.shape == (4, shape[0] // 4, 2) and phm.W_right.shape == (4, 2, shape[1] // 4)
        with torch.no_grad():
            want = sum(torch.kron(phm.phm_rule[i], phm.W_left[i] @ phm.W_right[i]) for i in range(4))
            torch.testing.assert_close(phm.weight(), want, atol=1e-6, rtol=0)
            v = torch.randn(3, shape[0])
            torch.testing.assert_close(phm(v), v @ want + phm.bias, atol=1e-5, rtol=0)


def test_compacter_bottleneck_is_a_multiple_of_phm_dim_and_errors_name_the_module(zoo):
    dm = dt.attach(zoo.build("llama"), dt.config("compacter"))  # 32 // 32 = 1 -> rounded up to 4
    assert {d.adapter_up.W_left.shape[1] for d in dm.deltas("default").values()} == {1}
    with pytest.raises(ValidationError, match="phm_dim"):
        dt.config("compacter", bottleneck_size=6)
    model = zoo.build("mlp")  # output size 5 of module "4" is not divisible by 4
    with pytest.raises(ValueError, match="4: compacter needs the output size"):
        dt.attach(model, dt.config("compacter", targets=["4"], bottleneck_size=4))
    assert not any(isinstance(m, dt.Site) for m in model.modules())


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["adapter_houlsby", "adapter_pfeiffer", "adapter_parallel", "compacter"])
def test_merge_raises_naming_the_method_and_changes_nothing(zoo, method):
    kw = {"reduction_factor": 8} if method == "compacter" else {}
    dm = dt.attach(zoo.build("llama"), dt.config(method, **kw)).eval()
    randomise(dm)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    name = {"adapter_houlsby": "HoulsbyAdapter", "adapter_pfeiffer": "PfeifferAdapter",
            "adapter_parallel": "ParallelAdapter", "compacter": "Compacter"}[method]
    with pytest.raises(dt.MergeError, match=name):
        dm.merge()
    with pytest.raises(dt.MergeError, match=name):
        dm.merge_and_unload()
    assert all(torch.equal(v, before[k]) for k, v in dm.state_dict().items())
    assert not any(s.merged for _, s in dm.sites())


@pytest.mark.parametrize("field,value", [("reduction_factor", 0), ("bottleneck_size", 0), ("non_linearity", "elu"),
                                         ("init", "zeros"), ("phm_dim", 0)])
def test_bad_config_values_name_the_field(field, value):
    method = "compacter" if field == "phm_dim" else "adapter_houlsby"
    with pytest.raises(ValidationError, match=field):
        dt.config(method, **{field: value})
    with pytest.raises(ValidationError, match="ln_before"):
        dt.config("adapter_parallel", ln_before=True)


def test_unsupported_module_is_named(zoo):
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(zoo.build("llama"), dt.config("adapter_houlsby", targets=["embed_tokens"]))


def test_split_parallel_adapter_needs_both_halves(zoo):
    model = zoo.build("bert")
    with pytest.raises(ValueError, match=r"output\.dense"):
        dt.attach(model, dt.config("adapter_parallel", targets=["intermediate"]))
    assert not any(isinstance(m, dt.Site) for m in model.modules())
    # the FFN output alone is a parallel adapter around that linear layer (its own input to its output)
    dm = dt.attach(model, dt.config("adapter_parallel", targets=[r"layer.0.output.dense"]))
    assert [type(d).__name__ for d in dm.deltas("default").values()] == ["ParallelAdapter"]


def test_split_parallel_adapter_fails_clearly_if_its_up_half_runs_alone(zoo):
    dm = dt.attach(zoo.build("bert"), dt.config("adapter_parallel"))
    dense = dm.model.get_submodule("bert.encoder.layer.0.output.dense")
    with pytest.raises(RuntimeError, match="intermediate"):
        dense(torch.randn(2, 3, 64))


def test_split_parallel_adapter_trains_with_gradient_checkpointing(zoo):
    model = zoo.build("bert")
    x = zoo.inputs("bert")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dm = dt.attach(model, dt.config("adapter_parallel", init="random"))
    dm.train()
    dm(**x, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.parameters() if p.requires_grad)


# -- unions -----------------------------------------------------------------------------------------
def mam(**lora_kw) -> list[dt.DeltaConfig]:
    return [dt.LoRAConfig(r=2, targets=["q_proj", "v_proj"], **lora_kw), dt.config("adapter_parallel")]


def test_a_list_of_configs_attaches_as_one_adapter(zoo, tmp_path):
    model = zoo.build("llama")
    x = zoo.inputs("llama")
    y0 = zoo.output(model, x)
    dm = dt.attach(model, mam(init="random"), name="mam").eval()
    assert list(dm.configs) == ["mam"] and dm.configs["mam"].type == "union"
    kinds = {p: type(d).__name__ for p, d in dm.deltas("mam").items()}
    assert kinds == {**{f"model.layers.{i}.self_attn.{m}": "LoRA" for i in (0, 1) for m in ("q_proj", "v_proj")},
                     **{f"model.layers.{i}.mlp": "ParallelAdapter" for i in (0, 1)}}
    randomise(dm, "mam")
    y = zoo.output(dm, x)
    assert (y - y0).abs().max() > 1e-3
    with dm.disabled():
        assert torch.equal(zoo.output(dm, x), y0)
    dm.save(tmp_path)
    data = json.loads((tmp_path / "mam" / "adapter_config.json").read_text())
    assert "peft_type" not in data  # no PEFT format for unions: deltatune's section only
    members = data["deltatune"]["config"]["members"]
    assert [m["type"] for m in members] == ["lora", "adapter_parallel"]
    dm2 = dt.load_adapter(zoo.build("llama"), tmp_path / "mam", name="mam")
    assert torch.equal(zoo.output(dm2, x), y)
    dm.delete("mam")
    assert not any(isinstance(m, dt.Site) for m in dm.model.modules())


def test_union_merge_refuses_a_non_mergeable_member_and_changes_nothing(zoo):
    dm = dt.attach(zoo.build("llama"), mam(), name="mam").eval()
    randomise(dm, "mam")
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    with pytest.raises(dt.MergeError, match="ParallelAdapter"):
        dm.merge()
    assert all(torch.equal(v, before[k]) for k, v in dm.state_dict().items())


def test_members_at_one_module_compose_in_member_order(zoo):
    model = zoo.build("llama")
    x = zoo.inputs("llama")
    path = "model.layers.0.self_attn.o_proj"
    cfgs = [dt.LoRAConfig(r=2, targets=["o_proj"], init="random"), dt.config("adapter_houlsby", init="random")]
    dm = dt.attach(model, cfgs, "u").eval()
    d = dm.deltas("u")[path]
    assert type(d).__name__ == "UnionDelta" and not d.additive
    lora, houlsby = d._modules["0"], d._modules["1"]
    site_in, site_out = captured(dm, path, x)
    base = dm.model.get_submodule(path).base
    with torch.no_grad():
        y = base(site_in) + lora.scaling * lora.lora_B(lora.lora_A(site_in))
        want = y + houlsby.branch(y)
    torch.testing.assert_close(site_out, want, atol=1e-6, rtol=0)
    keys = dm.adapter_state("u")[path]
    assert sorted(keys) == ["0.lora_A.weight", "0.lora_B.weight", "1.adapter_down.bias", "1.adapter_down.weight",
                            "1.adapter_up.bias", "1.adapter_up.weight"]
    with pytest.raises(dt.MergeError, match="HoulsbyAdapter"):
        dm.merge()


def test_union_of_mergeable_members_merges_to_the_same_function(zoo):
    model = zoo.build("llama")
    x = zoo.inputs("llama")
    cfgs = [dt.LoRAConfig(r=2, targets=["q_proj", "o_proj"], init="random"),
            dt.LoRAConfig(r=3, targets=["o_proj"], init="random", freeze_a=True)]
    dm = dt.attach(model, cfgs, "u").eval()
    d = dm.deltas("u")["model.layers.0.self_attn.o_proj"]
    assert not d._modules["1"].lora_A.weight.requires_grad  # each member keeps its frozen parameters
    y = zoo.output(dm, x)
    plain = dm.merge_and_unload()
    torch.testing.assert_close(zoo.output(plain, x), y, atol=1e-5, rtol=0)


def test_union_level_filters_restrict_every_member(zoo):
    dm = dt.attach(zoo.build("llama"), dt.config("union", members=mam(), layers=[1]))
    assert sorted(dm.deltas("default")) == ["model.layers.1.mlp", "model.layers.1.self_attn.q_proj",
                                            "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="member 0"):
        dt.attach(zoo.build("llama"), dt.config("union", members=mam(), targets=["mlp"]))
    with pytest.raises(ValueError, match="drops"):  # BERT's split parallel adapter needs both halves
        dt.attach(zoo.build("bert"), dt.config("union", members=[dt.LoRAConfig(targets=["query"]),
                                                                dt.config("adapter_parallel")],
                                               exclude=r".*\.intermediate"))


@pytest.mark.parametrize("members,match", [
    ([dt.LoRAConfig()], "at least two"),
    ([dt.LoRAConfig(), {"r": 2}], "type"),
    ([dt.LoRAConfig(), {"type": "no_such_method"}], "no_such_method"),
    ([dt.LoRAConfig(), {"type": "lora", "r": 0}], "r"),
    ([dt.LoRAConfig(), "lora"], "members"),
])
def test_bad_unions_fail_clearly(members, match):
    with pytest.raises((ValidationError, ValueError), match=match):
        dt.config("union", members=members)


def test_nested_unions_and_all_linear_filters_are_refused():
    inner = dt.config("union", members=mam())
    with pytest.raises(ValidationError, match="itself a union"):
        dt.config("union", members=[inner, dt.LoRAConfig()])
    with pytest.raises(ValidationError, match="all-linear"):
        dt.config("union", members=mam(), targets="all-linear")


def test_a_module_saved_by_one_member_cannot_be_adapted_by_another(zoo):
    model = zoo.build("bert")
    cfgs = [dt.LoRAConfig(targets=["query"], modules_to_save=["classifier"]), dt.LoRAConfig(targets=["classifier"])]
    with pytest.raises(ValueError, match="classifier"):
        dt.attach(model, cfgs)
    assert not any(isinstance(m, dt.Site) for m in model.modules())


def test_union_config_roundtrips_through_its_dict():
    cfg = dt.config("union", members=mam(), adapter_dtype="base")
    from deltatune.core.registry import config_class

    back = config_class("union").from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert [type(m).__name__ for m in back.members] == ["LoRAConfig", "ParallelConfig"]


@pytest.mark.parametrize("build", ["llama", "gpt2"])
def test_mam_union_prefix_tuning_plus_parallel_adapter(build, tmp_path):
    """MAM (He et al. 2022): prefix tuning + scaled parallel adapter as ONE adapter: trains both, saves, generates."""
    from conftest import build_gpt2, build_llama

    make = build_llama if build == "llama" else build_gpt2
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(2, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    dm = dt.attach(model, [dt.config("prefix_tuning", num_virtual_tokens=4), dt.config("adapter_parallel")], name="mam")
    assert dm.transforms_inputs
    with torch.no_grad():
        y1 = dm(input_ids=ids).logits
    assert (y1 - y0).abs().max() > 1e-3  # the prefixes act at once (the parallel adapter starts at zero)
    with dm.disabled(), torch.no_grad():
        torch.testing.assert_close(dm(input_ids=ids).logits, y0)
    dm.train()
    dm(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in dm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("prompt_embeddings" in n for n in trained) and any("adapter_up" in n for n in trained)
    dm.eval()
    with pytest.raises(dt.MergeError):
        dm.merge()
    dm.save(tmp_path)
    torch.manual_seed(0)
    fresh = make().eval()
    dm2 = dt.load_adapter(fresh, tmp_path / "mam", name="mam")
    with torch.no_grad():
        torch.testing.assert_close(dm2(input_ids=ids).logits, dm(input_ids=ids).logits, atol=1e-6, rtol=0)
    a = dm.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    b = dm2.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b) and a.shape == (2, 8)
