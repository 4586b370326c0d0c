"""The conformance checklist (CONFORMANCE.md), run for every method case of ``method_cases.py``.

One test per checklist item, parametrised over (case x model kind). Adding a method means adding cases,
never editing this file. Known library bugs are listed in ``KNOWN_BUGS`` and run as strict xfails, so the
fix turns them into failures that ask for the entry to be removed.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import deltatune as dt
from conftest import KINDS
from method_cases import CASES, Case

HALF = (torch.float16, torch.bfloat16)

TIED = ("lora-embedding", "gpt2")  # LoRA on GPT-2's wte, which is the same Parameter as lm_head.weight
# (test function, case id or "*", model kind or "*") -> why it fails today
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}


def merge_ok(case: Case, kind: str) -> bool:
    """Mergeable, and not on a tied weight (merging there is refused; see test_merge_refuses_tied_weights)."""
    return case.mergeable and (case.id, kind) != TIED


def over_cases(select=lambda case, kind: True):
    """Parametrise a test over every (case, model kind) pair that ``select`` keeps."""

    def deco(fn):
        params = []
        for case in CASES:
            for kind in case.models:
                if not select(case, kind):
                    continue
                reason = next((r for (t, c, k), r in KNOWN_BUGS.items()
                               if t == fn.__name__ and c in (case.id, "*") and k in (kind, "*")), None)
                marks = [pytest.mark.xfail(reason=f"BUG: {reason}", strict=True)] if reason else []
                params.append(pytest.param(case, kind, id=f"{case.id}-{kind}", marks=marks))
        return pytest.mark.parametrize("case,kind", params)(fn)

    return deco


# -- helpers ---------------------------------------------------------------------------------------
def with_fields(cfg: dt.DeltaConfig, **kw) -> dt.DeltaConfig:
    """A validated copy of ``cfg`` with some fields replaced."""
    return type(cfg).model_validate({**cfg.model_dump(), **kw})


def jitter(dm: dt.DeltaModel, name: str, seed: int, scale: float = 0.1, copies_only: bool = False) -> None:
    """Perturb an adapter's parameters: a non-identity delta for methods without a random init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dm.deltas(name).values():
            if copies_only and not d.replaces_base:
                continue
            for p in d.parameters():
                p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def random_config(case: Case) -> dt.DeltaConfig:
    return (case.make_random or case.make_config)()


def second_config(case: Case) -> dt.DeltaConfig:
    """A second adapter of the same method; it saves no module in full, so it can be active with the first."""
    cfg = random_config(case)
    return with_fields(cfg, modules_to_save=None) if cfg.modules_to_save else cfg


def add_random(dm: dt.DeltaModel, case: Case, name: str, seed: int, cfg: dt.DeltaConfig | None = None) -> None:
    """Add a non-identity adapter; the model stays in eval mode.

    ``eval()`` works around the bug pinned by ``test_adding_an_adapter_keeps_the_model_mode``: a new
    DeltaModel and every new delta start in training mode (dropout active) even on an eval-mode model.
    """
    torch.manual_seed(seed)
    dm.add(cfg or random_config(case), name)
    jitter(dm, name, seed, scale=case.jitter_scale, copies_only=case.make_random is not None)
    dm.eval()


def adapted(zoo, case: Case, kind: str, dtype: torch.dtype = torch.float32, name: str = "a", seed: int = 1):
    """(base output, DeltaModel with one non-identity adapter ``name``, inputs)."""
    model = zoo.build(kind, dtype)
    x = zoo.inputs(kind, dtype=dtype)
    y0 = zoo.output(model, x)
    dm = dt.DeltaModel(model)
    add_random(dm, case, name, seed)
    return y0, dm, x


def bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]
    assert not diff, f"changed: {diff[:5]}"


def state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Snapshot:
    state: dict[str, Tensor]
    tree: str
    requires_grad: dict[str, bool]
    configs: dict | None
    active: list[str] | None
    merged: dict[str, list[str]]


def snapshot(m: nn.Module) -> Snapshot:
    dm = dt.owner_of(m)
    return Snapshot(
        state(m), repr(m), {n: p.requires_grad for n, p in m.named_parameters()},
        {n: c.to_dict() for n, c in dm.configs.items()} if dm else None,
        dm.active if dm else None,
        {p: list(s.merged) for p, s in dm.sites()} if dm else {},
    )


def assert_unchanged(before: Snapshot, m: nn.Module) -> None:
    after = snapshot(m)
    assert_bitwise_equal(before.state, after.state)
    assert after.tree == before.tree
    assert after.requires_grad == before.requires_grad
    assert (after.configs, after.active, after.merged) == (before.configs, before.active, before.merged)


def real(case: Case, kind: str, y: Tensor) -> Tensor:
    """The output at the input's own positions (prompt tuning's causal LM logits also cover its virtual tokens)."""
    return y[:, case.extra_positions:] if case.extra_positions and KINDS[kind].generative else y


def close(a: Tensor, b: Tensor, atol: float) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def base_weights(dm: dt.DeltaModel) -> dict[str, Tensor]:
    return {k: v for k, v in state(dm).items() if ".deltas." not in k}


def sites_of(m: nn.Module) -> list[str]:
    return [n for n, s in m.named_modules() if isinstance(s, dt.Site)]


def train_steps(dm: dt.DeltaModel, x: dict[str, Tensor], steps: int = 3) -> None:
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    dm.train()
    for _ in range(steps):
        opt.zero_grad()
        out = dm(**x)
        (out.logits if hasattr(out, "logits") else out).float().square().mean().backward()
        opt.step()
    dm.eval()


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- 1, 2: identity at init, a non-identity adapter changes the output ------------------------------
@over_cases(lambda case, kind: case.identity)
def test_default_init_is_identity(zoo, case, kind):
    model = zoo.build(kind)
    x = zoo.inputs(kind)
    y0 = zoo.output(model, x)
    dm = dt.attach(model, case.make_config(), "a")
    assert sites_of(model)
    close(zoo.output(dm, x), y0, atol=1e-6)


@over_cases()
def test_non_identity_adapter_changes_output(zoo, case, kind):
    y0, dm, x = adapted(zoo, case, kind)
    assert (real(case, kind, zoo.output(dm, x)) - y0).abs().max() > 1e-4


# -- 3: only delta parameters train ----------------------------------------------------------------
@over_cases()
def test_only_delta_parameters_train(zoo, case, kind):
    model = zoo.build(kind)
    base_params = dict(model.named_parameters())
    x = zoo.inputs(kind)
    dm = dt.attach(model, case.make_config(), "a")
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.a." in n for n in trainable)
    before = state(dm)

    dm.train()
    out = dm(**x)
    (out.logits if hasattr(out, "logits") else out).float().square().mean().backward()
    assert [n for n, p in base_params.items() if p.grad is not None] == []
    assert [n for n, p in dm.named_parameters() if p.requires_grad and p.grad is None] == []
    dm.zero_grad(set_to_none=True)
    train_steps(dm, x)

    after = state(dm)
    changed = {k for k in after if not torch.equal(bits(after[k]), bits(before[k]))}
    assert changed == trainable


# -- 4: counts -------------------------------------------------------------------------------------
def expected_counts(case: Case, modules: dict[str, nn.Module], dm: dt.DeltaModel, name: str) -> tuple[int, int]:
    """(trainable, added) parameters of adapter ``name``, from its config and the base modules' shapes."""
    cfg = dm.configs[name]
    saved = {n for n in modules if n and any(n == s or n.endswith("." + s) for s in cfg.modules_to_save or [])}
    adapted_paths = set(dm.deltas(name)) - saved
    assert adapted_paths
    counts = [case.count(modules[p], p, cfg) for p in adapted_paths]
    copies = sum(p.numel() for s in saved for p in modules[s].parameters())
    return sum(c[0] for c in counts) + copies, sum(c[1] for c in counts) + copies


@over_cases()
def test_parameter_counts_are_exact(zoo, case, kind):
    model = zoo.build(kind)
    modules = dict(model.named_modules())
    base_total = sum(p.numel() for p in model.parameters())
    dm = dt.attach(model, case.make_config(), "a")
    trainable, added = expected_counts(case, modules, dm, "a")
    want = (trainable, base_total + added)
    assert dm.num_parameters() == want
    dm.set_trainable("a", False)
    assert dm.num_parameters() == (0, want[1])


# -- the model's train/eval mode ----------------------------------------------------------------------
@over_cases(lambda case, kind: kind == case.models[0])
def test_adding_an_adapter_keeps_the_model_mode(zoo, case, kind):
    model = zoo.build(kind)  # eval mode
    dm = dt.attach(model, random_config(case), "a")
    assert [n for n, m in dm.named_modules() if m.training] == []
    x = zoo.inputs(kind)
    assert torch.equal(zoo.output(dm, x), zoo.output(dm, x))
    dm.train()
    torch.manual_seed(0)
    dm.add(second_config(case), "b")
    assert [n for n, m in dm.named_modules() if not m.training] == []


# -- 5: disable ------------------------------------------------------------------------------------
@over_cases(merge_ok)
def test_disabled_gives_the_base_output_and_restores(zoo, case, kind):
    y0, dm, x = adapted(zoo, case, kind)
    ya = zoo.output(dm, x)
    with dm.disabled():
        assert torch.equal(zoo.output(dm, x), y0)
    assert torch.equal(zoo.output(dm, x), ya)
    if not case.mergeable:
        return
    dm.merge()
    with dm.disabled():
        close(zoo.output(dm, x), y0, atol=case.atol)
    close(zoo.output(dm, x), ya, atol=case.atol)
    assert any(s.merged for _, s in dm.sites())


# -- 6: merge --------------------------------------------------------------------------------------
@over_cases(merge_ok)
def test_merged_equals_unmerged_and_unmerge_restores_base(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    ya = zoo.output(dm, x)
    w0 = base_weights(dm)
    dm.merge()
    assert any(k not in w0 or not torch.equal(v, w0[k]) for k, v in base_weights(dm).items())
    close(zoo.output(dm, x), ya, atol=case.atol)
    dm.unmerge()
    assert not any(s.merged for _, s in dm.sites())
    for k, v in base_weights(dm).items():
        close(v, w0[k], atol=1e-6)
    close(zoo.output(dm, x), ya, atol=case.atol)


@over_cases(merge_ok)
def test_merging_twice_warns_and_is_a_no_op(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    dm.merge()
    before = snapshot(dm)
    with pytest.warns(UserWarning, match="already merged"):
        dm.merge()
    assert_unchanged(before, dm)


# -- 8: safe merge ---------------------------------------------------------------------------------
@over_cases(merge_ok)
def test_non_finite_delta_makes_merge_raise_and_changes_nothing(zoo, case, kind):
    for bad in (float("nan"), float("inf")):
        _, dm, x = adapted(zoo, case, kind)
        last = [d for d in dm.deltas("a").values() if not d.replaces_base][-1]
        with torch.no_grad():
            next(p for p in last.parameters()).view(-1)[0] = bad
        before = snapshot(dm)
        with pytest.raises(dt.MergeError):
            dm.merge()
        assert_unchanged(before, dm)


# -- 7: merge_and_unload ---------------------------------------------------------------------------
@over_cases(merge_ok)
def test_merge_and_unload_returns_the_plain_model(zoo, case, kind, tmp_path):
    model = zoo.build(kind)
    classes = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    x = zoo.inputs(kind)
    dm = dt.DeltaModel(model)
    add_random(dm, case, "a", seed=1)
    ya = zoo.output(dm, x)
    plain = dm.merge_and_unload()
    assert plain is model
    assert not any(isinstance(m, dt.Site) for m in plain.modules())
    assert {n: type(m) for n, m in plain.named_modules()} == classes
    added = [k for k in plain.state_dict() if k not in keys]
    assert [k for k in plain.state_dict() if k in keys] == keys and (not added or case.merge_adds_params), added
    assert all(p.requires_grad for p in plain.parameters())
    close(zoo.output(plain, x), ya, atol=case.atol)
    # the result saves and reloads with the base library (unless merging created parameters its config lacks)
    if added:
        return
    if zoo.kind(kind).hf:
        plain.save_pretrained(tmp_path)
        again = type(plain).from_pretrained(tmp_path).eval()
    else:
        torch.save(plain.state_dict(), tmp_path / "model.pt")
        again = zoo.build(kind)
        again.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(zoo.output(again, x), zoo.output(plain, x))


# -- 15: unload ------------------------------------------------------------------------------------
@over_cases()
def test_unload_returns_the_base_model(zoo, case, kind):
    for merge in (False, True) if merge_ok(case, kind) else (False,):
        model = zoo.build(kind)
        keys = list(model.state_dict())
        y0, dm, x = adapted(zoo, case, kind)
        if merge:
            dm.merge()
        plain = dm.unload()
        assert not sites_of(plain) and dt.owner_of(plain) is None
        assert list(plain.state_dict()) == keys
        assert all(p.requires_grad for p in plain.parameters())
        if merge:
            close(zoo.output(plain, x), y0, atol=1e-5)
        else:
            assert torch.equal(zoo.output(plain, x), y0)


# -- 10, 11: save/load roundtrip, loaded adapters frozen ---------------------------------------------
@over_cases()
def test_save_load_roundtrip_on_a_fresh_base(zoo, case, kind, tmp_path):
    _, dm, x = adapted(zoo, case, kind, name="default")
    ya = zoo.output(dm, x)
    dm.save(tmp_path)
    assert list_files(tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = dm.adapter_state("default")

    for seed, trainable in ((1234, False), (99, True)):
        torch.manual_seed(seed)
        fresh = zoo.build(kind)
        modules = dict(fresh.named_modules())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dm2 = dt.load_adapter(fresh, tmp_path, name="other", trainable=trainable).eval()  # see add_random
        assert list(dm2.configs) == ["other"]
        loaded = dm2.adapter_state("other")
        assert list(loaded) == list(saved)
        for path in saved:
            assert_bitwise_equal(loaded[path], saved[path])
        close(zoo.output(dm2, x), ya, atol=case.load_atol)
        flags = [p.requires_grad for d in dm2.deltas("other").values() for p in d.parameters()]
        if trainable:  # as its saved config says (PiSSA saves as a rank-2r LoRA, all of it trainable)
            assert dm2.num_parameters()[0] == expected_counts(case, modules, dm2, "other")[0] > 0
        else:
            assert not any(flags) and dm2.num_parameters()[0] == 0


@over_cases(lambda case, kind: kind == case.models[0])
def test_unknown_config_keys_are_tolerated_with_a_warning(zoo, case, kind, tmp_path):
    _, dm, x = adapted(zoo, case, kind, name="default")
    dm.save(tmp_path)
    file = tmp_path / "adapter_config.json"
    data = json.loads(file.read_text())
    data["deltatune"]["config"]["from_the_future"] = 1
    file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="from_the_future"):
        dm2 = dt.load_adapter(zoo.build(kind), tmp_path).eval()
    close(zoo.output(dm2, x), zoo.output(dm, x), atol=case.load_atol)


# -- 12: several adapters --------------------------------------------------------------------------
@over_cases()
def test_second_adapter_changes_output_and_switching_back_is_exact(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    ya = zoo.output(dm, x)
    add_random(dm, case, "b", seed=2, cfg=second_config(case))
    assert dm.active == ["a"] and torch.equal(zoo.output(dm, x), ya)
    dm.activate("b")
    assert (zoo.output(dm, x) - ya).abs().max() > 1e-4
    dm.activate("a")
    assert torch.equal(zoo.output(dm, x), ya)


def site_inputs(dm: dt.DeltaModel, x: dict[str, Tensor]) -> dict[str, tuple[tuple, dict]]:
    """What each site receives on one forward."""
    seen: dict[str, tuple[tuple, dict]] = {}
    hooks = [s.register_forward_pre_hook(lambda m, a, k, p=p: seen.setdefault(p, (a, k)), with_kwargs=True)
             for p, s in dm.sites()]
    dm(**x)
    for h in hooks:
        h.remove()
    return seen


@over_cases()
def test_two_active_adapters_add_their_effects(zoo, case, kind):
    if not case.several_active:
        _, dm, x = adapted(zoo, case, kind)
        add_random(dm, case, "b", seed=2, cfg=second_config(case))
        with pytest.raises(ValueError, match="only one"):
            dm.activate(["a", "b"])
        assert dm.active == ["a"]
        return
    if not case.additive:
        pytest.skip(f"{case.id} is not additive: its deltas do not add (e.g. DoRA renormalises the weight)")
    _, dm, x = adapted(zoo, case, kind)
    add_random(dm, case, "b", seed=2, cfg=second_config(case))
    dm.activate(["a", "b"])
    inputs = site_inputs(dm, x)
    sites = dict(dm.sites())
    assert set(inputs) == set(sites)

    def site_out(active):
        out = {}
        with torch.no_grad():
            for p, (args, kwargs) in inputs.items():
                if active is None:
                    with dm.disabled():
                        out[p] = sites[p](*args, **kwargs)
                else:
                    dm.activate(active)
                    out[p] = sites[p](*args, **kwargs)
        return out

    y0, ya, yb, yab = site_out(None), site_out("a"), site_out("b"), site_out(["a", "b"])
    for p in inputs:
        close(yab[p] - y0[p], (ya[p] - y0[p]) + (yb[p] - y0[p]), atol=1e-5)
    y_two = zoo.output(dm, x)
    dm.activate("a")
    assert (zoo.output(dm, x) - y_two).abs().max() > 1e-4


@over_cases(merge_ok)
def test_merge_and_unmerge_with_two_active(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    add_random(dm, case, "b", seed=2, cfg=second_config(case))
    dm.activate(["a", "b"])
    yab = zoo.output(dm, x)
    w0 = base_weights(dm)
    if not case.additive:  # DoRA renormalises the whole weight: merging two at one module is refused
        with pytest.raises(dt.MergeError, match="non-additive"):
            dm.merge()
        for k, v in base_weights(dm).items():
            assert torch.equal(v, w0[k])
        return
    dm.merge()
    assert {n for _, s in dm.sites() for n in s.merged} == {"a", "b"}
    close(zoo.output(dm, x), yab, atol=case.atol)
    dm.unmerge()
    for k, v in base_weights(dm).items():
        close(v, w0[k], atol=1e-6)
    close(zoo.output(dm, x), yab, atol=case.atol)


# -- 14: delete ------------------------------------------------------------------------------------
@over_cases()
def test_delete_removes_every_trace(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    ya = zoo.output(dm, x)
    before = snapshot(dm)
    add_random(dm, case, "b", seed=2, cfg=second_config(case))
    if case.several_active:
        dm.activate(["a", "b"])
    dm.activate("a")
    dm.delete("b")
    assert not any(".deltas.b." in k for k in state(dm))
    assert not any("b" in s.deltas for _, s in dm.sites())
    assert_unchanged(before, dm)
    assert torch.equal(zoo.output(dm, x), ya)
    with pytest.raises(KeyError):
        dm.activate("b")


@over_cases()
def test_deleting_the_last_adapter_leaves_the_base(zoo, case, kind):
    model = zoo.build(kind)
    keys = list(model.state_dict())
    y0, dm, x = adapted(zoo, case, kind)
    dm.delete("a")
    assert not sites_of(dm.model) and dm.configs == {} and dm.active == []
    assert list(dm.model.state_dict()) == keys
    assert all(p.requires_grad for p in dm.model.parameters())
    assert torch.equal(zoo.output(dm, x), y0)
    assert torch.equal(zoo.output(dm.model, x), y0)
    add_random(dm, case, "c", seed=3)  # and the emptied DeltaModel takes adapters again
    assert dm.active == ["c"] and (real(case, kind, zoo.output(dm, x)) - y0).abs().max() > 1e-4


@over_cases()
def test_deleting_an_unknown_or_merged_adapter_raises_and_changes_nothing(zoo, case, kind):
    _, dm, x = adapted(zoo, case, kind)
    before = snapshot(dm)
    with pytest.raises(KeyError):
        dm.delete("nope")
    assert_unchanged(before, dm)
    if merge_ok(case, kind):
        dm.merge()
        before = snapshot(dm)
        with pytest.raises(RuntimeError, match="merged"):
            dm.delete("a")
        assert_unchanged(before, dm)


# -- 16: atomic failures ---------------------------------------------------------------------------
@over_cases()
def test_adding_a_duplicate_name_fails_and_changes_nothing(zoo, case, kind, tmp_path):
    _, dm, x = adapted(zoo, case, kind)
    dm.save(tmp_path)
    before = snapshot(dm)
    with pytest.raises(ValueError, match="already exists"):
        dm.add(case.make_config(), "a")
    with pytest.raises(ValueError, match="already exists"):
        dt.attach(dm.model, case.make_config(), "a")
    with pytest.raises(ValueError, match="already exists"):
        dm.load(tmp_path / "a", "a")
    for reserved in ("eval", "train", "forward"):  # attributes of the ModuleDict the deltas live in
        with pytest.raises(ValueError, match="reserved"):
            dm.load(tmp_path / "a", reserved)
    assert_unchanged(before, dm)


@over_cases()
def test_add_selecting_nothing_raises_and_changes_nothing(zoo, case, kind):
    bad = with_fields(case.make_config(), targets=["no_such_module"])
    model = zoo.build(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no_such_module"):
        dt.attach(model, bad, "a")
    assert_unchanged(before, model)
    assert dt.owner_of(model) is None

    _, dm, x = adapted(zoo, case, kind)
    before = snapshot(dm)
    with pytest.raises(ValueError, match="no_such_module"):
        dm.add(bad, "b")
    assert_unchanged(before, dm)


@over_cases(lambda case, kind: case.shape_checked)
def test_failed_load_into_wrong_shapes_changes_nothing(zoo, case, kind, tmp_path, monkeypatch):
    _, dm, x = adapted(zoo, case, kind, name="default")
    dm.save(tmp_path)
    wide = zoo.build(kind, wide=True)
    dmw = dt.DeltaModel(wide)
    add_random(dmw, case, "x", seed=3)
    y = zoo.output(dmw, zoo.inputs(kind))
    before = snapshot(dmw)

    def no_reading(*a, **k):
        raise AssertionError("tensor data read before the shapes were checked against the config")

    # the config is compared with the model, and the file header's shapes with the config's on this model, before
    # any tensor is read
    monkeypatch.setattr(dt.io.adapter, "load_file", no_reading)
    with pytest.raises(dt.AdapterFileError, match=r"tensor \S+ has shape \(.*\), but adapter_config.json|"
                                                  r"does not fit this model: .*token_dim"):
        dmw.load(tmp_path, "y")
    assert_unchanged(before, dmw)
    assert torch.equal(zoo.output(dmw, zoo.inputs(kind)), y)


# -- 18: modules_to_save ---------------------------------------------------------------------------
@over_cases(lambda case, kind: kind == "bert")
def test_modules_to_save_are_trained_copies_per_adapter(zoo, case, kind, tmp_path):
    model = zoo.build(kind)
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    x = zoo.inputs(kind)
    dm = dt.DeltaModel(model)
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        dm.add(with_fields(case.make_config(), modules_to_save=["classifier"]), name)
        dm.activate(name)
        train_steps(dm, x, steps=2)
    with pytest.raises(ValueError, match="classifier"):
        dm.activate(["a", "b"])
    copies = {n: dm.deltas(n)["classifier"].module.state_dict() for n in ("a", "b")}
    assert_bitwise_equal(dict(dm.model.classifier.base.state_dict()), head)
    for k in head:
        assert not torch.equal(copies["a"][k], head[k])
        assert not torch.equal(copies["a"][k], copies["b"][k])

    outs = {}
    for n in ("a", "b"):
        dm.activate(n)
        outs[n] = zoo.output(dm, x)
    dm.save(tmp_path)
    fresh = zoo.build(kind)
    for n, folder in (("a", tmp_path / "a"), ("b", tmp_path / "b")):
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for k in head:
            assert torch.equal(tensors[f"{case.file_prefix}classifier.{k}"], copies[n][k])
        assert not any("modules_to_save" in k or ".module." in k for k in tensors)
        dm2 = dt.load_adapter(fresh, folder, name=n).eval()
        dm2.activate(n)
        assert torch.equal(zoo.output(dm2, x), outs[n])


# -- 9: half precision -----------------------------------------------------------------------------
def delta_dtypes(dm: dt.DeltaModel, name: str) -> set[torch.dtype]:
    return {p.dtype for d in dm.deltas(name).values() if not d.replaces_base for p in d.parameters()}


@pytest.mark.parametrize("dtype", HALF, ids=str)
@over_cases()
def test_half_precision_bases(zoo, case, kind, dtype, tmp_path):
    _, dm, x = adapted(zoo, case, kind, dtype=dtype)
    add_random(dm, case, "b", seed=2, cfg=with_fields(second_config(case), adapter_dtype="base"))
    assert delta_dtypes(dm, "a") == {torch.float32}
    assert delta_dtypes(dm, "b") == {dtype}
    outs = {}
    for name in ("b", "a"):
        dm.activate(name)
        outs[name] = zoo.output(dm, x)
        assert outs[name].dtype == dtype and torch.isfinite(outs[name]).all()

    dm.save(tmp_path)
    for name, want in (("a", torch.float32), ("b", dtype)):
        dm2 = dt.load_adapter(zoo.build(kind, dtype), tmp_path / name, name=name).eval()
        assert delta_dtypes(dm2, name) == {want}
        # exact where float32 roundtrips are exact; else the conversion's rounding, in half precision
        close(zoo.output(dm2, x).float(), outs[name].float(), atol=case.load_atol and 1e-2)

    if merge_ok(case, kind):
        w0 = base_weights(dm)
        dm.merge()
        ym = zoo.output(dm, x)
        assert torch.isfinite(ym).all()
        close(ym.float(), outs["a"].float(), atol=case.half_atol)
        dm.unmerge()
        for k, v in base_weights(dm).items():
            assert torch.isfinite(v).all() if v.is_floating_point() else True
            close(v.float(), w0[k].float(), atol=1e-2)


# -- 13: per-row routing ---------------------------------------------------------------------------
ROWS = ["a", None, "b"]


def routed(zoo, case, kind):
    y0, dm, x = adapted(zoo, case, kind)
    add_random(dm, case, "b", seed=2, cfg=second_config(case))
    return y0, dm, x


@over_cases()
def test_per_row_adapters_equal_running_each_alone(zoo, case, kind):
    y0, dm, x = routed(zoo, case, kind)
    ya = zoo.output(dm, x)
    if not case.routable:
        with pytest.raises(ValueError, match="cannot be routed per row"):
            zoo.output(dm, x, adapters=ROWS)
        assert torch.equal(zoo.output(dm, x), ya)
        return
    y = zoo.output(dm, x, adapters=ROWS)
    for i, name in enumerate(ROWS):
        if name is None:
            want = y0
        else:
            dm.activate(name)
            want = zoo.output(dm, x)
        close(y[i], want[i], atol=1e-5)
    dm.activate("a")
    assert torch.equal(zoo.output(dm, x), ya)


@over_cases(lambda case, kind: kind in ("llama", "gpt2"))
def test_per_row_adapters_in_generate(zoo, case, kind):
    _, dm, x = routed(zoo, case, kind)
    ids = x["input_ids"]
    if not case.routable:
        with pytest.raises(ValueError, match="cannot be routed per row"):
            dm.generate(ids, adapters=ROWS, max_new_tokens=5, do_sample=False)
        return
    out = dm.generate(ids, adapters=ROWS, max_new_tokens=5, do_sample=False)
    assert out.shape == (3, ids.shape[1] + 5)
    with dm.disabled():
        assert kind in case.weak_generation or not torch.equal(out, dm.generate(ids, max_new_tokens=5, do_sample=False))
    for i, name in enumerate(ROWS):
        if name is None:
            with dm.disabled():
                want = dm.generate(ids[i:i + 1], max_new_tokens=5, do_sample=False)
        else:
            dm.activate(name)
            want = dm.generate(ids[i:i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(out[i:i + 1], want), f"row {i} ({name})"


@over_cases()
def test_per_row_routing_errors(zoo, case, kind):
    _, dm, x = routed(zoo, case, kind)
    ya = zoo.output(dm, x)
    with pytest.raises(KeyError, match="nope"):
        zoo.output(dm, x, adapters=["a", "nope", None])
    with pytest.raises(ValueError, match="rows" if case.routable else "cannot be routed per row"):
        zoo.output(dm, x, adapters=["a", "b"])
    dm.train()
    with pytest.raises(RuntimeError, match="eval"):
        zoo.output(dm, x, adapters=ROWS)
    dm.eval()
    assert torch.equal(zoo.output(dm, x), ya)
    if merge_ok(case, kind):
        dm.merge()
        with pytest.raises(RuntimeError, match="merged"):
            zoo.output(dm, x, adapters=ROWS)
        dm.unmerge()
    close(zoo.output(dm, x), ya, atol=case.atol)


# -- regressions found by this suite, outside the case matrix -----------------------------------------
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_a_circular_padded_conv_merges_to_the_same_function(use_dora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")).eval()
    x = torch.randn(2, 3, 6, 6)
    dm = dt.attach(model, dt.LoRAConfig(r=2, init="random", use_dora=use_dora, targets=["0"])).eval()
    y = forward_no_grad(dm, x)
    dm.merge()
    close(forward_no_grad(dm, x), y, atol=1e-5)


def test_merge_refuses_tied_weights(zoo):
    case = next(c for c in CASES if c.id == TIED[0])
    _, dm, x = adapted(zoo, case, TIED[1])
    w0 = base_weights(dm)
    with pytest.raises(dt.MergeError, match="tied"):
        dm.merge()
    for k, v in base_weights(dm).items():
        assert torch.equal(v, w0[k])


def forward_no_grad(m: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return m(x)
