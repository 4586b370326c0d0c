"""Core overhead of deltatune's LoRA against the base model and against PEFT, on SmolLM2-135M.

One run measures, float32 on CPU with 2 threads, a batch of 8 x 128 random token ids, LoRA r=16
alpha=32 on every linear layer but the output head (210 modules):

- inference (``torch.inference_mode``, ``eval()``): the base forward, and deltatune unmerged, PEFT
  unmerged and deltatune merged relative to it. B is non-zero (``init="random"``; PEFT gets the very
  same A and B) so no path can skip the delta.
- training: one step = forward with labels (causal-LM loss) + backward + AdamW step, for deltatune
  LoRA, PEFT LoRA and full fine-tuning; median step time, and the peak RSS growth of each measured
  in its own fresh process (``--child-memory NAME``).

Candidates are timed round-robin (base, dt, peft, merged, base, ...) after a warm-up and reported as
medians, so background load hits all alike. ``--quick`` runs fewer repetitions. The figures go to the
``core`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/core.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    PeakRSS,
    emit_child_result,
    interleaved,
    load_smollm2,
    machine_info,
    markdown_table,
    median_ms,
    paired_ratio,
    random_batch,
    rss_mb,
    run_child,
    setup,
    text_table,
    write_section,
)

import deltatune as dt  # noqa: E402

THREADS, BATCH, SEQ, R, ALPHA, LR = 2, 8, 128, 16, 32, 1e-4
N_MODULES = 210  # 30 blocks x (q, k, v, o, gate, up, down)
GOAL_UNMERGED, GOAL_TRAIN, LIMIT_TRAIN, TOL_MERGED = 1.10, 0.85, 1.0, 1.03
CONFIG_TEXT = (
    f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), CPU, torch.set_num_threads({THREADS}), "
    f"batch {BATCH} x {SEQ} random token ids (seed 0); LoRA r={R} alpha={ALPHA} on all linear layers except "
    f"lm_head ({N_MODULES} modules): deltatune `LoRAConfig(r={R}, alpha={ALPHA}, targets=\"all-linear\", "
    f"init=\"random\")`, peft `LoraConfig(r={R}, lora_alpha={ALPHA}, target_modules=\"all-linear\", "
    f"init_lora_weights=False)` with deltatune's A and B copied in. Training step: forward with labels = "
    f"input ids (causal-LM loss) + backward + AdamW(lr={LR}) over the trainable parameters "
    f"(all {{n_full}} for full fine-tuning)."
)


# -- building ------------------------------------------------------------------------------------
def dt_config() -> dt.LoRAConfig:
    return dt.LoRAConfig(r=R, alpha=ALPHA, targets="all-linear", init="random")


def attach_dt(base: torch.nn.Module) -> dt.DeltaModel:
    torch.manual_seed(1)
    return dt.attach(copy.deepcopy(base), dt_config())


def attach_peft(base: torch.nn.Module, like: dt.DeltaModel | None = None) -> torch.nn.Module:
    """PEFT LoRA on a copy of ``base``; with ``like``, its A and B are copied from that deltatune model."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    if like is not None:
        inner = pm.base_model.model
        with torch.no_grad():
            for path, d in like.deltas("default").items():
                m = inner.get_submodule(path)
                m.lora_A["default"].weight.copy_(d.lora_A.weight)
                m.lora_B["default"].weight.copy_(d.lora_B.weight)
    return pm


def peft_paths(pm: torch.nn.Module) -> set[str]:
    inner = pm.base_model.model
    return {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def build(kind: str, base: torch.nn.Module, like: dt.DeltaModel | None = None,
          ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A model to train and its trainable parameters, for ``kind`` in dt / peft / full."""
    if kind == "dt":
        m = attach_dt(base)
    elif kind == "peft":
        m = attach_peft(base, like)
    elif kind == "full":
        m = copy.deepcopy(base).requires_grad_(True)
    else:
        raise ValueError(kind)
    m.train()
    return m, [p for p in m.parameters() if p.requires_grad]


def make_step(model: torch.nn.Module, params: list[torch.nn.Parameter], ids: torch.Tensor):
    opt = torch.optim.AdamW(params, lr=LR)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())

    return step, losses


# -- memory child --------------------------------------------------------------------------------
def child_memory(kind: str, steps: int) -> None:
    """In a fresh process: load, build, then peak RSS growth over ``steps`` training steps."""
    setup(THREADS)
    base = load_smollm2()
    ids = random_batch(base.config.vocab_size, BATCH, SEQ)
    model, params = build(kind, base)
    del base
    step, _ = make_step(model, params, ids)
    with PeakRSS() as mem:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    emit_child_result({
        "kind": kind, "rss_after_load_mb": mem.start_mb, "peak_mb": mem.peak_mb, "growth_mb": mem.growth_mb,
        "peak_reset": mem.reset, "trainable": sum(p.numel() for p in params), "step_s": times,
    })


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, ~3 min)")
    ap.add_argument("--infer-reps", type=int, default=None)
    ap.add_argument("--train-reps", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--child-memory", choices=["dt", "peft", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        child_memory(args.child_memory, args.child_steps)
        return
    infer_reps = args.infer_reps or (3 if args.quick else 10)
    train_reps = args.train_reps or (2 if args.quick else 5)
    mem_steps = 2 if args.quick else 3
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    # memory first, one fresh process per configuration, while this process holds nothing
    memory: dict[str, dict] = {}
    if not args.no_memory:
        for kind in ("dt", "peft", "full"):
            log(f"memory: {kind} in a fresh process ({mem_steps} steps)")
            memory[kind] = run_child(__file__, ["--child-memory", kind, "--child-steps", str(mem_steps)])
            log(f"  peak RSS growth {memory[kind]['growth_mb']:.0f} MB")

    setup(THREADS)
    t = time.perf_counter()
    base = load_smollm2()
    log(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s, RSS {rss_mb():.0f} MB")
    ids = random_batch(base.config.vocab_size, BATCH, SEQ)
    n_full = sum(p.numel() for p in base.parameters())

    # -- the three inference models, computing the same function --------------------------------
    dm = attach_dt(base)
    pm = attach_peft(base, like=dm)
    merged = attach_dt(base)
    merged.load_state_dict(dm.state_dict())
    merged.merge()
    dt_paths = {p for p, _ in dm.sites()}
    pf_paths = peft_paths(pm)
    same_modules = dt_paths == pf_paths and len(dt_paths) == N_MODULES
    if not same_modules:
        print(f"WARNING: module selection differs: deltatune {len(dt_paths)}, peft {len(pf_paths)}; "
              f"only dt {sorted(dt_paths - pf_paths)[:5]}, only peft {sorted(pf_paths - dt_paths)[:5]}")
    for m in (base, dm, pm, merged):
        m.eval()
    with torch.inference_mode():
        out = {k: m(input_ids=ids).logits for k, m in {"base": base, "dt": dm, "peft": pm, "merged": merged}.items()}
    diff_peft = (out["dt"] - out["peft"]).abs().max().item()
    diff_merged = (out["dt"] - out["merged"]).abs().max().item()
    diff_base = (out["dt"] - out["base"]).abs().max().item()
    del out
    log(f"checks: {len(dt_paths)} deltatune sites, {len(pf_paths)} peft modules, same={same_modules}; "
        f"max |logit diff| dt-peft {diff_peft:.2e}, dt-merged {diff_merged:.2e}, dt-base {diff_base:.2e}")

    def forward(m):
        def run():
            with torch.inference_mode():
                m(input_ids=ids)
        return run

    log(f"inference: {infer_reps} interleaved rounds after 1 warm-up round")
    inf = interleaved({"base": forward(base), "dt": forward(dm), "peft": forward(pm), "merged": forward(merged)},
                      reps=infer_reps, warmup=1, log=log)
    del dm, pm, merged
    gc.collect()

    # -- training ---------------------------------------------------------------------------------
    steps, losses, n_train = {}, {}, {}
    dm_train = None
    for kind in ("dt", "peft", "full"):
        model, params = build(kind, base, like=dm_train)  # peft starts from deltatune's A, B: same losses
        if kind == "dt":
            dm_train = model
        steps[kind], losses[kind] = make_step(model, params, ids)
        n_train[kind] = sum(p.numel() for p in params)
    log(f"training: {train_reps} interleaved rounds after 1 warm-up round "
        f"(trainable: dt {n_train['dt']:,}, peft {n_train['peft']:,}, full {n_train['full']:,})")
    train = interleaved(steps, reps=train_reps, warmup=1, log=log)
    log(f"first-step loss: dt {losses['dt'][0]:.5f}, peft {losses['peft'][0]:.5f}, full {losses['full'][0]:.5f}")

    # -- report -----------------------------------------------------------------------------------
    b = inf["base"]
    r_dt, r_pf, r_mg = (statistics.median(inf[k]) / statistics.median(b) for k in ("dt", "peft", "merged"))
    tr = statistics.median(train["dt"]) / statistics.median(train["peft"])
    ok = {
        "unmerged": r_dt <= GOAL_UNMERGED,
        "merged": r_mg <= TOL_MERGED,
        "train": tr <= LIMIT_TRAIN,
        "train_goal": tr <= GOAL_TRAIN,
    }

    def verdict(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    inf_rows = [
        ["base forward", f"{median_ms(b):.0f}", "1.000", "", ""],
        ["deltatune unmerged", f"{median_ms(inf['dt']):.0f}", f"{r_dt:.3f}", f"{paired_ratio(inf['dt'], b):.3f}",
         f"<= {GOAL_UNMERGED:.2f}: {verdict(ok['unmerged'])}"],
        ["peft unmerged", f"{median_ms(inf['peft']):.0f}", f"{r_pf:.3f}", f"{paired_ratio(inf['peft'], b):.3f}",
         "(reference)"],
        ["deltatune merged", f"{median_ms(inf['merged']):.0f}", f"{r_mg:.3f}",
         f"{paired_ratio(inf['merged'], b):.3f}", f"== base (<= {TOL_MERGED:.2f}): {verdict(ok['merged'])}"],
    ]
    inf_headers = ["inference (8 x 128)", "median ms", "/ base", "paired / base", "goal"]

    def mem(kind: str) -> str:
        return f"{memory[kind]['growth_mb']:.0f}" if kind in memory else "n/a"

    tr_rows = [
        ["deltatune LoRA", f"{median_ms(train['dt']):.0f}", f"{tr:.3f}", f"{paired_ratio(train['dt'], train['peft']):.3f}",
         mem("dt"), f"{n_train['dt']:,}", f"<= {LIMIT_TRAIN:.2f} (goal {GOAL_TRAIN:.2f}): "
         f"{verdict(ok['train'])}{'' if ok['train_goal'] else ', goal missed'}"],
        ["peft LoRA", f"{median_ms(train['peft']):.0f}", "1.000", "", mem("peft"), f"{n_train['peft']:,}", "(reference)"],
        ["full fine-tuning", f"{median_ms(train['full']):.0f}",
         f"{statistics.median(train['full']) / statistics.median(train['peft']):.3f}",
         f"{paired_ratio(train['full'], train['peft']):.3f}", mem("full"), f"{n_train['full']:,}", ""],
    ]
    tr_headers = ["train step", "median ms", "/ peft", "paired / peft", "peak RSS growth MB", "trainable", "goal"]

    print()
    print(text_table(inf_headers, inf_rows))
    print()
    print(text_table(tr_headers, tr_rows))
    print()
    info = machine_info()
    elapsed = time.perf_counter() - t_start
    print(f"total {elapsed:.0f} s; " + ", ".join(f"{k} {v}" for k, v in info.items()))

    if args.no_write:
        return
    raw = {k: " ".join(f"{1e3 * s:.0f}" for s in v) for k, v in {**{f"infer {k}": v for k, v in inf.items()},
                                                               **{f"train {k}": v for k, v in train.items()}}.items()}
    md = [
        "## Core: LoRA overhead vs base and vs PEFT (`benchmarks/core.py`)",
        "",
        f"Run {info['date']}{' (--quick)' if args.quick else ''}, {elapsed:.0f} s. Machine: nproc {info['nproc']} "
        f"({info['cpu']}), load average at the end {info.get('load average', 'n/a')}; Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}.",
        "",
        "Configuration: " + CONFIG_TEXT.format(n_full=f"{n_full:,}"),
        f"Inference: `torch.inference_mode()`, `eval()`, {infer_reps} round-robin rounds (base, dt, peft, merged) "
        f"after one warm-up round; training: {train_reps} round-robin rounds (dt, peft, full) after one warm-up "
        "step each. Medians; '/ base' is the ratio of medians, 'paired' the median of per-round ratios. "
        f"Peak RSS growth: a fresh process per configuration, peak RSS over {mem_steps} steps (kernel peak mark "
        "reset after loading) minus the RSS before the first step.",
        "",
        f"Checks: deltatune selects {len(dt_paths)} modules, peft {len(pf_paths)}, identical sets: "
        f"{'yes' if same_modules else 'NO'}. Max |logit difference|: deltatune vs peft {diff_peft:.1e}, "
        f"unmerged vs merged {diff_merged:.1e}, adapted vs base {diff_base:.1e} (non-zero delta). First-step "
        f"loss: deltatune {losses['dt'][0]:.5f}, peft {losses['peft'][0]:.5f}.",
        "",
        markdown_table(inf_headers, inf_rows),
        "",
        markdown_table(tr_headers, tr_rows),
        "",
        "Goals: unmerged / base <= 1.10; train step <= peft's (goal 0.85x); merged == base.",
        "",
        "<details><summary>raw times (ms, in round order)</summary>",
        "",
        *[f"- {k}: {v}" for k, v in raw.items()],
        "",
        "</details>",
    ]
    write_section("core", "\n".join(md))
    log("wrote the core section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
