"""Mixed-adapter batches through the batched LoRA path (``LoRA.router`` -> ``LoRARouter``).

Row i of a routed batch must equal adapter i run alone (<= 1e-5), whatever the mix: many adapters, repeats,
rows on the base, mixed ranks / alphas / rsLoRA, other methods in the same batch (which fall back to the
Site's per-adapter loop), and generation with a KV cache. The work must not grow with the number of distinct
adapters: the same kernels run for 2 or 6 of them.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.methods.lora import LoRA, LoRARouter

ATOL = 1e-5


def lora_model(zoo, kind: str = "llama", n: int = 6, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny model with adapters a0..a{n-1}: LoRA with varied ranks, alphas, rsLoRA, random non-zero B."""
    dm = dt.DeltaModel(zoo.build(kind, dtype))
    for i in range(n):
        torch.manual_seed(10 + i)
        kw = dict(r=(2, 4, 8)[i % 3], alpha=(4.0, 8.0, 3.0)[i % 3], use_rslora=i % 2 == 1, init="random",
                  targets="all-linear")
        dm.add(dt.LoRAConfig(**{**kw, **overrides}), f"a{i}")
    return dm.eval()


def out(dm, x, **kw):
    with torch.no_grad():
        o = dm(**x, **kw)
    return o.logits if hasattr(o, "logits") else o


def alone(dm, x, name):
    """Each row's reference: the batch run with only ``name`` active (None: the base)."""
    if name is None:
        with dm.disabled():
            return out(dm, x)
    dm.activate(name)
    return out(dm, x)


def assert_rows_match(dm, x, rows, atol=ATOL):
    y = out(dm, x, adapters=rows)
    for name in dict.fromkeys(rows):
        want = alone(dm, x, name)
        for i in [i for i, r in enumerate(rows) if r == name]:
            err = (y[i] - want[i]).abs().max().item()
            assert err <= atol, f"row {i} ({name}): max |diff| {err:.2e} > {atol:.0e}"
    return y


def plans(dm, rows, x):
    """The routers and the loop list each site built for ``rows`` (read inside the routing context)."""
    with dm.routing(rows), torch.no_grad():
        dm(**x)
        return dict(dm._state.route_plans)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_many_adapters_with_repeats_and_base_rows_equal_each_alone(zoo, kind):
    dm = lora_model(zoo, kind)
    x = zoo.inputs(kind, rows=10)
    rows = ["a0", "a1", None, "a2", "a3", "a0", "a4", None, "a5", "a1"]
    y = assert_rows_match(dm, x, rows)
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[0], y[2])  # the deltas matter
    routers = [r for routers, _ in plans(dm, rows, x).values() for r in routers]
    assert routers and all(isinstance(r, LoRARouter) and r.only is None for r in routers)
    assert all(not loop for _, loop in plans(dm, rows, x).values())  # nothing fell back to the loop


def test_one_adapter_on_every_row_runs_its_own_forward(zoo):
    dm = lora_model(zoo, n=2)
    x = zoo.inputs("llama", rows=4)
    assert_rows_match(dm, x, ["a1"] * 4)
    routers = [r for routers, _ in plans(dm, ["a1"] * 4, x).values() for r in routers]
    assert routers and all(isinstance(r.only, LoRA) for r in routers)


@pytest.mark.parametrize("rows", [["a0", None, None, None], [None, "a1", None, "a1"], [None, None, None, None]])
def test_one_adapter_among_base_rows(zoo, rows):
    dm = lora_model(zoo, n=2)
    x = zoo.inputs("llama", rows=4)
    y = assert_rows_match(dm, x, rows)
    with dm.disabled():
        y0 = out(dm, x)
    for i, r in enumerate(rows):
        if r is None:
            assert torch.equal(y[i], y0[i])  # zero factors leave base rows exactly as they were


def test_same_rank_and_alpha_adapters_use_one_scale(zoo):
    dm = lora_model(zoo, n=4, r=4, alpha=8.0, use_rslora=False)
    x = zoo.inputs("llama", rows=5)
    rows = ["a3", "a2", "a1", "a0", None]
    assert_rows_match(dm, x, rows)
    router = next(r for routers, _ in plans(dm, rows, x).values() for r in routers)
    assert router.scale is None and router.alpha == 2.0 and not router.padded


def test_work_does_not_grow_with_the_number_of_distinct_adapters(zoo):
    dm = lora_model(zoo, n=6, r=4, alpha=8.0)
    x = zoo.inputs("llama", rows=6)

    def ops(rows):
        counts: collections.Counter = collections.Counter()

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func.overloadpacket)] += 1
                return func(*args, **(kwargs or {}))

        with dm.routing(rows), torch.no_grad(), Count():
            dm(**x)
        return counts

    two = ops(["a0", "a1"] * 3)
    six = ops([f"a{i}" for i in range(6)])
    assert two == six
    assert two["aten.bmm"] > 0


def test_other_methods_in_the_same_batch_fall_back_to_the_loop(zoo):
    dm = lora_model(zoo, n=3)
    torch.manual_seed(5)
    dm.add(dt.LoRAConfig(r=4, init="random", use_dora=True, targets="all-linear"), "dora")
    dm.add(dt.config("ia3"), "ia3")
    torch.manual_seed(6)
    dm.add(dt.LoRAConfig(r=2, init="random", targets=["embed_tokens", "q_proj"]), "emb")
    with torch.no_grad():
        for d in dm.deltas("ia3").values():
            d.ia3_l.add_(torch.randn_like(d.ia3_l) * 0.3)
    dm.eval()
    x = zoo.inputs("llama", rows=7)
    rows = ["a0", "dora", "ia3", "a1", "emb", None, "a2"]
    assert_rows_match(dm, x, rows)
    kinds = {type(d).__name__ for _, loop in plans(dm, rows, x).values() for d, _ in loop}
    assert kinds == {"LoRA", "IA3", "LoRAEmbedding"}  # DoRA, IA3 and the embedding LoRA take the loop


def test_half_precision_base_with_float32_deltas(zoo):
    dm = lora_model(zoo, n=3, dtype=torch.bfloat16)
    x = zoo.inputs("llama", rows=4)
    y = assert_rows_match(dm, x, ["a0", "a1", None, "a2"], atol=2e-2)
    assert y.dtype == torch.bfloat16
    assert {d.lora_A.weight.dtype for d in dm.deltas("a0").values()} == {torch.float32}


def test_parameter_updates_show_inside_one_routing_context(zoo):
    dm = lora_model(zoo, n=2)
    x = zoo.inputs("llama", rows=2)
    with dm.routing(["a0", "a1"]), torch.no_grad():
        before = dm(**x).logits
        for d in dm.deltas("a1").values():
            d.lora_B.weight.mul_(2.0)
        after = dm(**x).logits
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])
    assert dm._state.plans  # kept for the next routing of the same rows (they hold no copies)
    assert not dm._state.route_plans  # but no routing is on
    assert_rows_match(dm, x, ["a0", "a1"])


def test_a_deleted_or_added_adapter_is_routed_afresh(zoo):
    dm = lora_model(zoo, n=3)
    x = zoo.inputs("llama", rows=3)
    assert_rows_match(dm, x, ["a0", "a1", "a2"])
    dm.delete("a1")
    torch.manual_seed(99)
    dm.add(dt.LoRAConfig(r=6, init="random", targets="all-linear"), "a1")
    dm.eval()
    assert_rows_match(dm, x, ["a0", "a1", "a2"])


def test_plans_are_kept_across_routings_with_the_same_rows_until_something_changes(zoo):
    dm = lora_model(zoo, n=3)
    x = zoo.inputs("llama", rows=3)
    rows = ["a0", None, "a2"]
    first = plans(dm, rows, x)
    again = plans(dm, rows, x)  # a decoding loop routing every step: the plans are built once
    assert first and all(again[s] is p for s, p in first.items())
    other = plans(dm, ["a2", None, "a0"], x)
    assert all(other[s] is not p for s, p in first.items())
    assert all(plans(dm, rows, x)[s] is p for s, p in first.items())  # the last few routings are kept
    assert dm._state.keep_plans == 4
    for others in (["a0", None, None], ["a1", None, None], ["a2", None, None], [None, None, None]):
        plans(dm, others, x)
    assert all(plans(dm, rows, x)[s] is not p for s, p in first.items())  # ... only the last few
    with torch.no_grad():  # in-place updates between routings show: the plans hold the parameters themselves
        for d in dm.deltas("a2").values():
            d.lora_B.weight.mul_(-1.0)
    assert_rows_match(dm, x, rows)
    dm.activate("a1")  # any change drops them
    assert not dm._state.plans
    dm.double()  # the model's dtype is part of what plans are kept for
    y = assert_rows_match(dm, {k: v for k, v in x.items()}, rows)
    assert y.dtype == torch.float64


def test_merged_adapters_are_still_refused_after_routing(zoo):
    dm = lora_model(zoo, n=2)
    x = zoo.inputs("llama", rows=2)
    assert_rows_match(dm, x, ["a0", "a1"])
    dm.activate("a0")
    dm.merge()
    with pytest.raises(RuntimeError, match="merged"):
        out(dm, x, adapters=["a0", "a1"])
    dm.unmerge()
    assert_rows_match(dm, x, ["a0", "a1"])


def test_grad_enabled_eval_forward_is_out_of_place_and_equal(zoo):
    dm = lora_model(zoo, n=3)
    x = zoo.inputs("llama", rows=3)
    y = dm(**x, adapters=["a0", "a1", "a2"]).logits
    assert y.requires_grad  # the deltas are trainable: autograd saw an out-of-place update
    torch.testing.assert_close(y.detach(), out(dm, x, adapters=["a0", "a1", "a2"]), atol=ATOL, rtol=0)


def test_dropout_is_batched_in_eval_only(zoo):
    dm = lora_model(zoo, n=2, dropout=0.5)
    d = next(iter(dm.deltas("a0").values()))
    assert d.route_group is not None
    d.train()
    assert d.route_group is None
    d.eval()
    assert_rows_match(dm, zoo.inputs("llama", rows=3), ["a1", "a0", "a1"])


def test_a_lora_subclass_with_its_own_forward_routes_alone():
    class Doubled(LoRA):
        def forward(self, x, y, base):
            return super().forward(x, super().forward(x, y, base), base)

    assert LoRA(torch.nn.Linear(4, 3), r=2, scaling=1.0).route_group is not None
    assert Doubled(torch.nn.Linear(4, 3), r=2, scaling=1.0).route_group is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_kv_cache_equals_each_adapter_alone(zoo, kind):
    dm = lora_model(zoo, kind, n=4)
    ids = zoo.inputs(kind, rows=6)["input_ids"]
    rows = ["a0", "a1", "a2", None, "a3", "a1"]
    gen = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    got = dm.generate(ids, adapters=rows, **gen)
    for i, name in enumerate(rows):
        if name is None:
            with dm.disabled():
                want = dm.generate(ids[i:i + 1], **gen)
        else:
            dm.activate(name)
            want = dm.generate(ids[i:i + 1], **gen)
        assert torch.equal(got[i:i + 1], want), f"row {i} ({name})"


@pytest.mark.slow
def test_smollm2_mixed_batch_generates_what_each_adapter_generates_alone():
    from deltatune.generation import generate

    model, tok = dt.load_pretrained("smollm2-135m")
    dm = None
    for i in range(3):
        torch.manual_seed(20 + i)
        cfg = dt.LoRAConfig(r=8, alpha=2.0, init="random", targets="all-linear")
        dm = dt.attach(model, cfg, name=f"a{i}") if dm is None else dm.add(cfg, f"a{i}")
    dm.eval()
    prompts = ["Name a colour.", "What is two plus two?", "Write one word about the sea.", "Say hello."]
    rows = ["a0", "a1", None, "a2"]
    got = generate(dm, tok, prompts, adapters=rows, max_new_tokens=12, chat=True)
    want = {}
    for name in dict.fromkeys(rows):
        if name is None:
            with dm.disabled():
                want[name] = generate(dm, tok, prompts, max_new_tokens=12, chat=True)
        else:
            dm.activate(name)
            want[name] = generate(dm, tok, prompts, max_new_tokens=12, chat=True)
    for i, name in enumerate(rows):
        assert got[i] == want[name][i], f"row {i} ({name})"
    assert any(got[i] != want[None][i] for i, r in enumerate(rows) if r is not None)  # the adapters matter
