"""Merging quality on real data: combine task adapters with every operator, score each task.

- ``enc``: all-MiniLM-L6-v2, a LoRA (r 8, every linear layer) + head trained per task: SST-2 (8000 train
  rows, accuracy on the 872 dev) and CLINC150 (150 intents, 6000 train rows, accuracy on 1500 val rows).
  The two LoRAs are combined with each operator (``dt.combine``; heads stay per task); each task is
  scored with the combined LoRA and its own head, relative to its own adapter.
- ``lm``: SmolLM2-135M-Instruct, a LoRA (r 8) per task: E2E (BLEU on 30 unseen MRs) and SST-2 as
  generation ("positive"/"negative", accuracy on 200 dev sentences); combined the same way.
- Negation: each task's adapter negated (``dt.negate``) must lower that task's score below the base
  model's own (no adapter) score or at least below its adapter's.

Adapters are trained once and cached under ``--work``; results go to the ``merge`` section of
RESULTS.md.

    python benchmarks/merge.py [--parts enc lm] [--work /tmp/dt-merge-quality]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import methods as M  # noqa: E402  (shared data helpers: SST-2 and E2E files)

# operator -> (combine kwargs). Weights: 1, 1 for the additive family (multi-task addition), 0.5, 0.5
# for averages. Non-"cat" operators work on the dense deltas and come back to rank 16 = r1 + r2 by SVD.
OPS: dict[str, dict] = {
    "task_arithmetic (cat)": dict(method="task_arithmetic", combination="cat", weights=[1.0, 1.0]),
    "linear (cat)": dict(method="linear", combination="cat", weights=[0.5, 0.5]),
    "task_arithmetic": dict(method="task_arithmetic", combination="svd", weights=[1.0, 1.0]),
    "ties": dict(method="ties", combination="svd", weights=[1.0, 1.0], density=0.5),
    "dare_linear": dict(method="dare_linear", combination="svd", weights=[1.0, 1.0], density=0.5),
    "dare_ties": dict(method="dare_ties", combination="svd", weights=[1.0, 1.0], density=0.5),
    "magnitude_prune": dict(method="magnitude_prune", combination="svd", weights=[1.0, 1.0], density=0.5),
    "breadcrumbs": dict(method="breadcrumbs", combination="svd", weights=[1.0, 1.0], density=0.5, gamma=0.01),
    "della": dict(method="della", combination="svd", weights=[1.0, 1.0], density=0.5, epsilon=0.15),
    "pcb": dict(method="pcb", combination="svd", weights=[1.0, 1.0]),
    "star": dict(method="star", combination="svd", weights=[1.0, 1.0]),
    "slerp": dict(method="slerp", combination="svd", weights=[1.0, 1.0], t=0.5),
}
ENC = dict(model="minilm-l6", r=8, alpha=16, batch=32, max_length=64, lr=2e-3)
THREADS = 2  # --threads; 1 is much faster when other work shares the CPU (no OpenMP spin-waits)
LM = dict(model="smollm2-135m", r=8, alpha=16, steps=60, batch=8, max_length=160, lr=1e-3)


# -- data ------------------------------------------------------------------------------------------
def clinc_files(tmp: Path, n_train: int = 6000, n_eval: int = 1500) -> tuple[Path, Path]:
    src = M.DATA / "clinc150" / "train_val.json"
    if not src.is_file():
        raise SystemExit(f"CLINC150 not found at {src}; set DELTATUNE_SHARED_DATA")
    d = json.loads(src.read_text())
    train, val = list(d["train"]), list(d["val"])
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(val)

    def jsonl(path: Path, rows) -> Path:  # JSONL: the queries contain quotes, which a TSV reader would parse
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
        return path

    return jsonl(tmp / "clinc_train.jsonl", train[:n_train]), jsonl(tmp / "clinc_val.jsonl", val[:n_eval])


SENT_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n{}"


def sentiment_lm_data(tmp: Path, tok, n_train: int = 2000, n_eval: int = 200):
    from deltatune.generation import render_prompt

    rows = (M.DATA / "sst2" / "train.tsv").read_text().splitlines()[1:]
    random.Random(0).shuffle(rows)
    train = tmp / "sentlm_train.jsonl"
    with open(train, "w") as f:
        for line in rows[:n_train]:
            s, y = line.rsplit("\t", 1)
            f.write(json.dumps({"prompt": render_prompt(tok, SENT_PROMPT.format(s)),
                                "completion": "positive" if y == "1" else "negative"}) + "\n")
    dev = [line.rsplit("\t", 1) for line in (M.DATA / "sst2" / "dev.tsv").read_text().splitlines()[1:]][:n_eval]
    prompts = [render_prompt(tok, SENT_PROMPT.format(s)) for s, _ in dev]
    return train, prompts, ["positive" if y == "1" else "negative" for _, y in dev]


# -- training (cached) -----------------------------------------------------------------------------
def train_adapter(work: Path, name: str, model, tok, train_file: Path, fmt: str, spec: dict, steps: int,
                  extra: dict) -> Path:
    import deltatune as dt
    from deltatune.train.data import Collator, load_dataset
    from deltatune.train.trainer import TrainConfig, Trainer

    out = work / "adapters" / name
    if (out / "adapter_model.safetensors").is_file():
        return out
    data = load_dataset(train_file, tok, format=fmt, max_length=spec["max_length"])
    dm = dt.attach(model, dt.config("lora", r=spec["r"], alpha=spec["alpha"], **extra))
    tmp = work / "runs" / name
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = TrainConfig(steps=steps, batch_size=spec["batch"], lr=spec["lr"], warmup=max(1, steps // 10), seed=0)
    t = time.perf_counter()
    Trainer(dm, data, cfg, tmp, collate=Collator(tok), progress=False).train()
    print(f"  trained {name}: {time.perf_counter() - t:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    dm.save(out)
    dm.unload()
    return out


def head_of(adapter: Path) -> dict[str, torch.Tensor]:
    """The classification head saved with an adapter (modules_to_save), as ``classifier.*`` tensors."""
    from deltatune.io.adapter import read_weights

    w = read_weights(adapter)
    head = {k.split("classifier.", 1)[1].replace("modules_to_save.", ""): v for k, v in w.items() if "classifier." in k}
    if not head:
        raise SystemExit(f"{adapter}: no classifier tensors (keys: {sorted(w)[:5]} ...)")
    return head


# -- scoring ---------------------------------------------------------------------------------------
def enc_score(adapter: Path | None, head_from: Path, labels: list[str], eval_file: Path) -> float:
    import deltatune as dt
    from deltatune.train.data import Collator, load_dataset
    from deltatune.train.trainer import evaluate_dataset

    model, tok = dt.load_pretrained(ENC["model"], task="classification", num_labels=len(labels))
    with torch.no_grad():
        for k, v in head_of(head_from).items():
            dict(model.classifier.named_parameters())[k].copy_(v)
    net = model
    if adapter is not None:
        net = dt.load_adapter(model, adapter)
    evals = load_dataset(eval_file, tok, max_length=ENC["max_length"], label_names=labels)
    return 100 * evaluate_dataset(net, evals, Collator(tok), task="classification", batch_size=64)["eval_accuracy"]


def lm_scores(model, tok, adapter: Path | None, e2e, sent) -> dict[str, float]:
    import deltatune as dt
    from deltatune.generation import bleu, generate

    net = dt.load_adapter(model, adapter, "scored") if adapter is not None else model
    try:
        hyp = generate(net, tok, e2e[0], max_new_tokens=48, chat=False, batch_size=16)
        answers = generate(net, tok, sent[0], max_new_tokens=3, chat=False, batch_size=16)
        acc = 100 * sum(a.strip().lower().startswith(y) for a, y in zip(answers, sent[1])) / len(sent[1])
        return {"e2e": bleu(hyp, e2e[1]), "sentiment": acc}
    finally:
        if adapter is not None:
            net.delete("scored")


# -- parts -----------------------------------------------------------------------------------------
def combine(work: Path, part: str, label: str, adapters: list[Path], spec: dict) -> tuple[Path, dict]:
    import deltatune as dt

    out = work / "combined" / part / label.replace(" ", "_").replace("(", "").replace(")", "")
    shutil.rmtree(out, ignore_errors=True)
    kw = dict(spec)
    weights = kw.pop("weights")
    if kw.get("combination") == "svd":
        kw.setdefault("rank", 16)
    t = time.perf_counter()
    dt.combine([str(a) for a in adapters], weights, out=out, keep_modules_to_save="none", **kw)
    info = {"seconds": time.perf_counter() - t}
    modules = json.loads((out / "combine_report.json").read_text()).get("modules") or {}
    errs = [m["rel_error"] for m in modules.values() if "rel_error" in m]
    if errs:
        info["svd_error_mean"] = sum(errs) / len(errs)
    return out, info


def part_enc(work: Path, ops: list[str]) -> dict:
    import deltatune as dt

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    sst_train, sst_dev = M.sst2_files(data, 8000)
    cl_train, cl_val = clinc_files(data)
    tasks = {"sst2": (sst_train, sst_dev, 250), "clinc150": (cl_train, cl_val, 400)}
    adapters, labels = {}, {}
    for task, (train_file, _, steps) in tasks.items():
        from deltatune.train.data import load_dataset

        C.setup(threads=THREADS)
        model, tok = dt.load_pretrained(ENC["model"], task="classification",
                                        num_labels=2 if task == "sst2" else 150)
        labels[task] = load_dataset(train_file, tok, max_length=ENC["max_length"]).label_names
        if task == "clinc150" and len(labels[task]) != 150:  # the head must cover all intents
            raise SystemExit(f"CLINC150 train subset has {len(labels[task])} intents, expected 150")
        adapters[task] = train_adapter(work, f"enc-{task}", model, tok, train_file, "classification", ENC, steps,
                                       {"modules_to_save": ["classifier"]})
    res: dict = {"own": {}, "base": {}, "ops": {}, "negated": {}}
    for task, (_, eval_file, _) in tasks.items():
        res["own"][task] = enc_score(adapters[task], adapters[task], labels[task], eval_file)
        res["base"][task] = enc_score(None, adapters[task], labels[task], eval_file)
        print(f"  {task}: own {res['own'][task]:.2f}, head only {res['base'][task]:.2f}", flush=True)
    pair = [adapters["sst2"], adapters["clinc150"]]
    for label in ops:
        try:
            out, info = combine(work, "enc", label, pair, OPS[label])
        except Exception as e:  # an operator missing in this build is reported, not fatal
            res["ops"][label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {label}: {res['ops'][label]['error']}", flush=True)
            continue
        for task, (_, eval_file, _) in tasks.items():
            info[task] = enc_score(out, adapters[task], labels[task], eval_file)
        res["ops"][label] = info
        print(f"  {label}: " + ", ".join(f"{t} {info[t]:.2f} ({100 * info[t] / res['own'][t]:.1f}%)"
                                         for t in tasks), flush=True)
    for task, (_, eval_file, _) in tasks.items():
        neg = work / "combined" / "enc" / f"negated_{task}"
        shutil.rmtree(neg, ignore_errors=True)
        dt.negate(adapters[task], neg)
        res["negated"][task] = enc_score(neg, adapters[task], labels[task], eval_file)
        print(f"  negated {task}: {res['negated'][task]:.2f}", flush=True)
    return res


def part_lm(work: Path, ops: list[str]) -> dict:
    import deltatune as dt

    C.setup(threads=THREADS)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    model, tok = dt.load_pretrained(LM["model"])
    e2e_train, e2e_prompts, e2e_refs = M.e2e_files(data, tok)
    e2e = (e2e_prompts[:30], e2e_refs[:30])
    sent_train, sent_prompts, sent_gold = sentiment_lm_data(data, tok)
    sent = (sent_prompts, sent_gold)
    adapters = {
        "e2e": train_adapter(work, "lm-e2e", model, tok, e2e_train, "prompt_completion", LM, LM["steps"], {}),
        "sentiment": train_adapter(work, "lm-sentiment", model, tok, sent_train, "prompt_completion", LM,
                                   LM["steps"], {}),
    }
    res: dict = {"own": {}, "ops": {}, "negated": {}}
    res["base"] = lm_scores(model, tok, None, e2e, sent)
    print(f"  base: {res['base']}", flush=True)
    for task, a in adapters.items():
        res["own"][task] = lm_scores(model, tok, a, e2e, sent)[task]
        print(f"  own {task}: {res['own'][task]:.2f}", flush=True)
    pair = [adapters["e2e"], adapters["sentiment"]]
    for label in ops:
        try:
            out, info = combine(work, "lm", label, pair, OPS[label])
        except Exception as e:
            res["ops"][label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {label}: {res['ops'][label]['error']}", flush=True)
            continue
        info.update(lm_scores(model, tok, out, e2e, sent))
        res["ops"][label] = info
        print(f"  {label}: e2e {info['e2e']:.2f}, sentiment {info['sentiment']:.2f}", flush=True)
    for task, a in adapters.items():
        neg = work / "combined" / "lm" / f"negated_{task}"
        shutil.rmtree(neg, ignore_errors=True)
        dt.negate(a, neg)
        res["negated"][task] = lm_scores(model, tok, neg, e2e, sent)[task]
        print(f"  negated {task}: {res['negated'][task]:.2f}", flush=True)
    return res


# -- report ----------------------------------------------------------------------------------------
def report(results: dict, args) -> None:
    parts = []
    titles = {"enc": ("MiniLM-L6 classifiers", ["sst2", "clinc150"], "accuracy"),
              "lm": ("SmolLM2-135M generation", ["e2e", "sentiment"], "BLEU / accuracy")}
    for part, res in results.items():
        title, tasks, metric = titles[part]
        rows = [["own adapter", *[f"{res['own'][t]:.2f} (100%)" for t in tasks], "", ""]]
        for label, info in res["ops"].items():
            if "error" in info:
                rows.append([label, *["not measured"] * len(tasks), "", info["error"][:60]])
                continue
            err = f"{info['svd_error_mean']:.3f}" if "svd_error_mean" in info else "exact"
            rows.append([label, *[f"{info[t]:.2f} ({100 * info[t] / res['own'][t]:.1f}%)" for t in tasks],
                         err, f"{info['seconds']:.1f}"])
        base = res["base"]
        rows.append(["no adapter" + (" (own head)" if part == "enc" else ""), *[f"{base[t]:.2f}" for t in tasks], "", ""])
        rows.append(["negated own adapter", *[f"{res['negated'][t]:.2f}" for t in tasks], "", ""])
        parts.append(f"### {title} ({metric})\n\n" + C.markdown_table(
            ["combination", *tasks, "SVD rel. error (mean)", "combine s"], rows))
    body = ("## Merging quality (`benchmarks/merge.py`)\n\n" + __doc__.split("\n\n")[1].strip() + "\n\n"
            + "Scores relative to each task's own adapter in parentheses. Operators other than `cat` act on the "
              "dense per-module deltas and return to rank 16 (= 8 + 8) by truncated SVD.\n\n"
            + "\n\n".join(parts) + "\n\n" + "Run " + ", ".join(f"{k} {v}" for k, v in C.machine_info().items()) + ".")
    print(body)
    if not args.no_write:
        C.write_section("merge", body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=["enc", "lm"], default=["enc", "lm"])
    ap.add_argument("--ops", nargs="+", default=list(OPS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dt-merge-quality"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="write the table from the stored results")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    C.quiet_transformers()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for part in [] if args.report_only else args.parts:
        print(f"{part} ...", flush=True)
        new = (part_enc if part == "enc" else part_lm)(args.work, args.ops)
        ops = {**results.get(part, {}).get("ops", {}), **new["ops"]}  # a run of some --ops keeps the others
        new["ops"] = {k: ops[k] for k in OPS if k in ops}
        results[part] = new
        store.write_text(json.dumps(results, indent=1))
    report(results, args)


if __name__ == "__main__":
    main()
