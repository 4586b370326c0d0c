"""The method comparison: every registered method on two real tasks, same budget, plus full fine-tuning.

- ``sst2``: all-MiniLM-L6-v2 + a fresh 2-class head (``modules_to_save``), trained on a fixed random
  subset of SST-2 train (``--sst2-train`` rows, seed 0), accuracy on the whole dev set (872).
- ``e2e``: SmolLM2-135M-Instruct on the E2E sample shipped with deltatune (train MRs), BLEU (sacrebleu)
  of greedy outputs on the first ``--e2e-eval`` unseen MRs.

Each (method, task) runs in its own fresh process (peak RSS is per process) with the same data, batch
order, steps, schedule and clipping; only the learning rate is per method (each method's usual range,
listed in the table). Reported: trainable parameters and % of the model, adapter file size, training
tokens/s, peak RSS growth during training, and the task score. Results accumulate in
``benchmarks/methods_results.json`` (rerun a subset with ``--methods``); the table goes to the
``methods`` section of RESULTS.md and the Pareto plot to ``benchmarks/methods_pareto.png``.

    python benchmarks/methods.py [--tasks sst2 e2e] [--methods lora ia3 ...] [--table-only]

Needs ``../shared/data`` (or ``DELTATUNE_SHARED_DATA``) for SST-2.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "methods_results.json"
PLOT = HERE / "methods_pareto.png"
DATA = Path(os.environ.get("DELTATUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

# registry name -> (config kwargs, lr on sst2, lr on e2e). "full" is full fine-tuning.
METHODS: dict[str, tuple[dict, float, float]] = {
    "full": ({}, 1e-4, 5e-5),
    "lora": ({"r": 4, "alpha": 8}, 2e-3, 1e-3),
    "dora": ({"r": 4, "alpha": 8}, 2e-3, 1e-3),
    "adalora": ({"orth_reg_weight": 0.1}, 2e-3, 1e-3),  # the authors' GLUE setting
    "dylora": ({"r": 8}, 1e-3, 1e-3),
    "vera": ({}, 1e-2, 5e-3),
    "loha": ({}, 1e-3, 1e-3),
    "lokr": ({}, 1e-3, 1e-3),
    "mora": ({}, 1e-3, 1e-3),
    "fourierft": ({}, 1e-2, 1e-2),
    "oft": ({}, 1e-3, 1e-3),
    "boft": ({}, 1e-3, 1e-3),
    "sparse_ft": ({}, 1e-3, 5e-4),
    "bitfit": ({}, 1e-3, 1e-3),
    "ia3": ({}, 1e-2, 5e-3),
    "ssf": ({}, 1e-2, 5e-3),
    "ln_tuning": ({}, 1e-3, 1e-3),
    "adapter_houlsby": ({}, 1e-3, 1e-3),
    "adapter_pfeiffer": ({}, 1e-3, 1e-3),
    "adapter_parallel": ({}, 1e-3, 1e-3),
    "compacter": ({}, 3e-3, 3e-3),
    "prompt_tuning": ({}, 3e-2, 3e-2),
    "prefix_tuning": ({}, 1e-2, 1e-2),
}
TASKS = {
    "sst2": dict(model="minilm-l6", steps=250, batch=32, max_length=64, warmup=25),
    "e2e": dict(model="smollm2-135m", steps=60, batch=8, max_length=160, warmup=6),
}


# -- data ------------------------------------------------------------------------------------------
def sst2_files(tmp: Path, n_train: int) -> tuple[Path, Path]:
    src = DATA / "sst2"
    if not (src / "train.tsv").is_file():
        raise SystemExit(f"SST-2 not found under {src}; set DELTATUNE_SHARED_DATA to the shared data folder")
    lines = (src / "train.tsv").read_text().splitlines()
    if lines[0].split("\t") != ["sentence", "label"]:
        raise SystemExit(f"{src / 'train.tsv'}: expected the header 'sentence<TAB>label', got {lines[0]!r}")
    rows = lines[1:]
    random.Random(0).shuffle(rows)
    header = "text\tlabel"  # deltatune's classification columns
    train, dev = tmp / "sst2_train.tsv", tmp / "sst2_dev.tsv"
    train.write_text("\n".join([header, *rows[:n_train]]) + "\n")
    dev.write_text("\n".join([header, *(src / "dev.tsv").read_text().splitlines()[1:]]) + "\n")
    return train, dev


def e2e_files(tmp: Path, tok) -> tuple[Path, list[str], list[list[str]]]:
    from deltatune.generation import render_prompt
    from deltatune.train.data import e2e_prompt, load_e2e_sample

    train = tmp / "e2e_train.jsonl"
    with open(train, "w") as f:
        for r in load_e2e_sample("train"):
            for ref in r["references"]:
                f.write(json.dumps({"prompt": render_prompt(tok, e2e_prompt(r["mr"])), "completion": ref}) + "\n")
    rows = load_e2e_sample("eval")
    return train, [render_prompt(tok, e2e_prompt(r["mr"])) for r in rows], [r["references"] for r in rows]


# -- one run (child process) ----------------------------------------------------------------------
def child(method: str, task: str, args) -> dict:
    C.setup(threads=args.threads)
    C.quiet_transformers()
    import deltatune as dt
    from deltatune.generation import bleu, generate
    from deltatune.train.data import Collator, bucket_batches, load_dataset
    from deltatune.train.trainer import (
        Callback,
        TrainConfig,
        Trainer,
        causal_lm_loss,
        evaluate_dataset,
        make_schedule,
    )

    spec = TASKS[task]
    kwargs, lr_sst2, lr_e2e = METHODS[method]
    lr = lr_sst2 if task == "sst2" else lr_e2e
    tmp = Path(tempfile.mkdtemp(prefix=f"dt-methods-{method}-{task}-"))
    if task == "sst2":
        model, tok = dt.load_pretrained(spec["model"], task="classification", num_labels=2)
        train_file, eval_file = sst2_files(tmp, args.sst2_train)
        train = load_dataset(train_file, tok, max_length=spec["max_length"])
        evals = load_dataset(eval_file, tok, max_length=spec["max_length"], label_names=train.label_names)
    else:
        model, tok = dt.load_pretrained(spec["model"])
        train_file, prompts, refs = e2e_files(tmp, tok)
        prompts, refs = prompts[:args.e2e_eval], refs[:args.e2e_eval]
        train = load_dataset(train_file, tok, format="prompt_completion", max_length=spec["max_length"])
    collate = Collator(tok)
    n_model = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(steps=spec["steps"], batch_size=spec["batch"], lr=lr, warmup=spec["warmup"], seed=0)
    steps_t: list[float] = []
    torch.manual_seed(0)
    rss0 = C.rss_mb()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    if method == "full":
        model.requires_grad_(True)
        net, params = model, list(model.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = make_schedule(opt, cfg.schedule, cfg.warmup, cfg.steps)
        order = bucket_batches(train.lengths, cfg.batch_size, seed=cfg.seed)
        net.train()
        tokens = 0
        for i in range(cfg.steps):
            t = time.perf_counter()
            batch = collate([train[j] for j in order[i % len(order)]])
            loss = causal_lm_loss(net, batch) if task == "e2e" else net(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            steps_t.append(time.perf_counter() - t)
        net.eval()
        trainable, adapter_bytes = n_model, sum(p.numel() * p.element_size() for p in params)
    else:
        extra = {"modules_to_save": ["classifier"]} if task == "sst2" else {}
        dcfg = dt.config(method, **kwargs, **extra)
        net = dt.attach(model, dcfg)
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

        class Clock(Callback):
            def on_train_begin(self, trainer):
                self.t = time.perf_counter()

            def on_step_end(self, trainer, step, metrics):
                now = time.perf_counter()
                steps_t.append(now - self.t)
                self.t = now

        out = tmp / "adapter"
        result = Trainer(net, train, cfg, out, collate=collate, callbacks=[Clock()], progress=False).train()
        tokens = result.tokens
        net.eval()
        adapter_bytes = sum(f.stat().st_size for f in out.glob("adapter_model.safetensors"))
    train_s = time.perf_counter() - t0
    peak = C.peak_rss_mb() - rss0
    if task == "sst2":
        score = 100 * evaluate_dataset(net, evals, collate, task="classification", batch_size=64)["eval_accuracy"]
    else:
        score = bleu(generate(net, tok, prompts, max_new_tokens=48, chat=False, batch_size=16), refs)
    return {"method": method, "task": task, "lr": lr, "steps": cfg.steps, "trainable": trainable,
            "percent": 100 * trainable / n_model, "adapter_bytes": adapter_bytes,
            "tokens_per_s": tokens / train_s, "median_step_s": statistics.median(steps_t), "peak_mb": peak,
            "score": score, "metric": "accuracy" if task == "sst2" else "BLEU",
            "date": C.machine_info()["date"], "load_avg": os.getloadavg()[0], "threads": args.threads}


# -- report ----------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


BUSY_LOAD = 3.0  # 1-minute load average above which a run shared the 2 cores with other work


def _throughput(r: dict) -> str:
    """tokens/s, or a marked figure when the run shared the CPU (its quality figures are unaffected)."""
    if r.get("load_avg", 0.0) > BUSY_LOAD or r.get("threads", 2) != 2:
        return f"({r['tokens_per_s']:.0f})*"
    return f"{r['tokens_per_s']:.0f}"


def report(results: dict[str, dict], args) -> None:
    headers = ["method", "task", "trainable", "% of model", "adapter file", "train tokens/s", "peak RSS MB",
               "lr", "score"]
    rows = []
    for task in TASKS:
        for method in METHODS:
            r = results.get(f"{method}|{task}")
            if r is None:
                continue
            rows.append([method, task, f"{r['trainable']:,}", f"{r['percent']:.3f}", human_bytes(r["adapter_bytes"]),
                         _throughput(r), f"{r['peak_mb']:.0f}", f"{r['lr']:g}",
                         f"{r['score']:.2f} {r['metric']}"])
    print(C.text_table(headers, rows))
    missing = [f"{m}|{t}" for t in TASKS for m in METHODS if f"{m}|{t}" not in results]
    verdict = ""
    full, lora = results.get("full|sst2"), results.get("lora|sst2")
    if full and lora:
        gap = full["score"] - lora["score"]
        ok = gap <= 1.0 and lora["percent"] < 1.0
        verdict = (f"Goal (LoRA within 1 accuracy point of full fine-tuning on SST-2 with < 1% trained): LoRA "
                   f"{lora['score']:.2f} vs full {full['score']:.2f} (gap {gap:+.2f}), {lora['percent']:.2f}% "
                   f"trained: {'met' if ok else 'MISSED'}.")
        print(verdict)
    if args.no_write:
        return
    plot(results)
    body = [
        "## Method comparison (`benchmarks/methods.py`)",
        "",
        f"SST-2: all-MiniLM-L6-v2 + fresh head (trained via modules_to_save), {args.sst2_train} random train rows, "
        f"{TASKS['sst2']['steps']} steps of batch {TASKS['sst2']['batch']}, max {TASKS['sst2']['max_length']} tokens, "
        "accuracy on the 872 dev sentences. E2E: SmolLM2-135M-Instruct, the shipped E2E sample, "
        f"{TASKS['e2e']['steps']} steps of batch {TASKS['e2e']['batch']}, BLEU on {args.e2e_eval} unseen MRs "
        "(greedy, 48 new tokens). Same data, batch order, linear schedule with warm-up and clipping for all; "
        "the learning rate per method is in the table. Each run in a fresh process on 2 CPU threads (unless marked), float32; "
        "peak RSS growth over the process's RSS after loading. Full fine-tuning's 'adapter file' is the size of "
        "all weights. Settings that differ from a method's defaults: "
        + "; ".join(f"{m} {', '.join(f'{k}={v}' for k, v in kw.items())}" for m, (kw, _, _) in METHODS.items() if kw)
        + ". Pareto plot: `benchmarks/methods_pareto.png`. A tokens/s figure in parentheses with * was "
        f"measured while other work shared the CPU (load average > {BUSY_LOAD:g} at the end of the run) or on 1 thread: not "
        "comparable; the scores, sizes and memory are unaffected.",
        "",
        C.markdown_table(headers, rows),
        "",
        verdict or "Goal (LoRA within 1 point of full fine-tuning on SST-2 with < 1% trained): not measured yet.",
        "",
        f"Not measured yet: {', '.join(missing)}." if missing else "Every method measured on both tasks.",
    ]
    C.write_section("methods", "\n".join(body))


def plot(results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5))
    for ax, task in zip(axes, TASKS):
        pts = [(r["trainable"], r["score"], m) for m in METHODS if (r := results.get(f"{m}|{task}"))]
        if not pts:
            ax.set_title(f"{task}: no results yet")
            continue
        pts.sort()
        best, front = -1e9, []
        for x, y, _m in pts:  # Pareto front: more quality for more parameters
            if y > best:
                front.append((x, y))
                best = y
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", alpha=0.5)
        for x, y, m in pts:
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("SST-2 dev accuracy (%)" if task == "sst2" else "E2E BLEU")
        ax.set_title(task)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method not measured yet")
    ap.add_argument("--rerun", action="store_true", help="measure again methods that have results")
    ap.add_argument("--sst2-train", type=int, default=8000)
    ap.add_argument("--e2e-eval", type=int, default=30)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads per run (1 when other work shares the CPU: no OpenMP spin-waits)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        C.emit_child_result(child(args.child[0], args.child[1], args))
        return
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if not args.table_only:
        import deltatune as dt

        available = set(dt.available_methods()) | {"full"}
        for task in args.tasks:
            for method in args.methods or list(METHODS):
                key = f"{method}|{task}"
                if method not in METHODS:
                    raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)}")
                if method not in available:
                    print(f"{key}: not registered in this build, skipped", flush=True)
                    continue
                if key in results and not args.rerun and args.methods is None:
                    continue
                print(f"{key} ...", flush=True)
                t = time.perf_counter()
                try:
                    results[key] = C.run_child(__file__, ["--child", method, task, "--sst2-train", str(args.sst2_train),
                                                          "--e2e-eval", str(args.e2e_eval),
                                                          "--threads", str(args.threads)], timeout=3600)
                except RuntimeError as e:
                    print(f"{key}: FAILED\n{e}", flush=True)
                    continue
                r = results[key]
                print(f"  {r['score']:.2f} {r['metric']}, {r['trainable']:,} trainable, "
                      f"{r['tokens_per_s']:.0f} tok/s ({time.perf_counter() - t:.0f} s)", flush=True)
                if not args.no_write:  # re-read first: another run may have added rows meanwhile
                    stored = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
                    results = {**stored, key: r}
                    RESULTS_JSON.write_text(json.dumps(results, indent=1, sort_keys=True))
    report(results, args)


if __name__ == "__main__":
    main()
