"""Out-of-core checkpoint merging: ``deltatune merge`` vs ``mergekit-yaml`` on the same TIES recipe.

Inputs (built once, cached under ``--work``): SmolLM2-135M-Instruct (the GGUF dequantised to float32,
saved as an HF safetensors folder with its config and tokenizer) and three "fine-tunes": the base with
small seeded random perturbations of every tensor (``theta + 0.01 std(theta) N(0, 1)``), float32, about
540 MB each, with the base's config and tokenizer. Recipe: TIES, density 0.5, weights 0.5 / 0.3 / 0.2,
normalize, float32 output.

Each tool runs in its own fresh process (``python -m deltatune.cli merge`` and ``mergekit-yaml
--no-write-model-card``, offline, CPU, default threads); wall time and the process's peak resident set
size (GNU ``time -f %M``; it counts memory-mapped file pages too) are measured from outside.
Then the two outputs are compared tensor by tensor (max |difference|). ``--small`` does the same on a
tiny random Llama (seconds) to prove the script works; it writes RESULTS.md only with ``--results``.

    python benchmarks/merge_ckpt.py [--work /tmp/dt-merge-bench] [--reps 1] [--small] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5
GOAL_MB = 1024


# -- inputs ----------------------------------------------------------------------------------------
def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built from its config without ``quantization_config``: a GGUF-loaded
    model refuses ``save_pretrained`` (shared/NOTES.md)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and plain.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit the plain model: missing {missing}, unexpected {result.unexpected_keys}")
    plain.tie_weights()
    return plain.eval()


def build_inputs(work: Path, small: bool) -> dict[str, Path]:
    """base + ft0..ft2 under ``work`` (reused when already complete)."""
    paths = {"base": work / "base", **{f"ft{i}": work / f"ft{i}" for i in range(3)}}
    done = work / "READY.json"
    if done.is_file() and all((p / "config.json").is_file() for p in paths.values()):
        return paths
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from safetensors.torch import load_file, save_file

    if small:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, tie_word_embeddings=True))
        model.save_pretrained(paths["base"], safe_serialization=True)
    else:
        from deltatune import load_pretrained

        gguf, tok = load_pretrained("smollm2-135m")
        plain = plain_copy(gguf)
        del gguf
        plain.save_pretrained(paths["base"], safe_serialization=True)
        tok.save_pretrained(paths["base"])
        del plain
    base = load_file(str(paths["base"] / "model.safetensors"))
    extra = [f for f in paths["base"].iterdir() if f.name != "model.safetensors"]
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        ft = {k: (t + 0.01 * t.float().std().nan_to_num(0) * torch.randn(t.shape, generator=g)).to(t.dtype)
              for k, t in base.items()}
        paths[f"ft{i}"].mkdir()
        save_file(ft, str(paths[f"ft{i}"] / "model.safetensors"), metadata={"format": "pt"})
        del ft
        for f in extra:
            shutil.copy2(f, paths[f"ft{i}"] / f.name)
    done.write_text(json.dumps({"small": small, "tensors": len(base),
                                "bytes": sum(t.numel() * t.element_size() for t in base.values())}))
    return paths


def recipes(work: Path, paths: dict[str, Path]) -> tuple[Path, Path]:
    fts = [paths[f"ft{i}"] for i in range(3)]
    dt_recipe = {"method": "ties", "base": str(paths["base"]), "dtype": "float32", "params": {"normalize": True},
                 "models": [{"model": str(m), "weight": w, "density": DENSITY} for m, w in zip(fts, WEIGHTS)]}
    mk_recipe = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
                 "parameters": {"normalize": True},
                 "models": [{"model": str(m), "parameters": {"weight": w, "density": DENSITY}}
                            for m, w in zip(fts, WEIGHTS)]}
    a, b = work / "deltatune.yaml", work / "mergekit.yaml"
    a.write_text(json.dumps(dt_recipe, indent=2))  # JSON is YAML
    b.write_text(json.dumps(mk_recipe, indent=2))
    return a, b


# -- measuring -------------------------------------------------------------------------------------
TIME = shutil.which("time") or "/usr/bin/time"


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process.

    The peak is measured by GNU ``time -f %M`` around the command: ``ru_maxrss`` of a child reaped by this
    (large) process would start from this process's own RSS at fork time, which Linux carries across exec.
    """
    if not Path(TIME).is_file():
        raise SystemExit("GNU time (/usr/bin/time) is needed to measure each tool's peak RSS")
    t = time.perf_counter()
    proc = subprocess.run([TIME, "-f", "MAXRSS_KB %M", *cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    kb = [line for line in err.splitlines() if line.startswith("MAXRSS_KB ")]
    return wall, int(kb[-1].split()[1]) / 1024


def compare(a: Path, b: Path) -> tuple[float, int, int]:
    """Max |a - b| over all tensors (read one at a time), the number of differing entries, the tensor count."""
    from deltatune.merge.shards import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.tensors) != set(cb.tensors):
        raise RuntimeError(f"different tensor sets: {sorted(set(ca.tensors) ^ set(cb.tensors))[:10]}")
    worst, differ = 0.0, 0
    for name in ca.tensors:
        d = (ca.read(name).float() - cb.read(name).float()).abs()
        if d.numel():
            worst = max(worst, d.max().item())
            differ += int((d > 0).sum())
    return worst, differ, len(ca.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dt-merge-bench"), help="cache of inputs and outputs")
    ap.add_argument("--small", action="store_true", help="a tiny random Llama instead of SmolLM2 (smoke run)")
    ap.add_argument("--reps", type=int, default=1, help="runs per tool (alternating); medians reported")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--results", type=Path, default=None, help="the results file (default: benchmarks/RESULTS.md; "
                                                               "--small writes one only when given)")
    args = ap.parse_args()
    C.quiet_transformers()
    work = args.work / ("small" if args.small else "smollm2")
    t0 = time.perf_counter()
    paths = build_inputs(work, args.small)
    info = json.loads((work / "READY.json").read_text())
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s: base + 3 fine-tunes, {info['tensors']} tensors, "
          f"{info['bytes'] / 1e6:.0f} MB each", flush=True)
    dt_yaml, mk_yaml = recipes(work, paths)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    mk_exe = shutil.which("mergekit-yaml") or "mergekit-yaml"
    cmds = {
        "deltatune": [sys.executable, "-m", "deltatune.cli", "merge", str(dt_yaml), "--out", str(work / "out-dt"),
                      "--force", "--quiet"],
        "mergekit": [mk_exe, str(mk_yaml), str(work / "out-mk"), "--no-write-model-card", "--quiet"]
                    + (["--no-copy-tokenizer"] if args.small else []),
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for r in range(args.reps):
        for name in (list(cmds) if r % 2 == 0 else list(cmds)[::-1]):
            shutil.rmtree(work / f"out-{name[:2]}", ignore_errors=True)
            runs[name].append(_run(cmds[name], env))
            print(f"  {name}: {runs[name][-1][0]:.1f} s, peak RSS {runs[name][-1][1]:.0f} MB", flush=True)
    diff, differ, n = compare(work / "out-dt", work / "out-mk")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in runs.items()}
    (dt_s, dt_mb), (mk_s, mk_mb) = med["deltatune"], med["mergekit"]
    ok_mem = dt_mb < GOAL_MB and dt_mb <= mk_mb
    rows = [["deltatune merge", f"{dt_s:.1f}", f"{mk_s / dt_s:.2f}x", f"{dt_mb:.0f}",
             f"< {GOAL_MB} and <= mergekit: {'ok' if ok_mem else 'missed'}; speed >= mergekit: "
             f"{'ok' if dt_s <= mk_s else 'missed'}"],
            ["mergekit-yaml", f"{mk_s:.1f}", "1.00x", f"{mk_mb:.0f}", "(reference)"]]
    headers = ["tool", "wall s", "speed vs mergekit", "peak RSS MB", "goal"]
    print(C.text_table(headers, rows))
    agree = (f"outputs over {n} tensors: max |deltatune - mergekit| = {diff:.2e}, {differ} entries differ "
             f"(TIES keeps the top-k |tau|; where |tau| ties at the k-th value, torch.topk (deltatune) and "
             f"argsort (mergekit) may keep different entries)")
    print(agree)
    m = C.machine_info()
    body = (
        "## Out-of-core checkpoint merge: `deltatune merge` vs `mergekit-yaml` (`benchmarks/merge_ckpt.py`)\n\n"
        f"Measured {m['date']} on {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, load average at the end "
        f"{m.get('load average', '?')}; {'tiny random Llama (--small)' if args.small else 'SmolLM2-135M-Instruct'}"
        f" base + 3 fine-tunes (base + 0.01 std-scaled seeded noise on every tensor), float32, "
        f"{info['bytes'] / 1e6:.0f} MB each, {info['tensors']} tensors. Recipe: TIES, density {DENSITY}, weights "
        f"{' / '.join(map(str, WEIGHTS))}, normalize, float32 out. Each tool in its own process (CPU, default "
        f"threads, offline); peak RSS = GNU `time -f %M` of the process; {args.reps} run(s) each, medians.\n\n"
        + C.markdown_table(headers, rows)
        + f"\n\n{agree[0].upper()}{agree[1:]}.\n"
    )
    results = args.results if args.results is not None else (None if args.small else C.RESULTS)
    if not args.no_write and results is not None:
        C.write_section("merge-ckpt", body, results)
        print(f"wrote the merge-ckpt section of {results}")


if __name__ == "__main__":
    main()
