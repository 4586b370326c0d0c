"""AdaLoRA and DyLoRA: equations, AdaLoRA's budget schedule and masking (own loop, the Trainer, against
PEFT's allocator), PEFT interop both ways, DyLoRA's nested ranks and truncation, bad input."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune as dt
from conftest import build_gpt2, build_llama, build_mlp
from deltatune.methods.adalora import (
    AdaLoRA,
    AdaLoRAConfig,
    RankAllocator,
    cubic_budget,
    orthogonal_regularizer,
)
from deltatune.methods.dylora import (
    DyLoRA,
    DyLoRAConfig,
    DyLoRASampler,
    set_eval_rank,
    set_train_rank,
    truncate,
)
from deltatune.train.trainer import Callback, TrainConfig, Trainer

ATOL = 1e-5
ATTN = ["q_proj", "v_proj"]


def seeded(build, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build(**kw).eval()


def ids(rows: int = 2, cols: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 64, (rows, cols), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids() if x is None else x).logits


def assert_same(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor | None = None) -> None:
    if base is not None:
        assert (want - base).abs().max() > 1e-3, "the adapter does not change the output: the comparison proves nothing"
    assert (got - want).abs().max() <= ATOL, f"max abs diff {(got - want).abs().max():.3g}"


def peft_load(base: nn.Module, folder) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(folder)).eval()


# ==================================================================================================
# AdaLoRA
# ==================================================================================================
def test_adalora_forward_is_the_svd_form_equation():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    conv = nn.Conv2d(3, 4, (3, 2), padding=1, padding_mode="circular")
    x = torch.randn(2, 6)
    img = torch.randn(2, 3, 5, 5)
    for base, inp in ((lin, x), (conv, img)):
        d = AdaLoRA(base, init_r=3, alpha=6.0, init="random")
        s = 6.0 / (3 + 1e-5)
        dw = s * d.lora_B @ torch.diag(d.lora_E.view(-1)) @ d.lora_A  # P diag(lambda) Q
        with torch.no_grad():
            if base is lin:
                want = torch.nn.functional.linear(x, lin.weight + dw, lin.bias)
            else:
                want = conv._conv_forward(img, conv.weight + dw.view(conv.weight.shape), conv.bias)
            torch.testing.assert_close(d(inp, base(inp), base), want, atol=1e-6, rtol=0)
            torch.testing.assert_close(d.delta_weight(base), dw.view(base.weight.shape), atol=1e-7, rtol=0)
    # GPT-2 Conv1D: weight (in, out), the delta is transposed for merging
    gpt2 = seeded(build_gpt2)
    c_attn = gpt2.transformer.h[0].attn.c_attn
    d = AdaLoRA(c_attn, init_r=2, alpha=4.0, init="random")
    assert d.lora_A.shape == (2, 32) and d.lora_B.shape == (96, 2)
    h = torch.randn(1, 3, 32)
    with torch.no_grad():
        want = h @ (c_attn.weight + d.delta_weight(c_attn)) + c_attn.bias
        torch.testing.assert_close(d(h, c_attn(h), c_attn), want, atol=1e-6, rtol=0)


def test_adalora_starts_as_identity_with_zero_lambda():
    model = seeded(build_llama)
    y0 = logits(model)
    dm = dt.attach(model, AdaLoRAConfig(init_r=4, target_r=2))
    for d in dm.deltas("default").values():
        assert torch.equal(d.lora_E, torch.zeros_like(d.lora_E))
        assert d.lora_A.std() < 0.05 and d.lora_B.std() < 0.05  # PEFT's N(0, 0.02)
    assert torch.equal(logits(dm), y0)


def test_budget_schedule_is_the_papers_cubic_formula():
    b0, bt, ti, tf, total = 96, 32, 10, 20, 130

    def paper(t: int) -> float:  # Zhang et al. 2023, eq. (10)
        if t <= ti:
            return b0
        if t > total - tf:
            return bt
        return bt + (b0 - bt) * (1 - (t - ti) / (total - ti - tf)) ** 3

    got = [cubic_budget(t, b0, bt, ti, tf, total) for t in range(1, total + 1)]
    assert got == [int(paper(t)) for t in range(1, total + 1)]
    assert got[ti - 1] == b0 and got[total - tf - 1] == bt and got[-1] == bt
    assert all(a >= b for a, b in zip(got, got[1:]))  # never grows
    # the allocator uses it with b0 = init_r x modules, bT = target_r x modules
    dm = dt.attach(seeded(build_llama), AdaLoRAConfig(init_r=6, target_r=2, targets=ATTN, tinit=3, tfinal=4,
                                                      total_step=20))
    alloc = RankAllocator(dm, "default")
    assert (alloc.init_bgt, alloc.target_bgt) == (24, 8)
    assert [alloc.budget(t) for t in range(1, 21)] == [cubic_budget(t, 24, 8, 3, 4, 20) for t in range(1, 21)]


def test_orthogonal_regularizer_matches_a_direct_computation():
    dm = dt.attach(seeded(build_mlp), AdaLoRAConfig(init_r=3, target_r=1, init="random"))
    deltas = list(dm.deltas("default").values())
    sq, norms = 0.0, []
    for d in deltas:
        p, q = d.lora_B.detach(), d.lora_A.detach()
        a = ((p.T @ p - torch.eye(3)) ** 2).sum()
        b = ((q @ q.T - torch.eye(3)) ** 2).sum()
        sq += a + b
        norms += [b.sqrt(), a.sqrt()]
    torch.testing.assert_close(orthogonal_regularizer(deltas, "paper"), sq)
    torch.testing.assert_close(orthogonal_regularizer(deltas, "peft"), sum(norms) / len(norms))
    alloc = RankAllocator(dm, "default", total_step=10)  # the default form is the authors' code / PEFT's
    torch.testing.assert_close(alloc.regularizer(), 0.5 * sum(norms) / len(norms))
    paper = dt.attach(seeded(build_mlp), AdaLoRAConfig(init_r=3, target_r=1, init="random", orth_reg_form="paper"))
    torch.testing.assert_close(RankAllocator(paper, "default", total_step=10).regularizer(), 0.5 * sq)
    # it has gradients toward orthogonality
    r = orthogonal_regularizer(deltas)
    r.backward()
    assert all(d.lora_A.grad is not None and d.lora_A.grad.abs().sum() > 0 for d in deltas)


def _own_loop(dm, alloc, steps: int, seed: int = 0, record=None):
    torch.manual_seed(seed)
    params = [p for p in dm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    dm.train()
    x = ids(4, 8)
    for step in range(1, steps + 1):
        loss = dm(input_ids=x, labels=x).loss + alloc.regularizer()
        loss.backward()
        opt.step()
        budget = alloc.update_and_allocate(step)
        opt.zero_grad()
        if record is not None:
            record.append((step, budget, sum(alloc.nonzero_ranks().values())))
    dm.eval()


def test_masking_reduces_nonzero_lambdas_to_the_target_budget():
    cfg = AdaLoRAConfig(init_r=6, target_r=2, targets=ATTN + ["up_proj"], tinit=2, tfinal=3, total_step=14)
    dm = dt.attach(seeded(build_llama), cfg)
    alloc = RankAllocator(dm, "default")
    rows: list[tuple[int, int, int]] = []
    _own_loop(dm, alloc, 14, record=rows)
    n_modules = 6
    for step, budget, nonzero in rows:
        assert budget == cubic_budget(step, 6 * n_modules, 2 * n_modules, 2, 3, 14)
        if step <= 2:
            assert nonzero == 6 * n_modules  # warm-up: nothing masked
        else:
            assert nonzero <= budget  # every step masks (deltaT = 1)
    assert rows[-1][2] == 2 * n_modules  # the target budget, exactly
    # the final mask (step 11) is fixed: the same triplets at every later step, and it is the saved pattern
    pattern = dm.configs["default"].rank_pattern
    assert sum(sum(v) for v in pattern.values()) == 2 * n_modules
    for path, d in dm.deltas("default").items():
        assert pattern[f"{path}.lora_E"] == (d.lora_E.view(-1) != 0).tolist() == d.keep.tolist()


def test_deltat_masks_only_every_deltat_steps():
    cfg = AdaLoRAConfig(init_r=4, target_r=1, targets=ATTN, tinit=0, tfinal=0, deltaT=3, total_step=10,
                        init="random")
    dm = dt.attach(seeded(build_llama), cfg)
    alloc = RankAllocator(dm, "default")
    rows: list[tuple[int, int, int]] = []
    _own_loop(dm, alloc, 10, record=rows)
    masked_at = [s for (s, b, n), (_, _, prev) in zip(rows[1:], rows) if n < prev]
    assert set(masked_at) <= {3, 6, 9, 10}
    assert rows[-1][2] == 4  # target_r x 4 modules at the end (the final mask at total_step)


def _tiny_data(n: int = 16, length: int = 8):
    class Data:
        lengths = [length] * n

        def __len__(self):
            return n

        def __getitem__(self, i):
            return ids(1, length, seed=100 + i)[0]

    def collate(rows):
        x = torch.stack(rows)
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    return Data(), collate


class _Spy(Callback):
    def __init__(self):
        self.ranks: list[set[int]] = []

    def on_step_end(self, trainer, step, metrics):
        deltas = trainer.dm.deltas(trainer.adapter).values()
        self.ranks.append({d.last_rank for d in deltas if isinstance(d, DyLoRA)})


def test_trainer_run_ends_with_the_target_budget_and_saves_the_rank_pattern(tmp_path):
    data, collate = _tiny_data()
    model = seeded(build_llama)
    fresh = copy.deepcopy(model)
    cfg = AdaLoRAConfig(init_r=4, target_r=2, targets=ATTN, tinit=2, tfinal=2)  # total_step: the run's
    dm = dt.attach(model, cfg)
    trainer = Trainer(dm, data, TrainConfig(steps=12, batch_size=4, lr=2e-2), tmp_path, collate=collate,
                      progress=False)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["adalora_budget"] for r in rows] == [cubic_budget(t, 16, 8, 2, 2, 12) for t in range(1, 13)]
    nonzero = {p: int((d.lora_E != 0).sum()) for p, d in dm.deltas("default").items()}
    assert sum(nonzero.values()) == 8
    # the file: PEFT's fields, the rank pattern, only the kept triplets
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["init_r"], saved["target_r"], saved["total_step"]) == ("ADALORA", 4, 2, 12)
    assert {k: sum(v) for k, v in saved["rank_pattern"].items()} == {f"{p}.lora_E": n for p, n in nonzero.items()}
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for p, n in nonzero.items():
        assert tensors[f"base_model.model.{p}.lora_A"].shape == (n, 32)
        assert tensors[f"base_model.model.{p}.lora_E"].shape == (n, 1)
    assert not any("ranknum" in k for k in tensors)
    # and it reproduces the trained model, in deltatune and in PEFT
    want = logits(dm)
    fresh2 = copy.deepcopy(fresh)
    base_out = logits(fresh)
    assert_same(logits(dt.load_adapter(fresh, tmp_path)), want, base_out)
    assert_same(logits(peft_load(fresh2, tmp_path)), want, base_out)


def test_rank_allocator_matches_peft_step_by_step():
    """Same init, data and optimizer: PEFT's own loop and ours keep the same triplets and weights."""
    total, kw = 12, dict(init_r=4, target_r=2, tinit=2, tfinal=3, total_step=12)
    base = seeded(build_llama)
    fresh = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, AdaLoraConfig(lora_alpha=8, target_modules=ATTN, task_type="CAUSAL_LM", **kw))
    dm = dt.attach(fresh, AdaLoRAConfig(alpha=8, targets=ATTN, orth_reg_form="peft", **kw))
    with torch.no_grad():
        for path, d in dm.deltas("default").items():
            layer = pm.base_model.model.get_submodule(path)
            for n in ("lora_A", "lora_B", "lora_E"):
                getattr(d, n).copy_(getattr(layer, n)["default"])
    alloc = RankAllocator(dm, "default")
    x = ids(4, 8)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (pm, dm)]
    pm.train()
    dm.train()
    for step in range(1, total + 1):
        pm(input_ids=x, labels=x).loss.backward()  # PEFT adds its regulariser inside forward (CAUSAL_LM)
        (dm(input_ids=x, labels=x).loss + alloc.regularizer()).backward()
        for o in opts:
            o.step()
        pm.base_model.update_and_allocate(step)
        alloc.update_and_allocate(step)
        for o in opts:
            o.zero_grad()
    theirs = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert dm.configs["default"].rank_pattern == theirs
    for path, d in dm.deltas("default").items():
        layer = pm.base_model.model.get_submodule(path)
        for n in ("lora_A", "lora_B", "lora_E"):
            torch.testing.assert_close(getattr(d, n), getattr(layer, n)["default"], atol=1e-4, rtol=0)


# -- PEFT interop --------------------------------------------------------------------------------
def _randomise(dm):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for d in dm.deltas("default").values():
            for p in (d.lora_A, d.lora_B, d.lora_E):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p is not d.lora_E else 1.0))


@pytest.mark.parametrize("kind,targets", [("llama", ATTN + ["down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_deltatune_adalora_loads_in_peft_with_same_logits(kind, targets, pruned, tmp_path):
    build = build_llama if kind == "llama" else build_gpt2
    base = seeded(build)
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    dm = dt.attach(base, AdaLoRAConfig(init_r=4, target_r=2, alpha=6.0, targets=targets, total_step=10))
    _randomise(dm)
    if pruned:  # a mask as the allocator leaves it, including a module pruned to rank 0
        alloc = RankAllocator(dm, "default")
        deltas = list(alloc.deltas.values())
        for i, d in enumerate(deltas):
            d.keep.copy_(torch.tensor([[True, False, True, False], [False] * 4, [True, True, True, False]][i % 3]))
        alloc._apply_masks()
        alloc._write_pattern()
    want = logits(dm)
    dm.save(tmp_path)
    pm = peft_load(fresh, tmp_path)
    assert_same(logits(pm), want, base_out)
    if pruned:
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        assert any(sum(v) == 0 for v in saved["rank_pattern"].values())


def _peft_trained(tmp_path, kind="llama", targets=ATTN, steps=8, **kw):
    """A PEFT AdaLoRA trained with its own allocator (non-identity init), saved; (base out, out, fresh base)."""
    build = build_llama if kind == "llama" else build_gpt2
    base = seeded(build)
    fresh = copy.deepcopy(base)
    base_out = logits(base)
    cfg = dict(init_r=4, target_r=2, lora_alpha=8, target_modules=targets, total_step=steps, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, AdaLoraConfig(**{**cfg, **kw}))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        x = ids(4, 8)
        pm.train()
        for step in range(1, steps + 1):
            pm(input_ids=x, labels=x).loss.backward()
            opt.step()
            pm.base_model.update_and_allocate(step)
            opt.zero_grad()
        want = logits(pm)
        pm.save_pretrained(str(tmp_path))
    return base_out, want, fresh


@pytest.mark.parametrize("kind,targets", [("llama", ATTN + ["gate_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_peft_adalora_loads_in_deltatune_with_same_logits(kind, targets, tmp_path):
    base_out, want, fresh = _peft_trained(tmp_path, kind, targets, tinit=1, tfinal=2)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"]  # PEFT wrote the final mask and pruned the tensors
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, base_out)
    cfg = dm.configs["default"]
    assert (cfg.init_r, cfg.target_r, cfg.total_step, cfg.tinit, cfg.tfinal) == (4, 2, 8, 1, 2)
    for path, d in dm.deltas("default").items():
        assert d.rank == sum(saved["rank_pattern"][f"{path}.lora_E"])
        assert d.ranknum == 4.0


def test_peft_adalora_without_rank_pattern_and_with_an_old_ranknum_key(tmp_path):
    base_out, want, fresh = _peft_trained(tmp_path, steps=3, tinit=5, tfinal=0, total_step=20)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["rank_pattern"] is None
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for k in [k for k in tensors if k.endswith(".lora_A")]:  # as PEFT < 0.14 saved it
        tensors[k.replace(".lora_A", ".ranknum")] = torch.tensor([4.0])
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    dm = dt.load_adapter(fresh, tmp_path)
    assert_same(logits(dm), want, base_out)


# -- bad input -----------------------------------------------------------------------------------
def test_adalora_bad_input_errors_name_the_field_or_module():
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(init_r=4, target_r=5)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRAConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ValueError, match="init_r"):
        AdaLoRAConfig(init_r=0)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoRAConfig(beta1=1.0)
    with pytest.raises(ValueError, match="rank_pattern"):
        AdaLoRAConfig(init_r=3, target_r=1, rank_pattern={"q_proj.lora_E": [True, False]})
    with pytest.raises(ValueError, match="lora_E"):
        AdaLoRAConfig(init_r=2, target_r=1, rank_pattern={"q_proj": [True, False]})
    model = seeded(build_llama)
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(model, AdaLoRAConfig(targets=["embed_tokens"]))
    assert dt.owner_of(model) is None
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"0: AdaLoRA on grouped"):
        dt.attach(grouped, AdaLoRAConfig(targets=["0"]))
    dm = dt.attach(model, AdaLoRAConfig(targets=ATTN))
    with pytest.raises(ValueError, match="total_step"):
        RankAllocator(dm, "default")
    dm.add(dt.LoRAConfig(targets=ATTN), "plain")
    with pytest.raises(TypeError, match="not AdaLoRA"):
        RankAllocator(dm, "plain", total_step=5)


# ==================================================================================================
# DyLoRA
# ==================================================================================================
def test_dylora_forward_uses_the_truncated_factors_and_alpha_over_b():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    d = DyLoRA(lin, r=4, r_min=1, alpha=8.0, init="random")
    A, B = d.lora_A.weight, d.lora_B.weight
    with torch.no_grad():
        for b in range(1, 5):
            want = lin(x) + (8.0 / b) * x @ A[:b].T @ B[:, :b].T
            d.eval()
            d.eval_rank = b
            torch.testing.assert_close(d(x, lin(x), lin), want, atol=1e-6, rtol=0)
            d.train()
            d.train_rank = b
            torch.testing.assert_close(d(x, lin(x), lin), want, atol=1e-6, rtol=0)
            assert d.last_rank == b


@pytest.mark.parametrize("update", ["bth", "all"])
def test_dylora_gradients_reach_only_the_bth_component(update):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    d = DyLoRA(lin, r=5, r_min=2, alpha=8.0, update=update, init="random").train()
    x = torch.randn(3, 6)
    for b in (2, 3, 5):
        d.zero_grad()
        d.train_rank = b
        d(x, lin(x), lin).square().sum().backward()
        ga = d.lora_A.weight.grad.abs().sum(dim=1)
        gb = d.lora_B.weight.grad.abs().sum(dim=0)
        assert (ga[b:] == 0).all() and (gb[b:] == 0).all()  # ranks above b are not used
        if update == "all" or b == 2:  # at b = r_min every row up to r_min trains
            assert (ga[:b] > 0).all() and (gb[:b] > 0).all()
        else:
            assert (ga[:b - 1] == 0).all() and (gb[:b - 1] == 0).all()
            assert ga[b - 1] > 0 and gb[b - 1] > 0


def test_dylora_samples_every_rank_in_range_reproducibly():
    lin = nn.Linear(4, 4)
    d = DyLoRA(lin, r=6, r_min=3, alpha=8.0).train()
    x = torch.randn(1, 4)

    def draw():
        torch.manual_seed(7)
        out = []
        for _ in range(200):
            d(x, lin(x), lin)
            out.append(d.last_rank)
        return out

    seen = draw()
    assert set(seen) == {3, 4, 5, 6}
    assert draw() == seen


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_truncate_gives_a_plain_lora_with_the_same_outputs(kind, tmp_path):
    build = build_llama if kind == "llama" else build_gpt2
    model = seeded(build)
    base_out = logits(model)
    dm = dt.attach(model, DyLoRAConfig(r=4, alpha=8.0, init="random"), "dy")
    for rank in range(1, 5):
        set_eval_rank(dm, "dy", rank)
        want = logits(dm)
        cfg, state = truncate(dm, "dy", rank, new_name=f"lora{rank}")
        assert isinstance(cfg, dt.LoRAConfig) and cfg.r == rank and cfg.alpha == 8.0
        dm.activate(f"lora{rank}")
        assert_same(logits(dm), want, base_out)
        dm.activate("dy")
    # the truncated LoRA is a plain LoRA file: it loads in PEFT too
    set_eval_rank(dm, "dy", 2)
    want = logits(dm)
    dm.save(tmp_path, ["lora2"])
    assert_same(logits(peft_load(seeded(build), tmp_path / "lora2")), want, base_out)
    set_eval_rank(dm, "dy", None)
    assert dm.deltas("dy")["model.layers.0.self_attn.q_proj" if kind == "llama" else "transformer.h.0.attn.c_attn"] \
        .eval_rank == 4


def test_dylora_after_training_every_rank_works():
    torch.manual_seed(0)
    model = build_mlp().eval()
    x = torch.randn(64, 12)
    target = torch.randn(64, 5)
    dm = dt.attach(model, DyLoRAConfig(r=4, alpha=4.0))
    with torch.no_grad():
        loss0 = (dm(x) - target).square().mean()
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=1e-2)
    sampler = DyLoRASampler(dm, "default")
    dm.train()
    for _ in range(150):
        sampler.step()
        opt.zero_grad()
        (dm(x) - target).square().mean().backward()
        opt.step()
    dm.eval()
    losses = []
    for rank in range(1, 5):
        set_eval_rank(dm, "default", rank)
        with torch.no_grad():
            losses.append(float((dm(x) - target).square().mean()))
    assert all(v < 0.9 * float(loss0) for v in losses), (float(loss0), losses)
    assert losses[-1] <= losses[0]  # more rank, no worse


def test_trainer_uses_one_rank_per_step_for_the_whole_adapter(tmp_path):
    data, collate = _tiny_data()
    dm = dt.attach(seeded(build_llama), DyLoRAConfig(r=4, r_min=1, targets=ATTN))
    spy = _Spy()
    Trainer(dm, data, TrainConfig(steps=10, batch_size=4), tmp_path, collate=collate, callbacks=[spy],
            progress=False).train()
    assert all(len(r) == 1 for r in spy.ranks)  # one b per step, shared by every module
    assert len({next(iter(r)) for r in spy.ranks}) > 1  # and it changes between steps
    assert all(d.train_rank is None for d in dm.deltas("default").values())  # released after training


def test_dylora_merge_uses_the_eval_rank_and_set_eval_rank_refuses_while_merged():
    model = seeded(build_llama)
    dm = dt.attach(model, DyLoRAConfig(r=4, eval_rank=2, init="random"))
    want = logits(dm)
    dm.merge()
    assert_same(logits(dm), want)
    with pytest.raises(RuntimeError, match="merged"):
        set_eval_rank(dm, "default", 3)
    dm.unmerge()
    set_eval_rank(dm, "default", 3)
    assert dm.configs["default"].eval_rank == 3


def test_dylora_bad_input_errors_name_the_field_or_module():
    with pytest.raises(ValueError, match="r_min"):
        DyLoRAConfig(r=4, r_min=5)
    with pytest.raises(ValueError, match="eval_rank"):
        DyLoRAConfig(r=4, eval_rank=6)
    with pytest.raises(ValueError, match="update"):
        DyLoRAConfig(update="some")
    model = seeded(build_llama)
    with pytest.raises(ValueError, match="embed_tokens"):
        dt.attach(model, DyLoRAConfig(targets=["embed_tokens"]))
    dm = dt.attach(model, DyLoRAConfig(r=4, r_min=2, targets=ATTN))
    with pytest.raises(ValueError, match="rank"):
        truncate(dm, "default", 5)
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        set_train_rank(dm, "default", 1)
    with pytest.raises(KeyError, match="nope"):
        truncate(dm, "nope", 2)
    dm.add(dt.LoRAConfig(targets=ATTN), "plain")
    with pytest.raises(TypeError, match="not DyLoRA"):
        set_eval_rank(dm, "plain", 2)
