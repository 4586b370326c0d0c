"""The demo's two promises, measured: wall time of ``deltatune demo`` (< 10 min on 2 cores) and BLEU rise (>= 10).

Runs the command in a fresh process exactly as a user would (after ``make setup``), parses its final JSON
line, and writes the ``demo`` section of benchmarks/RESULTS.md.

    python benchmarks/demo.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LIMIT_S, MIN_RISE = 600, 10.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        proc = subprocess.run(["deltatune", "demo", "--output", str(Path(tmp) / "demo")],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"deltatune demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = next((ln for ln in proc.stderr.splitlines() if ln.startswith("time:")), "time: n/a")
    rise = result["bleu_after"] - result["bleu_before"]
    ok_t, ok_b = wall < LIMIT_S, rise >= MIN_RISE
    info = C.machine_info()
    rows = [["wall time of `deltatune demo`", f"{wall:.0f} s", f"< {LIMIT_S} s: {'ok' if ok_t else 'MISSED'}"],
            ["BLEU before (60 unseen MRs)", f"{result['bleu_before']:.1f}", ""],
            ["BLEU after", f"{result['bleu_after']:.1f}", ""],
            ["BLEU rise", f"{rise:+.1f}", f">= {MIN_RISE:.0f}: {'ok' if ok_b else 'MISSED'}"]]
    headers = ["demo", "measured", "goal"]
    print(C.text_table(headers, rows))
    print(phases)
    if a.no_write:
        return
    body = "\n".join([
        "## The demo (`benchmarks/demo.py`)",
        "",
        f"Measured {info['date']} on {info['nproc']} cores ({info['cpu']}), load average at the end "
        f"{info.get('load average')}; torch {info['torch']}, transformers {info['transformers']}. "
        "`deltatune demo` in a fresh process (model already installed): SmolLM2-135M-Instruct, LoRA r=16 "
        "alpha=32 all-linear, 60 steps of batch 8 on the shipped E2E sample, greedy generation (60 new tokens) "
        f"on 60 unseen MRs before and after. Phases: {phases[len('time: '):]}.",
        "",
        C.markdown_table(headers, rows),
    ])
    C.write_section("demo", body)


if __name__ == "__main__":
    main()
