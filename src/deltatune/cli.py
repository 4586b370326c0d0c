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
    set_: list[str] = typer.Option([], "--set", help="Override a value, e.g. --set train.lr=1e-4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """Train a delta from a YAML run file.

    Example: deltatune train run.yaml --set train.steps=100 --resume
    """
    from .train.run import load_run_config, run

    try:
        cfg = load_run_config(config, set_)
        result = run(cfg, resume=resume, progress=not quiet)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    print(json.dumps({"steps": result.steps, "final_loss": result.final_loss, "eval": result.eval,
                      "tokens_per_s": round(result.tokens_per_second, 1), "adapter": str(result.adapter_dir)}))


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
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, MergeError) as e:
        _fail(e)
    print(json.dumps(result.summary()))


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


if __name__ == "__main__":
    app()
