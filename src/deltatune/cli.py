"""The ``deltatune`` command line: thin; it parses, calls the library, prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deltatune: train, inspect, merge and use parameter-efficient deltas.")
console = Console(stderr=True)


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}")
    raise typer.Exit(2)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run YAML (model, task, method, data, train, output)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output/checkpoints."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output folder holding an earlier run."),
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. --set train.lr=1e-4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Train a delta from a YAML run file.

    Example: deltatune train run.yaml --set train.steps=100 --resume
    """
    from .train.run import load_run_config, run

    try:
        cfg = load_run_config(config, set_)
        result = run(cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        _fail(e)
    print(json.dumps({"steps": result.steps, "final_loss": result.final_loss, "eval": result.eval,
                      "tokens_per_s": round(result.tokens_per_second, 1), "adapter": str(result.adapter_dir)}))


@app.command()
def continual(
    config: Path = typer.Argument(..., help="Continual run YAML (model, method, strategy, stream, eval, train, output)."),
    resume: bool = typer.Option(False, "--resume", help="Continue after the last task saved in output/tasks."),
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. --set strategy.memory=500 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
):
    """Learn a stream of tasks with a continual strategy; one accuracy matrix per eval file.

    Example: deltatune continual clinc.yaml --set strategy.name=simplecil
    """
    from .continual.config import load_continual_config, run_continual

    try:
        cfg = load_continual_config(config, set_)
        matrices = run_continual(cfg, resume=resume, progress=not quiet,
                                 report=None if quiet else (lambda s: console.print(escape(s))))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        _fail(e)
    print(json.dumps({"output": str(cfg.output), **{n: m.summary() for n, m in matrices.items()}}))


def _load(model: str, adapter: Path | None, allow_pickle: bool = False, **kw):
    from . import load_adapter
    from .models import load_pretrained

    m, tok = load_pretrained(model, **kw)
    if adapter is not None:
        m = load_adapter(m, adapter, allow_pickle=allow_pickle)
    return m, tok


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt (wrapped in the chat template where the model has one)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Short name, HF folder or .gguf file."),
    adapter: Path | None = typer.Option(None, "--adapter", help="Adapter folder to apply."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickle (.bin) adapter file."),
):
    """Generate text greedily, with or without an adapter.

    Example: deltatune generate --model smollm2-135m --adapter runs/e2e "Describe: name: Aromi, food: Thai"
    """
    from .generation import generate as gen

    try:
        m, tok = _load(model, adapter, allow_pickle)
        print(gen(m, tok, [prompt], max_new_tokens=max_new_tokens, chat=False if no_chat else None)[0])
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)


@app.command("eval")
def eval_(
    data: Path = typer.Option(..., "--data", help="JSONL/CSV/TSV file (text, prompt/completion, messages, text/label)."),
    model: str = typer.Option("smollm2-135m", "--model"),
    adapter: Path | None = typer.Option(None, "--adapter"),
    task: str = typer.Option("causal-lm", "--task", help="causal-lm or classification."),
    num_labels: int | None = typer.Option(None, "--num-labels"),
    max_length: int = typer.Option(512, "--max-length"),
    batch_size: int = typer.Option(8, "--batch-size"),
    bleu_max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="For BLEU on prompt/completion data."),
):
    """Evaluate: loss (and accuracy for classification, BLEU for prompt/completion data).

    Example: deltatune eval --model smollm2-135m --adapter runs/e2e --data eval.jsonl
    """
    from .train.evaluate import evaluate_file

    try:
        m, tok = _load(model, adapter, task=task, num_labels=num_labels)
        result = evaluate_file(m, tok, data, task=task, max_length=max_length, batch_size=batch_size,
                               max_new_tokens=bleu_max_new_tokens)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    print(json.dumps(result))


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Short name, HF folder or .gguf file."),
    targets: str = typer.Option("all-linear", "--targets",
                                help="all-linear, a regex, or comma-separated names/suffixes (q_proj,v_proj)."),
    exclude: str | None = typer.Option(None, "--exclude"),
    tree: bool = typer.Option(False, "--tree", help="Also print the module tree."),
):
    """Show what a target spec selects, with shapes and parameter counts.

    Example: deltatune inspect smollm2-135m --targets q_proj,v_proj
    """
    from . import inspect as dt_inspect
    from .models import load_pretrained

    def spec(s):  # a comma list or a plain name means names/suffixes; anything else is a regex
        if s is None or s == "all-linear":
            return s
        return [x.strip() for x in s.split(",")] if "," in s or re.fullmatch(r"[\w.\-]+", s) else s

    try:
        m, _ = load_pretrained(model)
        if tree:
            print(m)
        print(dt_inspect(m, targets=spec(targets), exclude=spec(exclude)))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@app.command("merge-adapter")
def merge_adapter(
    model: str = typer.Option(..., "--model"),
    adapter: Path = typer.Option(..., "--adapter"),
    out: Path = typer.Option(..., "--out", help="Folder for the merged full model (safetensors + config + tokenizer)."),
):
    """Merge an adapter into its base and write a full model folder.

    Example: deltatune merge-adapter --model smollm2-135m --adapter runs/e2e --out merged/
    """
    try:
        dm, tok = _load(model, adapter)
        plain = dm.merge_and_unload()
        plain.save_pretrained(out)
        tok.save_pretrained(out)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    print(json.dumps({"out": str(out)}))


def _target_spec(s: str | None):
    """``all-linear``, comma-separated names/suffixes (or one plain name), else a regex."""
    if s is None or s == "all-linear":
        return s
    return [x.strip() for x in s.split(",")] if "," in s or re.fullmatch(r"[\w.\-]+", s) else s


@app.command("extract-lora")
def extract_lora(
    base: str = typer.Option(..., "--base", help="Base model: HF folder of safetensors (or a short name)."),
    tuned: str = typer.Option(..., "--tuned", help="Fully fine-tuned model: HF folder of safetensors."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank (with --energy: the largest allowed)."),
    energy: float | None = typer.Option(None, "--energy",
                                        help="Per module, the smallest rank keeping this fraction of sum s_i^2."),
    targets: str = typer.Option("all-linear", "--targets",
                                help="all-linear, a regex, or comma-separated names/suffixes (q_proj,v_proj)."),
    exclude: str | None = typer.Option(None, "--exclude"),
    out: Path = typer.Option(..., "--out", help="Folder for the PEFT-format LoRA (+ extract_report.json)."),
):
    """Extract a LoRA from a full fine-tune: truncated SVD of each weight difference (B A ~ W_tuned - W_base).

    Example: deltatune extract-lora --base base/ --tuned tuned/ --rank 16 --out lora/
    """
    from .merge.extract import extract_lora as run

    try:
        report = run(base, tuned, out, rank=rank, energy=energy, targets=_target_spec(targets),
                     exclude=_target_spec(exclude))
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    print(json.dumps(report))


@app.command()
def compress(
    adapter: Path = typer.Argument(..., help="Adapter folder (adapter_config.json + adapter_model.safetensors)."),
    method: str = typer.Option(..., "--method", help="compeft, dare, rank or int8."),
    density: float = typer.Option(0.1, "--density", help="compeft/dare: fraction of entries kept, in (0, 1]."),
    rank: int | None = typer.Option(None, "--rank", help="rank: the new LoRA rank."),
    seed: int = typer.Option(0, "--seed", help="dare: random seed."),
    alpha: float = typer.Option(1.0, "--alpha", help="compeft: scale multiplier (scale = alpha * std)."),
    per_tensor: bool = typer.Option(False, "--per-tensor", help="int8: one scale per tensor, not per channel."),
    model: str | None = typer.Option(None, "--model", help="Also report the logits difference on this model."),
    out: Path = typer.Option(..., "--out", help="Folder for the compressed adapter (+ compress_report.json)."),
):
    """Compress an adapter (ComPEFT, DARE, LoRA rank truncation, int8); loads with dt.load_adapter as is.

    Example: deltatune compress runs/e2e --method compeft --density 0.1 --out runs/e2e-compeft
    """
    from .merge.compress import compress_adapter

    try:
        report = compress_adapter(adapter, out, method=method, density=density, rank=rank, seed=seed, alpha=alpha,
                                  per_channel=not per_tensor, model=model)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    print(json.dumps(report))


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param expects key=value (e.g. density=0.5), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@app.command(context_settings={"ignore_unknown_options": True})
def combine(
    adapters: list[str] = typer.Argument(..., help="Adapter folders (same method, same modules)."),
    weights: str = typer.Option(..., "--weights", help="One weight per adapter: --weights 0.5 0.5 (or 0.5,0.5)."),
    out: Path = typer.Option(..., "--out", help="Folder for the combined adapter."),
    method: str = typer.Option("linear", "--method", help="Merge operator: linear, task_arithmetic, ties, ..."),
    combination: str | None = typer.Option(None, "--combination", help="LoRA: cat (exact), svd or params."),
    rank: int | None = typer.Option(None, "--rank", help="Rank after --combination svd (default: the largest)."),
    param: list[str] = typer.Option([], "--param", help="Operator parameter key=value, e.g. density=0.5 (repeatable)."),
    ia3_space: str = typer.Option("log", "--ia3-space", help="IA3 scales: log or linear."),
    keep_modules_to_save: str = typer.Option("average", "--keep-modules-to-save", help="average, first or none."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) adapter files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Combine adapters into one: weighted sums, negation (weight -1), TIES, ... Prints the report as JSON.

    Example: deltatune combine A B --weights 0.5 0.5 --method ties --combination svd --rank 8 --out C
    """
    from .merge.combine import REPORT_NAME
    from .merge.combine import combine as run

    # click hands the values after the first one (and negative ones) over as arguments; numbers are weights
    values = [x for x in weights.split(",") if x.strip()] + [a for a in adapters if _number(a) is not None]
    folders = [a for a in adapters if _number(a) is None]
    try:
        bad = [a for a in folders if a.startswith("-")]
        if bad:
            raise ValueError(f"unknown option {bad[0]}")
        ws = [_number(x) for x in values]
        if None in ws:
            raise ValueError(f"--weights must be numbers, got {weights!r}")
        params = dict(_param(p) for p in param)
        path = run(folders, ws, method, out, combination=combination, rank=rank, ia3_space=ia3_space,
                   keep_modules_to_save=keep_modules_to_save, allow_pickle=allow_pickle, overwrite=overwrite, **params)
        report = json.loads((path / REPORT_NAME).read_text())
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        _fail(e)
    print(json.dumps({"out": str(path), **report}))


@app.command("merge")
def merge_checkpoints(
    recipe: Path = typer.Argument(..., help="Merge recipe YAML (method, base, models, params, dtype, out, ...)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (overrides the recipe's out)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) adapter files."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Merge full checkpoints out of core, one tensor at a time (TIES, task arithmetic, linear, ...).

    Example: deltatune merge ties.yaml --out merged/ --force
    """
    from rich.progress import Progress

    from .core.delta import MergeError
    from .merge.executor import merge

    try:
        with Progress(console=console, disable=quiet, transient=True) as bar:
            task = bar.add_task("merging", total=None)
            result = merge(recipe, out, force=force, allow_pickle=allow_pickle,
                           progress=lambda i, n, name: bar.update(task, completed=i, total=n))
    except (ValueError, OSError, KeyError, MergeError) as e:  # OSError: a full disk, a file gone (nothing is left)
        _fail(e)
    print(json.dumps(result.summary()))


@app.command()
def serve(
    model: str = typer.Option(..., "--model", help="Short name, HF folder or .gguf file (a causal LM)."),
    adapters: Path = typer.Option(..., "--adapters", help="Folder whose sub-folders are the adapters served."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="DELTATUNE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (or set DELTATUNE_API_KEY)."),
    model_name: str | None = typer.Option(None, "--model-name", help="Id clients use (default: from --model)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Rows per forward pass."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", help="How long an idle engine waits to batch."),
    max_adapters: int = typer.Option(16, "--max-adapters", help="Adapters loaded at once (LRU eviction)."),
    max_adapter_bytes: int = typer.Option(1 << 30, "--max-adapter-bytes", help="Bytes of adapters loaded at once."),
    max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens"),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Largest max_tokens a request may ask for."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes"),
    preload: list[str] = typer.Option([], "--preload", help="Adapter to load at start (repeatable)."),
    max_waiting: int = typer.Option(64, "--max-waiting", help="Requests waiting for the batch; beyond, 429."),
    allow_origin: list[str] = typer.Option([], "--allow-origin",
                                           help="A web page origin allowed to call (repeatable; others get 403)."),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Serve a model and its adapters over an OpenAI-compatible HTTP API (needs the ``serve`` extra).

    Requests name ``MODEL`` or ``MODEL:ADAPTER``; requests for different adapters share forward passes.

    Example: deltatune serve --model smollm2-135m --adapters runs/ --port 8000
    """
    try:
        from .serve.adapter_cache import AdapterError
        from .serve.app import Limits
        from .serve.server import serve as run
    except ImportError as e:
        _fail(ValueError(f"deltatune serve needs FastAPI and uvicorn: pip install 'deltatune[serve]' ({e})"))
    try:
        run(model, adapters, host=host, port=port, api_key=api_key, model_name=model_name, log_level=log_level,
            max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_adapters=max_adapters,
            max_adapter_bytes=max_adapter_bytes, preload=preload,
            limits=Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                          allowed_origins=tuple(allow_origin), max_waiting=max_waiting))
    except (ValueError, FileNotFoundError, KeyError, TypeError, NotImplementedError, AdapterError) as e:
        _fail(e)


@app.command()
def demo(
    steps: int = typer.Option(None, "--steps", help="Training steps (default: the demo's tuned value)."),
    output: Path = typer.Option(Path("runs/demo"), "--output"),
):
    """Fine-tune SmolLM2-135M-Instruct with LoRA on E2E NLG (shipped sample); BLEU before and after.

    Example: deltatune demo --output runs/demo
    """
    from .demo import run_demo

    result = run_demo(output=output, steps=steps)
    print(json.dumps(result))


@app.command()
def doctor(
    load: bool = typer.Option(True, "--load/--no-load", help="Load each embedded model (seconds each)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """What a bug report needs first: versions, threads, device, embedded models, optional extras.

    Exits 1 when an embedded model is missing, damaged or does not load, or a package is outside its range.
    Example: deltatune doctor --no-load
    """
    from rich.table import Table

    from .doctor import diagnose

    report = diagnose(load=load)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        out = Console()
        env = Table(show_header=False, box=None)
        for k, v in report.environment.items():
            env.add_row(f"[bold]{k}[/bold]", escape(v))
        out.print(env)
        mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[dim]absent[/dim]"}
        groups = {"embedded models": report.models, **{f"requirements: {g}": cs for g, cs in report.extras.items()}}
        for title, checks in groups.items():
            t = Table(title=title, title_justify="left", show_header=False, box=None)
            t.add_column(no_wrap=True)
            t.add_column(no_wrap=True)
            t.add_column(overflow="fold")  # a path in an error must survive a narrow terminal whole
            for c in checks:
                t.add_row(mark[c.ok], c.name, escape(c.detail))
            out.print(t)
        out.print("[green]all good[/green]" if report.ok else "[red]problems found (FAIL above)[/red]")
    raise typer.Exit(0 if report.ok else 1)


if __name__ == "__main__":
    app()
