"""Composition blocks (Stack, Parallel, Average, Fuse, Split) against direct computations, fusion training and
files, merging a weighted composition, generation, and every refusal leaving the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.delta import MergeError

close = torch.testing.assert_close
PATH = "model.layers.0.mlp.down_proj"  # a Llama site every adapter below adapts


def randomise(dm: dt.DeltaModel, name: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dm.deltas(name).values():
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def with_adapters(zoo, kind: str, cfg, names=("a", "b", "c")) -> tuple[dt.DeltaModel, dict]:
    dm = dt.attach(zoo.build(kind), cfg, names[0])
    for n in names[1:]:
        dm.add(cfg, n)
    for i, n in enumerate(names):
        randomise(dm, n, seed=i + 1)
    return dm, zoo.inputs(kind)


def houlsby(**kw) -> dt.DeltaConfig:
    return dt.config("adapter_houlsby", bottleneck_size=4, scaling=0.8, **kw)


def at_site(dm: dt.DeltaModel, x: dict, path: str = PATH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(site input, base output, composed output) at ``path`` in one forward."""
    site = dm.model.get_submodule(path)
    seen = {}
    hook = site.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        dm(**x)
        hook.remove()
        return seen["x"], site.base(seen["x"]), seen["y"]


def f(dm: dt.DeltaModel, name: str, h: torch.Tensor, path: str = PATH) -> torch.Tensor:
    """A sequential adapter's contribution ``s * up(act(down(h)))`` at ``path``."""
    d = dm.deltas(name)[path]
    return d.branch(h) * d.scaling


def out(dm, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        r = dm(**x, **kw)
    return r.logits if hasattr(r, "logits") else r


# -- the blocks' equations ---------------------------------------------------------------------------------
def test_stack_is_sequential_application(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby())
    dm.activate(dt.Stack("a", "b"))
    xs, h, y = at_site(dm, x)
    h1 = h + f(dm, "a", h)
    close(y, h1 + f(dm, "b", h1), atol=1e-6, rtol=0)
    stacked = out(dm, x)
    dm.activate(["a", "b"])  # a plain list is a Stack
    close(out(dm, x), stacked, atol=1e-6, rtol=0)
    dm.activate(dt.Stack("b", "a"))
    assert (out(dm, x) - stacked).abs().max() > 1e-4, "sequential adapters do not commute"


def test_parallel_and_average_of_sequential_adapters_add_contributions(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby())
    dm.activate(dt.Parallel("a", "b", "c"))
    _, h, y = at_site(dm, x)
    close(y, h + f(dm, "a", h) + f(dm, "b", h) + f(dm, "c", h), atol=1e-6, rtol=0)
    dm.activate(dt.Average("a", "b"))
    _, h, y = at_site(dm, x)
    close(y, h + (f(dm, "a", h) + f(dm, "b", h)) / 2, atol=1e-6, rtol=0)
    dm.activate(dt.Average("a", "b", weights=[1, 3]))
    _, h, y = at_site(dm, x)
    close(y, h + 0.25 * f(dm, "a", h) + 0.75 * f(dm, "b", h), atol=1e-6, rtol=0)
    dm.activate(dt.Average("a", "b", weights=[2, -1], normalize_weights=False))
    _, h, y = at_site(dm, x)
    close(y, h + 2 * f(dm, "a", h) - f(dm, "b", h), atol=1e-6, rtol=0)


def _scaled_copy(dm: dt.DeltaModel, src: str, name: str, cfg, w: float) -> None:
    dm.add(cfg, name)
    with torch.no_grad():
        for path, d in dm.deltas(name).items():
            d.load_state_dict(dm.deltas(src)[path].state_dict())
            d.lora_B.weight.mul_(w)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_lora_parallel_is_the_sum_and_average_halves_b(zoo, kind):
    cfg = dt.LoRAConfig(r=4, init="random")
    dm, x = with_adapters(zoo, kind, cfg, ("a", "b"))
    dm.activate(["a", "b"])
    summed = out(dm, x)
    dm.activate(dt.Parallel("a", "b"))
    close(out(dm, x), summed, atol=1e-5, rtol=0)
    dm.activate(dt.Stack("a", "b"))
    close(out(dm, x), summed, atol=1e-5, rtol=0)  # additive deltas: stack == parallel
    for w in (0.5, 0.2):
        _scaled_copy(dm, "a", "ah", cfg, w)
        _scaled_copy(dm, "b", "bh", cfg, 1 - w)
        dm.activate(["ah", "bh"])
        want = out(dm, x)
        dm.activate(dt.Average("a", "b", weights=None if w == 0.5 else [w, 1 - w]))
        close(out(dm, x), want, atol=1e-5, rtol=0)
        dm.activate("a")
        dm.delete("ah")
        dm.delete("bh")


class PositionWise(nn.Module):
    """Embedding -> MLP -> head, every position on its own: a split is exact end to end."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.embed(input_ids))))))


@pytest.mark.parametrize("method", ["lora", "adapter_houlsby"])
def test_split_runs_each_adapter_on_its_span(method):
    torch.manual_seed(0)
    cfg = (dt.LoRAConfig(r=4, init="random", targets=["embed", "fc1", "fc2"]) if method == "lora"
           else dt.config("adapter_houlsby", bottleneck_size=4, init="random", targets=["fc1", "fc2"]))
    dm = dt.attach(PositionWise().eval(), cfg, "a")
    dm.add(cfg, "b")
    dm.add(cfg, "c")
    x = {"input_ids": torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))}
    alone = {}
    for n in "abc":
        dm.activate(n)
        alone[n] = out(dm, x)
    dm.activate(dt.Split("a", "b", splits=4))
    close(out(dm, x), torch.cat([alone["a"][:, :4], alone["b"][:, 4:]], 1), atol=1e-6, rtol=0)
    dm.activate(dt.Split("a", "b", "c", splits=[2, 5]))
    close(out(dm, x), torch.cat([alone["a"][:, :2], alone["b"][:, 2:7], alone["c"][:, 7:]], 1), atol=1e-6, rtol=0)
    dm.activate(dt.Split("a", "b", splits=100))  # b's span starts after the sequence
    close(out(dm, x), alone["a"], atol=1e-6, rtol=0)
    dm.activate(dt.Split("c", dt.Average("a", "b"), splits=3))
    got = out(dm, x)
    dm.activate(dt.Average("a", "b"))
    close(got, torch.cat([alone["c"][:, :3], out(dm, x)[:, 3:]], 1), atol=1e-6, rtol=0)


def test_split_on_a_causal_lm_and_in_generate(zoo):
    dm, x = with_adapters(zoo, "llama", dt.LoRAConfig(r=4, init="random"), ("a", "b"))
    dm.activate("a")
    ya = out(dm, x)
    dm.activate(dt.Split("a", "b", splits=3))
    close(out(dm, x)[:, :3], ya[:, :3], atol=1e-5, rtol=0)  # causal: the first span sees only adapter a
    ids = x["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False)
    dm.activate(dt.Split("a", "b", splits=ids.shape[1] + 2))  # the switch happens while decoding
    cached = dm.generate(ids, **kw)
    assert torch.equal(cached, dm.generate(ids, use_cache=False, **kw)), "decode steps must use absolute positions"
    dm.activate(dt.Split("a", "b", splits=100))
    long = dm.generate(ids, **kw)
    dm.activate("a")
    assert torch.equal(long, dm.generate(ids, **kw))


def test_fuse_is_attention_over_contributions(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby(), ("a", "b"))
    dm.add(dt.FusionConfig(adapters=["a", "b"], temperature=2.0), "ab")
    randomise(dm, "ab", seed=9, scale=0.2)
    assert dm.active == ["a"] and set(dm.deltas("ab")) == set(dm.deltas("a"))
    dm.activate(dt.Fuse("a", "b"))
    assert dm.composition == dt.Fuse("a", "b", fusion="ab") and dm.active == ["ab", "a", "b"]
    _, h, y = at_site(dm, x)
    fu = dm.deltas("ab")[PATH]
    c = torch.stack([f(dm, "a", h), f(dm, "b", h)], dim=-2)
    q = h @ fu.fusion_query.weight.T + fu.fusion_query.bias
    k = c @ fu.fusion_key.weight.T + fu.fusion_key.bias
    s = torch.softmax((q.unsqueeze(-2) * k).sum(-1) / 2.0, dim=-1)
    close(y, h + (s.unsqueeze(-1) * c).sum(-2) @ fu.fusion_value.weight.T, atol=1e-5, rtol=0)


def test_a_narrowed_fusion_averages_where_it_has_no_parameters(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby(), ("a", "b"))
    dm.add(dt.FusionConfig(adapters=["a", "b"], targets=["o_proj"], layers=[0]), "ab")
    assert list(dm.deltas("ab")) == ["model.layers.0.self_attn.o_proj"]
    randomise(dm, "ab", seed=9, scale=0.2)
    dm.activate(dt.Fuse("a", "b"))
    _, h, y = at_site(dm, x)  # down_proj: no fusion parameters
    close(y, h + (f(dm, "a", h) + f(dm, "b", h)) / 2, atol=1e-6, rtol=0)
    o = "model.layers.0.self_attn.o_proj"
    _, h, y = at_site(dm, x, o)
    close(y, dm.deltas("ab")[o].fuse(h, [f(dm, "a", h, o), f(dm, "b", h, o)]), atol=1e-6, rtol=0)


def test_fresh_fusion_starts_near_the_average(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby(), ("a", "b"))
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.activate(dt.Average("a", "b"))
    avg = out(dm, x)
    dm.activate(dt.Fuse("a", "b"))
    close(out(dm, x), avg, atol=5e-3, rtol=0)  # Q, K ~ N(0, 0.02): near-uniform attention, V = I


def test_nested_blocks(zoo):
    dm, x = with_adapters(zoo, "llama", houlsby())
    dm.activate(dt.Stack("a", dt.Parallel("b", "c")))
    _, h, y = at_site(dm, x)
    h1 = h + f(dm, "a", h)
    close(y, h1 + f(dm, "b", h1) + f(dm, "c", h1), atol=1e-6, rtol=0)
    dm.activate(dt.Average(dt.Stack("a", "b"), "c"))
    _, h, y = at_site(dm, x)
    h1 = h + f(dm, "a", h)
    close(y, h + 0.5 * (h1 + f(dm, "b", h1) - h) + 0.5 * f(dm, "c", h), atol=1e-6, rtol=0)
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.activate(dt.Stack("c", dt.Fuse("a", "b")))
    _, h, y = at_site(dm, x)
    h1 = h + f(dm, "c", h)
    close(y, dm.deltas("ab")[PATH].fuse(h1, [f(dm, "a", h1), f(dm, "b", h1)]), atol=1e-6, rtol=0)
    assert dm.active == ["ab", "c", "a", "b"]


def test_input_level_adapter_first_in_a_top_level_stack(zoo):
    model = zoo.build("llama")
    dm = dt.attach(model, dt.config("prompt_tuning", num_virtual_tokens=3), "p")
    dm.add(dt.LoRAConfig(r=4, init="random"), "a")
    dm.add(dt.LoRAConfig(r=4, init="random"), "b")
    x = zoo.inputs("llama")
    dm.activate(["p", "a"])
    want = out(dm, x)
    dm.activate(dt.Stack("p", "a"))
    close(out(dm, x), want, atol=1e-5, rtol=0)
    dm.activate(dt.Stack("p", dt.Average("a", "b")))
    assert dm.transforms_inputs and out(dm, x).shape == want.shape
    for bad in (dt.Parallel("p", "a"), dt.Stack("a", dt.Average("p", "b")), dt.Split("p", "a", splits=2)):
        with pytest.raises(ValueError, match="act on the model's inputs"):
            dm.activate(bad)


def test_module_copies_average_and_refuse_to_stack(zoo):
    cfg = dt.LoRAConfig(r=2, targets=["query"], modules_to_save=["classifier"])  # LoRA B = 0: only the heads differ
    dm, x = with_adapters(zoo, "bert", cfg, ("a", "b"))
    with torch.no_grad():
        for p in dm.parameters():  # randomise() also moved LoRA B; zero it again so only the heads matter
            if p.dim() == 2 and p.shape[1] == 2:
                p.zero_()
    ya, yb = [(dm.activate(n), out(dm, x))[1] for n in "ab"]
    dm.activate(dt.Average("a", "b", weights=[1, 3]))
    close(out(dm, x), 0.25 * ya + 0.75 * yb, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="own copy of 'classifier'"):
        dm.activate(dt.Stack("a", "b"))
    with pytest.raises(MergeError, match="own copy"):
        dm.merge()


# -- merging ---------------------------------------------------------------------------------------------
def test_weighted_composition_merges_and_unmerges(zoo):
    dm, x = with_adapters(zoo, "llama", dt.LoRAConfig(r=4, init="random"), ("a", "b", "c"))
    with dm.disabled():
        y0 = out(dm, x)
    dm.activate(dt.Stack("c", dt.Average("a", "b", weights=[0.3, 0.7])))
    want = out(dm, x)
    dm.merge()
    sites = [s for _, s in dm.sites()]
    assert all(sorted(s.merged) == ["a", "b", "c"] for s in sites)
    assert all(s.merge_scales == pytest.approx({"a": 0.3, "b": 0.7}) for s in sites)
    close(out(dm, x), want, atol=1e-5, rtol=0)
    with dm.disabled():
        close(out(dm, x), y0, atol=1e-5, rtol=0)
    close(out(dm, x), want, atol=1e-5, rtol=0)  # re-merged with the same weights
    with pytest.raises(RuntimeError, match="merged"):
        dm.activate(dt.Average("a", "b"))
    dm.unmerge()
    close(out(dm, x), want, atol=1e-5, rtol=0)
    with dm.disabled():
        close(out(dm, x), y0, atol=1e-5, rtol=0)
    plain = dm.merge_and_unload()
    close(out(plain, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block,cfg,match", [
    (dt.Fuse("a", "b"), houlsby(), "Fuse cannot be merged"),
    (dt.Split("a", "b", splits=2), dt.LoRAConfig(r=4, init="random"), "Split cannot be merged"),
    (dt.Average("a", "b"), houlsby(), "cannot be merged"),
    (dt.Average("a", "b"), dt.LoRAConfig(r=4, init="random", use_dora=True), "non-additive"),
    (dt.Average("a", "b"), (dt.LoRAConfig(r=4, init="random", use_dora=True, targets=["q_proj"]),
                            dt.LoRAConfig(r=4, init="random", targets=["v_proj"])), "not additive; .* weight 0.5"),
])
def test_merge_refusals_change_nothing(zoo, block, cfg, match):
    if isinstance(cfg, tuple):
        dm, x = with_adapters(zoo, "llama", cfg[0], ("a",))
        dm.add(cfg[1], "b")
        randomise(dm, "b", seed=2)
    else:
        dm, x = with_adapters(zoo, "llama", cfg, ("a", "b"))
    if isinstance(block, dt.Fuse):
        dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.activate(block)
    want = out(dm, x)
    weights = {k: v.clone() for k, v in dm.model.state_dict().items()}
    with pytest.raises(MergeError, match=match):
        dm.merge()
    assert all(torch.equal(v, weights[k]) for k, v in dm.model.state_dict().items())
    assert not any(s.merged for _, s in dm.sites())
    close(out(dm, x), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="merges as a whole"):
        dm.merge(["a"])


# -- generation -------------------------------------------------------------------------------------------
def test_generate_under_compositions(zoo):
    dm, x = with_adapters(zoo, "llama", dt.LoRAConfig(r=4, init="random"), ("a", "b"))
    ids = x["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False)
    dm.activate(["a", "b"])
    summed = dm.generate(ids, **kw)
    dm.activate(dt.Parallel("a", "b"))
    assert torch.equal(dm.generate(ids, **kw), summed)
    dm.activate(dt.Average("a", "b", weights=[0.3, 0.7]))
    avg = dm.generate(ids, **kw)
    assert avg.shape == (3, ids.shape[1] + 5)
    dm.merge()
    assert torch.equal(dm.generate(ids, **kw), avg)
    dm.unmerge()
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    randomise(dm, "ab", seed=5, scale=0.2)
    dm.activate(dt.Fuse("a", "b"))
    fused = dm.generate(ids, **kw)
    assert torch.equal(fused, dm.generate(ids, use_cache=False, **kw))


# -- fusion: training, files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tiny_lm import make_tiny_lm_folder

    return make_tiny_lm_folder(tmp_path_factory.mktemp("tiny"))


def test_fusion_trains_alone_with_the_trainer_and_reloads(tiny_lm, tmp_path):
    from deltatune.train.data import Collator, load_dataset
    from deltatune.train.trainer import TrainConfig, Trainer

    model, tok = dt.load_pretrained(tiny_lm)
    torch.manual_seed(0)
    dm = dt.attach(model, dt.LoRAConfig(r=4, init="random"), "a", trainable=False)
    dm.add(dt.LoRAConfig(r=4, init="random"), "b", trainable=False)
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.activate(dt.Fuse("a", "b"))
    fusion = {id(p) for d in dm.deltas("ab").values() for p in d.parameters()}
    assert {id(p) for p in dm.parameters() if p.requires_grad} == fusion
    frozen = {f"{n}.{k}": v.clone() for n in "ab" for k, v in dm.state_dict().items() if f".deltas.{n}." in k}
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "the cat sat on mat number {i} today"}}\n' for i in range(8)))
    ds = load_dataset(data, tok, max_length=32)
    res = Trainer(dm, ds, TrainConfig(steps=30, batch_size=8, lr=1e-2), tmp_path / "out", collate=Collator(tok),
                  progress=False).train()
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30 and losses[-1] < 0.8 * losses[0], losses
    assert res.adapter_dir == tmp_path / "out"
    assert len(frozen) == 2 * 2 * 14 and all(torch.equal(v, frozen[f"{n}.{k}"]) for n in "ab" for k, v in dm.state_dict().items() if f".deltas.{n}." in k)
    x = tok(["the cat sat on"], return_tensors="pt")
    want = out(dm, dict(x))
    dm.save(tmp_path / "saved", ["a", "b"])
    fresh, _ = dt.load_pretrained(tiny_lm)
    with pytest.raises(dt.AdapterFileError, match="not loaded"):
        dt.load_adapter(fresh, tmp_path / "out", "ab")
    dm2 = dt.load_adapter(fresh, tmp_path / "saved" / "a", "a")
    dm2.load(tmp_path / "saved" / "b", "b")
    dm2.load(tmp_path / "out", "ab")  # the Trainer saved the fusion, with the names of its adapters
    dm2.activate(dt.Fuse("a", "b"))
    close(out(dm2, dict(x)), want, atol=1e-5, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------------
def test_blocks_validate_on_construction():
    assert dt.Stack("a") == dt.Stack(["a"]) and repr(dt.Average("a", "b")) == "Average('a', 'b', weights=[0.5, 0.5])"
    bad = [
        (lambda: dt.Parallel("a"), ValueError, "at least 2"),
        (lambda: dt.Stack("a", dt.Parallel("b", "a")), ValueError, "'a' appears more than once"),
        (lambda: dt.Stack("a", 3), TypeError, "adapter name or a block"),
        (lambda: dt.Stack("a/../b"), ValueError, "not an adapter name"),
        (lambda: dt.Average("a", "b", weights=[1]), ValueError, "1 weights for 2"),
        (lambda: dt.Average("a", "b", weights=[1, -1]), ValueError, "sum to 0"),
        (lambda: dt.Average("a", "b", weights=[1, float("nan")]), ValueError, "finite"),
        (lambda: dt.Fuse("a", dt.Stack("b", "c")), TypeError, "by name"),
        (lambda: dt.Split("a", "b", "c", splits=2), ValueError, "3 children need 2"),
        (lambda: dt.Split("a", "b", splits=[0]), ValueError, "> 0"),
        (lambda: dt.Split("a", "b", splits=1.5), TypeError, "int"),
    ]
    for make, exc, match in bad:
        with pytest.raises(exc, match=match):
            make()
    with pytest.raises(AttributeError, match="immutable"):
        dt.Stack("a").children = ("b",)
    with pytest.raises(ValueError):
        dt.FusionConfig(adapters=["a"])
    with pytest.raises(ValueError, match="distinct"):
        dt.FusionConfig(adapters=["a", "a"])


def test_refusals_leave_the_model_unchanged(zoo):
    dm, x = with_adapters(zoo, "llama", dt.LoRAConfig(r=4, init="random"))
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.activate(dt.Average("a", "b"))
    want, block, active = out(dm, x), dm.composition, dm.active
    cases = [
        (lambda: dm.activate(dt.Stack("a", "nope")), KeyError, "nope"),
        (lambda: dm.activate(dt.Stack("a", "ab")), ValueError, "AdapterFusion"),
        (lambda: dm.activate("ab"), ValueError, "dt.Fuse"),
        (lambda: dm.activate(dt.Fuse("a", "c")), ValueError, "no fusion over"),
        (lambda: dm.activate(dt.Fuse("a", "b", fusion="c")), ValueError, "not a fusion"),
        (lambda: dm.activate(dt.Fuse("a", "b", fusion="zz")), KeyError, "zz"),
        (lambda: out(dm, x, adapters=["a", None, "b"]), RuntimeError, "composition is active"),
        (lambda: dm.delete("a"), RuntimeError, "part of the active composition"),
        (lambda: dm.add(dt.FusionConfig(adapters=["a", "zz"]), "f2"), ValueError, "not loaded"),
        (lambda: dm.add(dt.FusionConfig(adapters=["a", "ab"]), "f2"), ValueError, "itself a fusion"),
        (lambda: dm.activate(42), TypeError, None),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
        assert dm.composition == block and dm.active == active and "f2" not in dm.configs
        close(out(dm, x), want, atol=0, rtol=0)
    dm.activate("c")
    with pytest.raises(RuntimeError, match="fused by"):
        dm.delete("a")
    with pytest.raises(ValueError, match="AdapterFusions"):
        out(dm, x, adapters=["ab", None, "a"])
    dm.activate(dt.Fuse("a", "b"))
    dm.activate("c")  # a plain activation drops the composition
    assert dm.composition is None and dm.active == ["c"]
    dm.delete("ab")
    dm.delete("a")
    assert "a" not in dm.configs


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("method", ["lora", "adapter_parallel"])
def test_every_block_runs_and_fusion_gets_the_only_gradients(zoo, kind, method):
    cfg = dt.LoRAConfig(r=4, init="random") if method == "lora" else dt.config(method, init="random")
    dm, x = with_adapters(zoo, kind, cfg, ("a", "b"))
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab")
    dm.set_trainable("a", False)
    dm.set_trainable("b", False)
    dm.activate("a")
    ya = out(dm, x)
    for block in (dt.Stack("a", "b"), dt.Parallel("a", "b"), dt.Average("a", "b"), dt.Fuse("a", "b"),
                  dt.Split("a", "b", splits=2), dt.Split("a", "b", splits=100)):
        dm.activate(block)
        if isinstance(block, dt.Split) and kind == "bert" and method == "lora":  # all-linear: the pooler too
            with pytest.raises(ValueError, match="BertPooler|sequence dimension"):
                out(dm, x)
            continue
        y = out(dm, x)
        assert y.shape == ya.shape and torch.isfinite(y).all(), block
    if not (kind == "bert" and method == "lora"):
        close(y, ya, atol=1e-5, rtol=0)  # splits=100: only a
    dm.activate(dt.Fuse("a", "b"))
    dm.train()
    dm(**x).logits.square().mean().backward()
    grads = {n for n, p in dm.named_parameters() if p.grad is not None}
    assert grads and all(".deltas.ab." in n for n in grads)
