"""Serving benchmarks: many adapters on one base. Each part is an independent function chosen by ``--part``.

``--part routing``: the cost of a mixed-adapter batch. SmolLM2-135M, float32, CPU, 2 threads, a batch of
8 x 128 random token ids, LoRA r=16 alpha=32 on every linear layer but the output head (210 modules),
8 adapters with random non-zero A and B (``init="random"``; PEFT gets the very same weights). Timed
under ``torch.inference_mode()``, round-robin after a warm-up round, medians:

- the base model alone (no wrappers);
- deltatune with row i routed to adapter ``a{i % k}`` for k = 1, 2, 4, 8 distinct adapters
  (``dm(ids, adapters=[...])``), and one active adapter without routing, for reference;
- PEFT's mixed-batch inference (``model(ids, adapter_names=[...])``) for the same k.

It checks first that row i of the routed batch equals adapter i run alone (deltatune) and that deltatune and
PEFT agree, then writes the ``serve-routing`` section of ``benchmarks/RESULTS.md``. Goal: 8 distinct
adapters / base <= 1.15.

    python benchmarks/serve.py --part routing [--quick] [--reps N] [--no-write]

``--part decode``: one decoding step of a mixed batch, the step a serving loop repeats: 16 rows adding one token
each to a 48-token KV cache, with k = 1, 4, 8 distinct adapters (deltatune and PEFT), and deltatune with its
routing plans rebuilt before the step (as when the server's batch gains or loses a row). Writes ``serve-decode``.

    python benchmarks/serve.py --part decode [--quick] [--reps N] [--no-write]

``--part server``: the OpenAI-compatible server (``deltatune serve``) under load. SmolLM2-135M-Instruct, float32,
CPU; 64 LoRA adapters r=16 alpha=32 on every linear layer but the output head, A and B random and non-zero
(``init="random"``, seeds 0..63), saved to a temporary adapters folder. The server runs in its own process
(``python -m deltatune.cli serve --max-batch 16 --batch-wait-ms 10 --max-adapters 64``, OMP_NUM_THREADS=2), every
adapter preloaded; the clients are asyncio + httpx in this process, each sending one request at a time (closed
loop), ``POST /v1/chat/completions`` with a short prompt, ``temperature 0``, ``max_tokens 16`` and
``ignore_eos`` (so every request generates exactly 16 tokens):

1. 8 concurrent clients, 200 requests over 16 adapters (request i uses adapter ``a{i % 16}``): requests/s,
   p50/p95 latency, generated tokens/s; zero errors required.
2. tokens/s against the number of distinct adapters in the traffic (1, 4, 16, 64; and the base alone), 16
   concurrent clients, as S-LoRA reports it (throughput should stay flat as adapters multiply).

Writes the ``serve-server`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/serve.py --part server [--quick] [--no-write]

``--part faults``: 8 clients streaming over 8 adapters while a ninth sends bad requests back to back (sampling
edge cases, out-of-range seeds, broken JSON, hostile and broken adapters, NaN weights, cross-site posts): the good
requests' p50/p95 latency with and without the fault stream (goal: within 10%), and the bad requests' answers by
class (goal: no 5xx, no request left unanswered). Writes the ``serve-faults`` section of RESULTS.md.

    python benchmarks/serve.py --part faults [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    interleaved,
    load_smollm2,
    machine_info,
    markdown_table,
    median_ms,
    paired_ratio,
    random_batch,
    rss_mb,
    setup,
    text_table,
    write_section,
)

import deltatune as dt  # noqa: E402

THREADS, BATCH, SEQ, R, ALPHA, N_ADAPTERS = 2, 8, 128, 16, 32, 8
DISTINCT = (1, 2, 4, 8)
GOAL_ROUTED = 1.15
ROUTING_TEXT = (
    f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32), CPU, torch.set_num_threads({THREADS}), batch "
    f"{BATCH} x {SEQ} random token ids (seed 0), `torch.inference_mode()`, `eval()`. {N_ADAPTERS} LoRA adapters "
    f"r={R} alpha={ALPHA} on all linear layers except lm_head (210 modules each), A and B random and non-zero "
    f"(deltatune `init=\"random\"`, seeds 1..{N_ADAPTERS}; peft `init_lora_weights=False` with deltatune's A and "
    f"B copied in). With k distinct adapters, row i uses adapter `a{{i % k}}`: deltatune "
    f"`dm(input_ids=ids, adapters=[...])`, peft `model(input_ids=ids, adapter_names=[...])`."
)


SERVER_THREADS = 2
SERVE_R, SERVE_ALPHA, SERVE_TOKENS = 16, 32, 16
SERVE_ADAPTERS, SERVE_CLIENTS, SERVE_REQUESTS = 16, 8, 200
SWEEP = (0, 1, 4, 16, 64)  # distinct adapters in the traffic (0 = the base model alone)
SWEEP_CLIENTS, SWEEP_REQUESTS, MAX_BATCH = 16, 96, 16
PROMPTS = [
    "Describe the restaurant Aromi in one sentence.", "What is the capital of France?",
    "Write a haiku about the sea.", "Give me three tips for learning Python.", "Summarise: the cat sat on the mat.",
    "Translate 'good morning' into Spanish.", "Name a famous painting.", "Why is the sky blue?",
]


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {msg}", flush=True)


# -- routing part ------------------------------------------------------------------------------------
def rows_for(k: int) -> list[str]:
    """Row i uses adapter ``a{i % k}``: k distinct adapters spread over the batch."""
    return [f"a{i % k}" for i in range(BATCH)]


def build_routing_models(base: torch.nn.Module) -> tuple[dt.DeltaModel, torch.nn.Module]:
    """deltatune and PEFT models over copies of ``base``, each with the same adapters a0..a7."""
    from peft import LoraConfig, get_peft_model

    dm = None
    for i in range(N_ADAPTERS):
        torch.manual_seed(1 + i)
        cfg = dt.LoRAConfig(r=R, alpha=ALPHA, targets="all-linear", init="random")
        dm = dt.attach(copy.deepcopy(base), cfg, name=f"a{i}") if dm is None else dm.add(cfg, f"a{i}")
    pcfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), pcfg, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        pm.add_adapter(f"a{i}", pcfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for i in range(N_ADAPTERS):
            for path, d in dm.deltas(f"a{i}").items():
                m = inner.get_submodule(path)
                m.lora_A[f"a{i}"].weight.copy_(d.lora_A.weight)
                m.lora_B[f"a{i}"].weight.copy_(d.lora_B.weight)
    return dm.eval(), pm.eval()


def check_routing(dm: dt.DeltaModel, pm: torch.nn.Module, base: torch.nn.Module, ids: torch.Tensor,
                  log: Log) -> dict[str, float]:
    """Row i of the 8-adapter batch against adapter i alone; deltatune against PEFT; adapted against base."""
    rows = rows_for(N_ADAPTERS)
    with torch.inference_mode():
        routed = dm(input_ids=ids, adapters=rows).logits
        peft_routed = pm(input_ids=ids, adapter_names=rows).logits
        y0 = base(input_ids=ids).logits
        alone = 0.0
        for i, name in enumerate(rows):
            dm.activate(name)
            alone = max(alone, (dm(input_ids=ids[i:i + 1]).logits[0] - routed[i]).abs().max().item())
        dm.activate("a0")
    out = {"routed_vs_alone": alone, "dt_vs_peft": (routed - peft_routed).abs().max().item(),
           "adapted_vs_base": (routed - y0).abs().max().item()}
    log("checks: max |logit diff| routed vs each adapter alone {routed_vs_alone:.1e}, deltatune vs peft "
        "{dt_vs_peft:.1e}, adapted vs base {adapted_vs_base:.1e}".format(**out))
    return out


def part_routing(args: argparse.Namespace, log: Log) -> None:
    reps = args.reps or (2 if args.quick else 10)
    setup(THREADS)
    t = time.perf_counter()
    base = load_smollm2()
    log(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f} s")
    ids = random_batch(base.config.vocab_size, BATCH, SEQ)
    dm, pm = build_routing_models(base)
    log(f"built deltatune and peft with {N_ADAPTERS} adapters each, RSS {rss_mb():.0f} MB")
    checks = check_routing(dm, pm, base, ids, log)

    def run(fn: Callable[[], object]) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode():
                fn()
        return go

    fns: dict[str, Callable[[], None]] = {"base": run(lambda: base(input_ids=ids))}
    fns["dt one adapter, unrouted"] = run(lambda: dm(input_ids=ids))
    for k in DISTINCT:
        rows = rows_for(k)
        fns[f"dt k={k}"] = run(lambda rows=rows: dm(input_ids=ids, adapters=rows))
        fns[f"peft k={k}"] = run(lambda rows=rows: pm(input_ids=ids, adapter_names=rows))
    log(f"timing {len(fns)} candidates: {reps} round-robin rounds after 1 warm-up round")
    times = interleaved(fns, reps=reps, warmup=1, log=log)

    b = times["base"]
    ratio = {n: statistics.median(v) / statistics.median(b) for n, v in times.items()}
    goal_ok = ratio[f"dt k={N_ADAPTERS}"] <= GOAL_ROUTED
    headers = ["candidate", "median ms", "/ base", "paired / base", "goal"]
    rows = [["base forward", f"{median_ms(b):.0f}", "1.000", "", ""],
            ["deltatune, one adapter, no routing", f"{median_ms(times['dt one adapter, unrouted']):.0f}",
             f"{ratio['dt one adapter, unrouted']:.3f}", f"{paired_ratio(times['dt one adapter, unrouted'], b):.3f}",
             "(reference)"]]
    for who in ("dt", "peft"):
        for k in DISTINCT:
            n = f"{who} k={k}"
            goal = ""
            if who == "dt" and k == N_ADAPTERS:
                goal = f"<= {GOAL_ROUTED:.2f}: {'ok' if goal_ok else 'MISSED'}"
            label = f"{'deltatune' if who == 'dt' else 'peft adapter_names'}, {k} distinct"
            rows.append([label, f"{median_ms(times[n]):.0f}", f"{ratio[n]:.3f}", f"{paired_ratio(times[n], b):.3f}",
                         goal])
    print()
    print(text_table(headers, rows))
    info = machine_info()
    elapsed = time.perf_counter() - log.t0
    print(f"\ntotal {elapsed:.0f} s; " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if args.no_write or args.quick:
        log("not writing RESULTS.md (--no-write or --quick)")
        return
    md = [
        "## Serving: mixed-adapter batches (`benchmarks/serve.py --part routing`)",
        "",
        f"Run {info['date']}, {elapsed:.0f} s. Machine: nproc {info['nproc']} "
        f"({info['cpu']}), load average at the end {info.get('load average', 'n/a')}; Python {info['python']}, "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}.",
        "",
        "Configuration: " + ROUTING_TEXT,
        f"{reps} round-robin rounds over all candidates after one warm-up round; medians. '/ base' is the ratio "
        "of medians, 'paired' the median of per-round ratios.",
        "",
        f"Checks: max |logit difference| between row i of the {N_ADAPTERS}-adapter batch and adapter i run alone "
        f"{checks['routed_vs_alone']:.1e}; deltatune vs peft (same batch) {checks['dt_vs_peft']:.1e}; adapted vs "
        f"base {checks['adapted_vs_base']:.1e} (the deltas are not zero).",
        "",
        markdown_table(headers, rows),
        "",
        f"Goal: a batch whose rows use {N_ADAPTERS} distinct adapters costs <= {GOAL_ROUTED:.2f}x the base alone.",
        "",
        "<details><summary>raw times (ms, in round order)</summary>",
        "",
        *[f"- {k}: " + " ".join(f"{1e3 * s:.0f}" for s in v) for k, v in times.items()],
        "",
        "</details>",
    ]
    write_section("serve-routing", "\n".join(md))
    log("wrote the serve-routing section of benchmarks/RESULTS.md")



# -- decode part --------------------------------------------------------------------------------------
DECODE_ROWS, DECODE_CONTEXT, DECODE_DISTINCT = 16, 48, (1, 4, 8)


def part_decode(args: argparse.Namespace, log: Log) -> None:
    """One decoding step of a mixed batch (what the server runs most): 16 rows, 1 new token each, a 48-token cache."""
    reps = args.reps or (3 if args.quick else 20)
    setup(THREADS)
    base = load_smollm2()
    dm, pm = build_routing_models(base)
    ids = random_batch(base.config.vocab_size, DECODE_ROWS, DECODE_CONTEXT + 1)
    prompt, new = ids[:, :-1], ids[:, -1:]
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        cache0 = base(input_ids=prompt, use_cache=True).past_key_values

    def rows(k: int) -> list[str]:
        return [f"a{i % k}" for i in range(DECODE_ROWS)]

    def step(model, **kw) -> Callable[[], Callable[[], None]]:
        def prepare() -> Callable[[], None]:  # a fresh cache for every timed step (not timed)
            cache = copy.deepcopy(cache0)
            return lambda: model(input_ids=new, attention_mask=mask, past_key_values=cache, use_cache=True,
                                 logits_to_keep=1, **kw)
        return prepare

    def rebuilt(k: int) -> Callable[[], Callable[[], None]]:
        inner = step(dm, adapters=rows(k))

        def prepare() -> Callable[[], None]:
            dm._state.plans.clear()  # as when the server's batch changes rows: every site plans again
            return inner()
        return prepare

    cands: dict[str, Callable[[], Callable[[], None]]] = {"base": step(base)}
    for k in DECODE_DISTINCT:
        cands[f"dt k={k}"] = step(dm, adapters=rows(k))
    cands[f"dt k={DECODE_DISTINCT[-1]}, plans rebuilt"] = rebuilt(DECODE_DISTINCT[-1])
    for k in DECODE_DISTINCT:
        cands[f"peft k={k}"] = step(pm, adapter_names=rows(k))
    times: dict[str, list[float]] = {n: [] for n in cands}
    log(f"timing {len(cands)} candidates: {reps} round-robin rounds after 1 warm-up round")
    for r in range(reps + 1):
        for n, prepare in cands.items():
            fn = prepare()
            with torch.inference_mode():
                t = time.perf_counter()
                fn()
                dt_s = time.perf_counter() - t
            if r:
                times[n].append(dt_s)
    b = times["base"]
    headers = ["candidate", "median ms", "/ base", "paired / base"]
    table = [[n, f"{median_ms(v):.1f}", f"{statistics.median(v) / statistics.median(b):.3f}",
              f"{paired_ratio(v, b):.3f}"] for n, v in times.items()]
    print()
    print(text_table(headers, table))
    info = machine_info()
    if args.no_write or args.quick:
        log("not writing RESULTS.md (--no-write or --quick)")
        return
    body = "\n\n".join([
        "## Serving: one decoding step of a mixed batch (`benchmarks/serve.py --part decode`)",
        f"The same model and {N_ADAPTERS} adapters as the routing part (LoRA r={R}, all linear layers but lm_head), "
        f"{DECODE_ROWS} rows each adding 1 token to a {DECODE_CONTEXT}-token KV cache (a fresh copy per step, not "
        f"timed), `logits_to_keep=1`, {THREADS} threads; row i uses adapter `a{{i % k}}`. 'plans rebuilt': the routing "
        f"plans are dropped before each step, as happens in the server whenever its batch gains or loses a row. "
        f"{reps} round-robin rounds after one warm-up round, medians.",
        markdown_table(headers, table),
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ])
    write_section("serve-decode", body)
    log("wrote the serve-decode section of benchmarks/RESULTS.md")


# -- server part ---------------------------------------------------------------------------------------
def make_adapters(folder: Path, n: int, log: Log) -> int:
    """``n`` random LoRA adapters (a0 .. a{n-1}) for SmolLM2 in ``folder``; returns the bytes of one."""
    model = load_smollm2()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = dt.LoRAConfig(r=SERVE_R, alpha=SERVE_ALPHA, init="random")
    for i in range(n):
        torch.manual_seed(i)
        dm = dt.attach(model, cfg)
        dm.save(folder / f"a{i}")
        dm.delete("default")
    log(f"wrote {n} adapters to {folder}")
    return (folder / "a0" / "adapter_model.safetensors").stat().st_size


class ServerProcess:
    """``deltatune serve`` in a child process on a free port; ``url``; stopped on exit."""

    def __init__(self, adapters: Path, max_adapters: int, preload: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "deltatune.cli", "serve", "--model", "smollm2-135m", "--model-name", "smollm2",
                "--adapters", str(adapters), "--port", str(self.port), "--max-batch", str(MAX_BATCH),
                "--batch-wait-ms", "10", "--max-adapters", str(max_adapters), "--max-adapter-bytes", str(1 << 34),
                "--log-level", "warning", *[x for p in preload for x in ("--preload", p)]]
        env = {**os.environ, "OMP_NUM_THREADS": str(SERVER_THREADS), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(60)


async def _traffic(url: str, models: list[str], clients: int) -> dict:
    """Send one request per entry of ``models`` with ``clients`` concurrent closed-loop clients."""
    import httpx

    jobs = list(enumerate(models))
    latencies: list[float] = []
    errors: list[str] = []
    tokens = [0]

    async def client(c: httpx.AsyncClient) -> None:
        while jobs:
            i, model = jobs.pop(0)
            body = {"model": model, "max_tokens": SERVE_TOKENS, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            t = time.perf_counter()
            try:
                r = await c.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                tokens[0] += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"requests": len(models), "errors": len(errors), "first_error": errors[0] if errors else "",
            "wall_s": wall, "req_per_s": len(models) / wall, "tokens_per_s": tokens[0] / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18]}


def _decode_batches(url: str) -> tuple[float, float]:
    """(sum, count) of the server's decode batch-size histogram: rows per decode step, summed, and steps."""
    import httpx

    found = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f'deltatune_batch_size_{part}{{phase="decode"}}'):
                found[part] = float(line.split()[-1])
    return found.get("sum", 0.0), found.get("count", 0.0)


def _measured(url: str, models: list[str], clients: int) -> dict:
    """Run the traffic; add the mean number of rows per decode step the server ran meanwhile."""
    s0, c0 = _decode_batches(url)
    res = asyncio.run(_traffic(url, models, clients))
    s1, c1 = _decode_batches(url)
    res["mean_batch"] = (s1 - s0) / max(c1 - c0, 1)
    return res


def part_server(args: argparse.Namespace, log: Log) -> None:
    setup(threads=SERVER_THREADS)
    n_adapters = 4 if args.quick else max(SWEEP)
    spread = min(SERVE_ADAPTERS, n_adapters)
    n_requests = 16 if args.quick else SERVE_REQUESTS
    sweep_requests = 16 if args.quick else SWEEP_REQUESTS
    sweep = [k for k in SWEEP if k <= n_adapters]
    tmp = Path(tempfile.mkdtemp(prefix="dt-serve-bench-"))
    try:
        adapter_bytes = make_adapters(tmp, n_adapters, log)
        names = [f"a{i}" for i in range(n_adapters)]
        with ServerProcess(tmp, n_adapters, preload=names) as srv:
            log(f"server up at {srv.url} with {n_adapters} adapters preloaded")
            asyncio.run(_traffic(srv.url, ["smollm2:a0"] * SWEEP_CLIENTS, SWEEP_CLIENTS))  # warm-up
            models = [f"smollm2:a{i % spread}" for i in range(n_requests)]
            main = _measured(srv.url, models, SERVE_CLIENTS)
            log(f"{SERVE_CLIENTS} clients, {n_requests} requests over {spread} adapters: "
                f"{main['req_per_s']:.2f} req/s, p50 {main['p50_s']:.2f} s, p95 {main['p95_s']:.2f} s, "
                f"{main['tokens_per_s']:.1f} tok/s, {main['errors']} errors {main['first_error']}")
            rows = []
            for k in sweep:
                models = [f"smollm2:a{i % k}" if k else "smollm2" for i in range(sweep_requests)]
                res = _measured(srv.url, models, SWEEP_CLIENTS)
                rows.append((k or "base", res["tokens_per_s"], res["req_per_s"], res["p50_s"], res["mean_batch"],
                             res["errors"]))
                log(f"  {k or 'base'} distinct adapters: {res['tokens_per_s']:.1f} tok/s, {res['errors']} errors")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    errors = main["errors"] + sum(r[-1] for r in rows)
    head_main = ["clients", "requests", "adapters", "req/s", "p50 latency (s)", "p95 latency (s)", "tokens/s",
                 "rows per decode step", "errors"]
    row_main = [(SERVE_CLIENTS, n_requests, spread, main["req_per_s"], main["p50_s"], main["p95_s"],
                 main["tokens_per_s"], main["mean_batch"], main["errors"])]
    head_sweep = ["distinct adapters", "tokens/s", "req/s", "p50 latency (s)", "rows per decode step", "errors"]
    print(text_table(head_main, row_main))
    print(text_table(head_sweep, rows))
    if errors:
        raise SystemExit(f"{errors} request(s) failed; first: {main['first_error']}")
    if args.no_write or args.quick:
        log("not writing RESULTS.md (--no-write or --quick)")
        return
    info = machine_info()
    body = "\n\n".join([
        "## Serving: the OpenAI-compatible server (`benchmarks/serve.py --part server`)",
        f"SmolLM2-135M-Instruct (float32, CPU), `deltatune serve` in its own process (OMP_NUM_THREADS={SERVER_THREADS}, "
        f"--max-batch {MAX_BATCH}, --batch-wait-ms 10), LoRA r={SERVE_R} alpha={SERVE_ALPHA} on all linear layers "
        f"but lm_head, random non-zero A and B ({adapter_bytes / 2**20:.1f} MiB each), all preloaded. Closed-loop "
        f"clients (asyncio + httpx, same machine) send `POST /v1/chat/completions`, short prompts, greedy, "
        f"max_tokens={SERVE_TOKENS} with `ignore_eos`.",
        f"**{SERVE_CLIENTS} concurrent clients, {n_requests} requests over {SERVE_ADAPTERS} adapters**",
        markdown_table(head_main, row_main),
        f"**Throughput vs distinct adapters in the traffic** ({SWEEP_CLIENTS} clients, {sweep_requests} requests per setting; "
        "S-LoRA's view: it should stay flat)",
        markdown_table(head_sweep, rows),
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ])
    write_section("serve-server", body)
    log("wrote the serve-server section of benchmarks/RESULTS.md")


# -- faults: good traffic while a ninth client sends bad requests ----------------------------------------------
FAULT_CLIENTS, FAULT_SECONDS, FAULT_ADAPTERS = 8, 60, 8


def bad_requests(url_model: str) -> list[tuple[str, dict, bytes]]:
    """(path, headers, body) of requests a server must refuse alone: the issue's cases and more of the kind.

    Not here: ``temperature: 1e-300``, which is valid (it samples the greedy token; tests/test_serve.py): it would
    add real generations to the fault stream, not faults."""
    json_h = {"content-type": "application/json"}

    def body(**kw) -> bytes:
        import json

        return json.dumps({"model": url_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                           **kw}).encode()

    chat, comp, load = "/v1/chat/completions", "/v1/completions", "/v1/adapters/load"
    return [
        (chat, json_h, body(temperature=0.7, seed=2**70)),  # seed outside the generator's range
        (chat, json_h, body(top_p=0)), (chat, json_h, body(temperature=-1)), (chat, json_h, body(max_tokens=10**9)),
        (chat, json_h, body(stop=["x" * 1000])), (chat, json_h, body(n=3)), (chat, json_h, body(logit_bias={"1": 5})),
        (chat, json_h, b'{"model": "smollm2", "messages": ' + b"[" * 5000), (chat, json_h, b"{not json"),
        (chat, json_h, b"[]"), (comp, json_h, b'{"model": "smollm2", "prompt": [99999999]}'),
        (comp, json_h, b'{"model": "smollm2:' + b"a" * 400 + b'", "prompt": "hi"}'),
        (comp, json_h, b'{"model": "smollm2:../../etc", "prompt": "hi"}'),
        (comp, json_h, b'{"model": "smollm2:broken", "prompt": "hi"}'),  # adapter_config.json is []
        (load, json_h, b'{"name": "broken"}'), (load, json_h, b'{"name": "nan"}'),  # NaN weights
        (comp, json_h, b'{"model": "smollm2", "prompt": "' + b"word " * 5000 + b'"}'),  # over the 4096-token limit
        (chat, {"content-type": "text/plain", "origin": "https://evil.example"}, body()),  # a web page
        (chat, {"content-type": "text/plain"}, body()),
        (comp, json_h, b'{"model": "gpt-4", "prompt": "hi"}'),
    ]


async def _fault_stream(url: str, stop: asyncio.Event, counts: dict[str, int], firsts: dict[str, str]) -> None:
    import httpx

    reqs = bad_requests("smollm2")
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            path, headers, raw = reqs[i % len(reqs)]
            i += 1
            try:
                r = await c.post(path, content=raw, headers=headers)
                kind = f"{r.status_code // 100}xx"
                if r.status_code >= 500:
                    firsts.setdefault("5xx", f"{path} {raw[:120]!r}: {r.status_code} {r.text[:200]}")
            except httpx.TimeoutException:
                kind = "no answer in 30 s"
            counts[kind] = counts.get(kind, 0) + 1


async def _good_for(url: str, seconds: float, faults: bool) -> dict:
    """FAULT_CLIENTS closed-loop streaming clients for ``seconds``; with ``faults``, a ninth sends bad requests."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counts: dict[str, int] = {}
    firsts: dict[str, str] = {}
    stop = asyncio.Event()
    deadline = time.perf_counter() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = {"model": f"smollm2:a{i % FAULT_ADAPTERS}", "max_tokens": SERVE_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            i += FAULT_CLIENTS
            t = time.perf_counter()
            try:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    lines = [x async for x in r.aiter_lines() if x]
                ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if ok:
                latencies.append(time.perf_counter() - t)
            else:
                errors.append(f"{r.status_code}: {lines[-1][:200] if lines else ''}")

    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=FAULT_CLIENTS + 2)) as c:
        tasks = [asyncio.create_task(client(k, c)) for k in range(FAULT_CLIENTS)]
        fault = asyncio.create_task(_fault_stream(url, stop, counts, firsts)) if faults else None
        await asyncio.gather(*tasks)
        stop.set()
        if fault is not None:
            await fault
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"good": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else "",
            "p50_s": statistics.median(latencies), "p95_s": q[18], "fault_counts": counts, "first_5xx": firsts,
            "latencies": latencies}


def _broken_adapters(folder: Path) -> None:
    """Two adapters a server must refuse: a config that is a JSON list, and NaN weights."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder / "a0", folder / "broken")
    (folder / "broken" / "adapter_config.json").write_text("[]")
    shutil.copytree(folder / "a0", folder / "nan")
    w = load_file(str(folder / "nan" / "adapter_model.safetensors"))
    first = sorted(w)[0]
    w[first] = w[first].clone()
    w[first].view(-1)[0] = float("nan")
    save_file(w, str(folder / "nan" / "adapter_model.safetensors"))
    json.loads((folder / "nan" / "adapter_config.json").read_text())  # still a good config


async def _health_during_loads(url: str, folder: Path, loads: int, streaming: bool) -> dict:
    """/health latencies (polled every 20 ms) while ``loads`` fresh adapters are loaded and unloaded one after the
    other through the admin endpoint (with ``streaming``, while the 8 clients stream too)."""
    import httpx

    for j in range(loads):
        shutil.copytree(folder / "a0", folder / f"fresh{j}", dirs_exist_ok=True)
    done = asyncio.Event()
    lat: list[float] = []
    load_s: list[float] = []

    async def probe(c: httpx.AsyncClient) -> None:
        while not done.is_set():
            t = time.perf_counter()
            r = await c.get("/health")
            lat.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.02)

    async def admin(c: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.5)
        for j in range(loads):
            t = time.perf_counter()
            r = await c.post("/v1/adapters/load", json={"name": f"fresh{j}"})
            load_s.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            await c.post("/v1/adapters/unload", json={"name": f"fresh{j}"})
        done.set()

    async with httpx.AsyncClient(base_url=url, timeout=60) as c, httpx.AsyncClient(base_url=url, timeout=60) as a:
        good = asyncio.create_task(_good_for(url, 1e9, faults=False)) if streaming else None
        await asyncio.gather(probe(c), admin(a))
        if good is not None:
            good.cancel()
    return {"max_s": max(lat), "p99_s": statistics.quantiles(lat, n=100, method="inclusive")[98], "probes": len(lat),
            "load_s": statistics.median(load_s)}


FAULT_PAIRS = 6  # runs without and with faults, alternating: the machine's drift hits both alike


def part_faults(args: argparse.Namespace, log: Log) -> None:
    setup(threads=SERVER_THREADS)
    seconds = 10 if args.quick else FAULT_SECONDS
    pairs = 1 if args.quick else FAULT_PAIRS
    tmp = Path(tempfile.mkdtemp(prefix="dt-serve-faults-"))
    try:
        make_adapters(tmp, FAULT_ADAPTERS, log)
        _broken_adapters(tmp)
        names = [f"a{i}" for i in range(FAULT_ADAPTERS)]
        with ServerProcess(tmp, FAULT_ADAPTERS + 2, preload=names) as srv:
            asyncio.run(_good_for(srv.url, 5, faults=False))  # warm-up
            runs = {}
            for faults in (False, True) * pairs:
                res = asyncio.run(_good_for(srv.url, seconds / pairs, faults=faults))
                log(f"{'with' if faults else 'without'} faults: {res['good']} good, p50 {res['p50_s']:.3f} s, "
                    f"p95 {res['p95_s']:.3f} s, {res['errors']} errors, faults answered {res['fault_counts']}")
                runs.setdefault(faults, []).append(res)
            health = {streaming: asyncio.run(_health_during_loads(srv.url, tmp, 3 if args.quick else 10, streaming))
                      for streaming in (False, True)}
            for streaming, h in health.items():
                log(f"/health while adapters load{' under streaming' if streaming else ''}: max {h['max_s'] * 1000:.0f} "
                    f"ms, p99 {h['p99_s'] * 1000:.0f} ms over {h['probes']} probes (a load takes {h['load_s']:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def pooled(rs: list[dict]) -> dict:
        lat = [x for r in rs for x in r["latencies"]]
        return {"good": len(lat), "errors": sum(r["errors"] for r in rs), "p50_s": statistics.median(lat),
                "p95_s": statistics.quantiles(lat, n=20)[18]}

    base, hit = pooled(runs[False]), pooled(runs[True])
    counts: dict[str, int] = {}
    for r in runs[True]:
        for k, v in r["fault_counts"].items():
            counts[k] = counts.get(k, 0) + v
    first_5xx = next((r["first_5xx"]["5xx"] for r in runs[True] if r["first_5xx"]), "")
    head = ["traffic", "good requests", "good errors", "p50 (s)", "p95 (s)", "bad requests: 2xx / 4xx / 5xx / no answer"]
    rows = [("8 streaming clients", base["good"], base["errors"], base["p50_s"], base["p95_s"], "-"),
            ("8 streaming clients + 1 sending bad requests", hit["good"], hit["errors"], hit["p50_s"], hit["p95_s"],
             f"{counts.get('2xx', 0)} / {counts.get('4xx', 0)} / {counts.get('5xx', 0)} / "
             f"{counts.get('no answer in 30 s', 0)}")]
    ratio50, ratio95 = hit["p50_s"] / base["p50_s"], hit["p95_s"] / base["p95_s"]
    print(text_table(head, rows))
    verdict = (f"p50 {ratio50:.2f}x, p95 {ratio95:.2f}x the fault-free run (goal <= 1.10x); "
               f"{counts.get('5xx', 0)} 5xx (goal 0){'; first: ' + first_5xx if first_5xx else ''}")
    log(verdict)
    idle, busy = health[False], health[True]
    health_line = (f"`/health` polled every 20 ms while adapters (each {idle['load_s']:.2f} s to load, r={SERVE_R}) are "
                   f"loaded and unloaded one after another through `/v1/adapters/load`: idle server max "
                   f"{idle['max_s'] * 1000:.0f} ms (p99 {idle['p99_s'] * 1000:.0f} ms, {idle['probes']} probes); while "
                   f"the 8 clients stream max {busy['max_s'] * 1000:.0f} ms (p99 {busy['p99_s'] * 1000:.0f} ms, "
                   f"{busy['probes']} probes) (goal: within 100 ms).")
    log(health_line)
    if args.no_write or args.quick:
        log("not writing RESULTS.md (--no-write or --quick)")
        return
    info = machine_info()
    body = "\n\n".join([
        "## Serving: faults (`benchmarks/serve.py --part faults`)",
        f"SmolLM2-135M-Instruct (float32, CPU), `deltatune serve` in its own process (OMP_NUM_THREADS="
        f"{SERVER_THREADS}, --max-batch {MAX_BATCH}), {FAULT_ADAPTERS} LoRA adapters r={SERVE_R} preloaded. "
        f"{FAULT_CLIENTS} closed-loop clients stream `POST /v1/chat/completions` (greedy, max_tokens={SERVE_TOKENS}, "
        f"`ignore_eos`) over the adapters; in the fault runs a ninth client sends, back to back, {len(bad_requests('m'))} "
        f"kinds of bad request (sampling edge cases, seeds out of range, nested or broken JSON, unknown, hostile and "
        f"broken adapters, NaN weights, over-long prompts, cross-site text/plain). {2 * pairs} runs of "
        f"{seconds / pairs:.0f} s, alternately without and with faults (the machine's drift hits both alike); p50 and "
        f"p95 over all the good requests of each kind.",
        markdown_table(head, rows),
        verdict + ".",
        health_line,
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
    ])
    write_section("serve-faults", body)
    log("wrote the serve-faults section of benchmarks/RESULTS.md")


PARTS: dict[str, Callable[[argparse.Namespace, Log], None]] = {
    "routing": part_routing, "decode": part_decode, "server": part_server, "faults": part_faults}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=sorted(PARTS), required=True, help="which benchmark to run")
    ap.add_argument("--quick", action="store_true", help="a smoke run (routing: 2 rounds; server: fewer adapters "
                    "and requests, no RESULTS.md)")
    ap.add_argument("--reps", type=int, default=None, help="routing/decode: timed rounds (default 10/20, --quick 2/3)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    PARTS[args.part](args, Log())


if __name__ == "__main__":
    main()
