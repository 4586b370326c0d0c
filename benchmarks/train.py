"""Training throughput and peak memory: deltatune's Trainer vs a plain loop over a PEFT model vs full FT.

SmolLM2-135M-Instruct, float32, CPU, 2 threads, batch 8, sequences up to 128 tokens, LoRA r=16 alpha=32
on every linear layer except the head (deltatune ``targets="all-linear"``, PEFT ``"all-linear"``), AdamW,
gradient clipping at 1.0 for all three. Two data regimes, the same token ids for every system:

- ``text``: language modelling, every position labelled, rows of exactly 128 tokens (E2E references
  concatenated and cut), so no padding;
- ``e2e``: E2E prompt/completion (chat-rendered MR as prompt, loss on the reference only), the
  shape of the demo's data; rows shorter than 128, padded per batch.

Each (system, regime) runs in its own fresh process (peak RSS is per process): it loads the model,
builds the batches, runs ``--warmup`` steps, then times ``--steps`` steps. Reported: median step time,
tokens/s (real, non-padding tokens), and peak RSS growth over the process's RSS after loading.

    python benchmarks/train.py [--steps 8] [--warmup 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SYSTEMS = ("deltatune", "peft", "full")
REGIMES = ("text", "e2e")


def make_rows(tok, regime: str, n: int) -> list[dict]:
    from deltatune.generation import render_prompt
    from deltatune.train.data import e2e_prompt, load_e2e_sample

    rows = load_e2e_sample("train")
    if regime == "e2e":
        return [{"prompt": render_prompt(tok, e2e_prompt(r["mr"])), "completion": r["references"][0]}
                for r in rows[:n]]
    ids = tok(" ".join(ref for r in rows for ref in r["references"]))["input_ids"]
    return [{"text": tok.decode(ids[i * 120:(i + 1) * 120])} for i in range(n)]


def child(system: str, regime: str, steps: int, warmup: int) -> dict:
    C.setup(threads=2)
    C.quiet_transformers()
    import deltatune as dt
    from deltatune.train.data import Collator, load_dataset
    from deltatune.train.trainer import Callback, TrainConfig, Trainer

    model, tok = dt.load_pretrained("smollm2-135m")
    n = 8 * (steps + warmup)
    tmp = Path(f"/tmp/deltatune-bench-train-{regime}.jsonl")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in make_rows(tok, regime, n)))
    ds = load_dataset(tmp, tok, max_length=128)
    collate = Collator(tok)
    torch.manual_seed(0)
    times: list[float] = []
    tokens: list[int] = []
    rss0 = C.rss_mb()
    C.reset_peak_rss()
    if system == "deltatune":
        class Clock(Callback):
            def on_train_begin(self, trainer):
                self.t = time.perf_counter()

            def on_step_end(self, trainer, step, metrics):
                now = time.perf_counter()
                times.append(now - self.t)
                self.t = now

        dm = dt.attach(model, dt.LoRAConfig(r=16, alpha=32, targets="all-linear"))
        cfg = TrainConfig(steps=steps + warmup, batch_size=8, lr=1e-4, max_grad_norm=1.0, seed=0)
        trainer = Trainer(dm, ds, cfg, f"/tmp/deltatune-bench-train-out-{regime}", collate=collate,
                          callbacks=[Clock()], progress=False)
        order = trainer._batches(0)  # the batches it will see, for the token count
        tokens = [sum(len(ds[j].input_ids) for j in b) for b in order[: steps + warmup]]
        trainer.train(overwrite=True)  # a scratch folder, reused run after run
    else:
        from deltatune.train.data import bucket_batches

        if system == "peft":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        order = bucket_batches(ds.lengths, 8, seed=0)  # the very batches the Trainer uses
        for b in order[: steps + warmup]:
            batch = collate([ds[j] for j in b])
            t = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            tokens.append(int(batch["attention_mask"].sum()))
    t, k = times[warmup:], tokens[warmup: warmup + steps]
    return {"system": system, "regime": regime, "step_s": statistics.median(t),
            "tokens_per_s": sum(k) / sum(t), "peak_mb": C.peak_rss_mb() - rss0,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SYSTEM", "REGIME"))
    a = ap.parse_args()
    if a.child:
        C.emit_child_result(child(a.child[0], a.child[1], a.steps, a.warmup))
        return
    results = {}
    for regime in REGIMES:
        for system in SYSTEMS:
            print(f"{regime}: {system} ...", flush=True)
            results[(system, regime)] = C.run_child(__file__, ["--child", system, regime, "--steps", str(a.steps),
                                                               "--warmup", str(a.warmup)], timeout=1800)
    rows = []
    for regime in REGIMES:
        peft = results[("peft", regime)]
        for system in SYSTEMS:
            r = results[(system, regime)]
            rows.append([regime, system, f"{r['trainable']:,}", f"{1e3 * r['step_s']:.0f}", f"{r['tokens_per_s']:.0f}",
                         f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x", f"{r['peak_mb']:.0f}"])
    headers = ["data", "system", "trainable params", "median step (ms)", "tokens/s", "vs peft", "peak RSS growth (MB)"]
    print(C.text_table(headers, rows))
    if a.no_write:
        return
    info = C.machine_info()
    body = [
        "## Training throughput: deltatune Trainer vs a plain PEFT loop vs full fine-tuning (`benchmarks/train.py`)",
        "",
        f"Measured {info['date']} on {info['nproc']} cores ({info['cpu']}), torch {info['torch']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, load average at the end {info.get('load average')}.",
        "SmolLM2-135M-Instruct, float32, batch 8, max 128 tokens, LoRA r=16 alpha=32 all-linear (210 modules), "
        f"AdamW + clipping; {a.steps} timed steps after {a.warmup} warm-up, each system in its own process on the "
        "same batches. `text`: every position labelled, 128-token rows; `e2e`: prompt/completion, loss on the "
        "completion only. Goals: deltatune >= 1.15x peft's tokens/s; LoRA peak memory below full fine-tuning's.",
        "",
        C.markdown_table(headers, rows),
    ]
    C.write_section("train", "\n".join(body))


if __name__ == "__main__":
    main()
