"""``deltatune demo``: the main job on the embedded default model, end to end.

SmolLM2-135M-Instruct learns E2E NLG (restaurant meaning representation -> one sentence) with LoRA from
a sample shipped in the package (CC BY-SA 4.0, see deltatune/data/e2e/README.md), split by meaning
representation so the evaluation MRs are unseen in training. It prints outputs before and after for
three eval MRs, BLEU before and after, and ends with one JSON line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

DEMO_STEPS = 60
SHOWN = 3


def run_demo(output: Path = Path("runs/demo"), steps: int | None = None, progress: bool = True,
             eval_limit: int | None = None) -> dict[str, Any]:
    from . import LoRAConfig, attach
    from .generation import bleu, generate, render_prompt
    from .models import load_pretrained
    from .train.data import Collator, e2e_prompt, load_dataset, load_e2e_sample
    from .train.trainer import TrainConfig, Trainer

    t0 = time.perf_counter()
    console = Console(stderr=True)
    output = Path(output)
    torch.manual_seed(0)
    console.print("[bold]deltatune demo[/bold]: LoRA on SmolLM2-135M-Instruct, E2E NLG (MR -> sentence)")
    model, tok = load_pretrained("smollm2-135m")
    train_rows, eval_rows = load_e2e_sample("train"), load_e2e_sample("eval")[:eval_limit]
    prompts = [render_prompt(tok, e2e_prompt(r["mr"])) for r in eval_rows]
    refs = [r["references"] for r in eval_rows]

    console.print(f"generating for {len(prompts)} unseen eval MRs with the base model ...")
    t = time.perf_counter()
    before = generate(model, tok, prompts, max_new_tokens=60, chat=False, batch_size=20)
    bleu_before = bleu(before, refs)
    times = {"generate_before": time.perf_counter() - t}

    data_dir = output / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_file = data_dir / "train.jsonl"
    with open(train_file, "w") as f:
        for r in train_rows:
            for ref in r["references"]:
                prompt = render_prompt(tok, e2e_prompt(r["mr"]))
                f.write(json.dumps({"prompt": prompt, "completion": ref}) + "\n")
    ds = load_dataset(train_file, tok, format="prompt_completion", max_length=160)
    dm = attach(model, LoRAConfig(r=16, alpha=32, targets="all-linear"))
    trainable, total = dm.num_parameters()
    console.print(f"training LoRA r=16 on all linear layers: {trainable:,} of {total:,} parameters "
                  f"({100 * trainable / total:.2f}%), {len(ds)} examples")
    cfg = TrainConfig(steps=steps or DEMO_STEPS, batch_size=8, lr=1e-3, warmup=10, schedule="cosine", seed=0)
    t = time.perf_counter()
    result = Trainer(dm, ds, cfg, output, collate=Collator(tok), progress=progress).train(overwrite=True)  # its own
    times["train"] = time.perf_counter() - t

    # the adapter is saved; fold it into the weights so generation runs at the base model's speed
    t = time.perf_counter()
    dm.merge()
    after = generate(dm, tok, prompts, max_new_tokens=60, chat=False, batch_size=20)
    dm.unmerge()
    bleu_after = bleu(after, refs)
    times["generate_after"] = time.perf_counter() - t
    for r, b, a in list(zip(eval_rows, before, after))[:SHOWN]:
        console.rule()
        console.print(f"[bold]MR[/bold]      {r['mr']}")
        console.print(f"[bold]before[/bold]  {b}")
        console.print(f"[bold]after[/bold]   {a}")
        console.print(f"[bold]ref[/bold]     {r['references'][0]}")
    console.rule()
    console.print(f"BLEU on {len(prompts)} unseen MRs: before {bleu_before:.1f}, after {bleu_after:.1f}; "
                  f"train loss {result.final_loss:.3f}, {result.tokens_per_second:.0f} tokens/s")
    console.print("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in times.items()))
    return {"bleu_before": round(bleu_before, 2), "bleu_after": round(bleu_after, 2), "adapter": str(output),
            "seconds": round(time.perf_counter() - t0, 1)}
