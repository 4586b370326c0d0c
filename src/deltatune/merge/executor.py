"""Out-of-core checkpoint merging (``deltatune merge RECIPE.yaml``): one tensor at a time, streamed to disk.

For every tensor of the reference model (the base, or the first model when the operator needs none):
read it from each input (``safe_open``, memory-mapped, file closed after the read), apply the adapter of a
``model+adapter`` input to it, merge with ``ops.apply``, cast to the output dtype, append its bytes to the
output shard, drop it. Peak memory is the inputs of one tensor plus the operator's temporaries. Large
tensors are merged in blocks of rows when the operator's spec allows it (``OpSpec.blockwise``):
``elementwise`` operators (linear, task arithmetic) block by block, identical to the whole tensor;
``magnitude`` ones (TIES, magnitude pruning) after a first pass that finds each model's magnitude cut-off
over the whole tensor, one model at a time (identical unless magnitudes tie at the cut-off, where the
whole-tensor top-k keeps an arbitrary subset of the tied entries and the cut-off keeps them all).

Before anything is written, everything is checked: the recipe against the operator, every input's
tensor names and shapes against the reference (ONE error lists every missing, extra or mismatched
tensor, with files and shapes), adapters against their models, and every tensor's resolved parameters by
a dry run of the operator. Then the output goes to a temporary folder next to ``out`` and is renamed into
place at the very end; an exception or Ctrl-C removes it, so ``out`` never holds a partial merge.

Layout of the output: shards ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
(or one ``model.safetensors`` when everything fits in one shard, as ``save_pretrained`` does), the
reference's ``config.json`` (dtype updated), ``generation_config.json`` and tokenizer files.

Decisions:
- The output has exactly the reference's tensors. A model that lacks a tied output head
  (``lm_head.weight`` when its config ties word embeddings) is read from its input embedding instead;
  any other missing or extra tensor is an error (an extra tensor would otherwise be silently dropped).
- Non-floating-point tensors (integer buffers) are not merged: they are copied from the reference.
- Random operators get a generator seeded per tensor from ``seed`` and the tensor name, so a tensor's
  result does not depend on the order or the set of other tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.delta import MergeError
from . import ops
from .adapted import AdapterOnRead
from .recipe import ModelRef, Recipe, layer_positions, load_recipe
from .shards import INDEX, SINGLE, Checkpoint, ShardWriter, TensorInfo, shard_plan
from .sparsify import magnitude_cutoff

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                    "tok_embeddings.weight", "shared.weight")
CHUNK_ELEMENTS = 1 << 22  # rows per block of an elementwise merge: about 4M entries (16 MB in float32)


class MergeInputError(ValueError):
    """Inputs that do not fit together (missing, extra or mismatched tensors); lists every problem."""


@dataclass
class MergeResult:
    out: Path
    method: str
    models: int
    tensors: int
    shards: int
    bytes: int
    seconds: float
    dtype: str | None
    tied: list[str] = field(default_factory=list)     # "<model>: lm_head.weight <- model.embed_tokens.weight"
    copied: list[str] = field(default_factory=list)   # non-float tensors taken from the reference

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "method": self.method, "models": self.models, "tensors": self.tensors,
                "shards": self.shards, "bytes": self.bytes, "seconds": round(self.seconds, 2), "dtype": self.dtype,
                "tied": self.tied, "copied": self.copied}


class Input:
    """One input checkpoint, with its adapter (if any) and tied-head aliases."""

    def __init__(self, ref: ModelRef, allow_pickle: bool = False):
        self.ref = ref
        self.ckpt = Checkpoint(ref.path)
        self.adapter = AdapterOnRead(ref.adapter, self.ckpt, allow_pickle) if ref.adapter else None
        self.aliases: dict[str, str] = {}

    def info(self, name: str) -> TensorInfo | None:
        return self.ckpt.tensors.get(self.aliases.get(name, name))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        src = self.aliases.get(name, name)
        if self.adapter is not None and self.adapter.touches(src):
            t = self.adapter.apply(src, self.ckpt.read)
            return t if rows is None else t[rows[0]:rows[1]]
        return self.ckpt.read(src, rows)

    def ties_embeddings(self) -> bool:
        cfg = self.ckpt.folder / "config.json"
        try:
            data = json.loads(cfg.read_text()) if cfg.is_file() else {}
        except (OSError, json.JSONDecodeError):
            data = {}
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
        return bool(text.get("tie_word_embeddings", data.get("tie_word_embeddings", True)))


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype   # output dtype
    params: dict[str, Any] | None  # None: copied from the reference (not floating point)


def _check_inputs(ref: Input, others: list[Input]) -> list[str]:
    """Every problem between the reference's tensors and each other input's (empty when they fit)."""
    problems = []
    names = ref.ckpt.tensors
    for inp in others:
        have = inp.ckpt.tensors
        for name in names:
            if name not in have and name.endswith(OUTPUT_HEADS) and inp.ties_embeddings():
                emb = next((n for n in have if n.endswith(INPUT_EMBEDDINGS) and have[n].shape == names[name].shape),
                           None)
                if emb is not None:
                    inp.aliases[name] = emb
        missing = [n for n in names if inp.info(n) is None]
        extra = [n for n in have if n not in names and n not in inp.aliases.values()]
        shapes = [(n, names[n].shape, inp.info(n).shape) for n in names
                  if inp.info(n) is not None and inp.info(n).shape != names[n].shape]
        for n in missing:
            problems.append(f"{inp.ref}: missing tensor {n!r} (shape {names[n].shape} in {ref.ref})")
        for n in extra:
            hint = " (the reference ties it to the input embedding)" if n.endswith(OUTPUT_HEADS) else ""
            problems.append(f"{inp.ref}: extra tensor {n!r} in {have[n].file.name}, not in {ref.ref}{hint}")
        for n, want, got in shapes:
            problems.append(f"{inp.ref}: tensor {n!r} has shape {got} in {inp.info(n).file.name}, "
                            f"but {want} in {ref.ref}")
    return problems


def _plan(recipe: Recipe, spec: ops.OpSpec, ref: Input) -> list[_Item]:
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    t = layer_positions(ref.ckpt.tensors)
    items, tried = [], set()
    n = len(recipe.models)
    for name, info in ref.ckpt.tensors.items():
        if not info.dtype.is_floating_point:
            items.append(_Item(name, info.shape, info.dtype, None))
            continue
        params = recipe.resolve(name, t[name])
        key = (len(info.shape), repr(sorted(params.items())))
        if key not in tried:  # a dry run on tiny random tensors catches bad values before any tensor is read
            tried.add(key)
            g = torch.Generator().manual_seed(0)
            shape = (2,) * max(1, len(info.shape))
            xs = [torch.randn(shape, generator=g) for _ in range(n + 1)]
            try:
                probe = ops.apply(spec.name, xs[1:], xs[0] if spec.needs_base else None, seed=0, **params)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{spec.name} at tensor {name!r} with {params}: {e}") from None
            if not torch.isfinite(probe).all():
                raise ValueError(f"{spec.name} at tensor {name!r} with {params}: gives inf or NaN on finite "
                                 f"inputs; check the parameters (an inf weight?)")
        items.append(_Item(name, info.shape, dtype or info.dtype, params))
    return items


def _open_all(refs: list[ModelRef], allow_pickle: bool) -> list[Input]:
    """Open every input (headers, adapters); ONE error lists every input that cannot be opened."""
    out, errors = [], []
    for r in refs:
        try:
            out.append(Input(r, allow_pickle))
        except (FileNotFoundError, ValueError) as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        cls = FileNotFoundError if all(isinstance(e, FileNotFoundError) for e in errors) else MergeInputError
        raise cls("cannot open the inputs:\n  " + "\n  ".join(str(e) for e in errors))
    return out


def _check_out(out: Path, force: bool, inputs: list[Input]) -> None:
    """``out`` must not overlap any input (a checkpoint or an adapter folder: the same, inside, or around it):
    replacing it, even with --force, would delete what the merge reads."""
    target = out.resolve()
    for inp in inputs:
        for folder in [inp.ckpt.folder] + ([Path(inp.ref.adapter)] if inp.ref.adapter else []):
            folder = folder.resolve()
            if folder == target or target in folder.parents or folder in target.parents:
                raise ValueError(f"out {out} would replace the input {folder} (of {inp.ref}) or overlap it; the "
                                 f"output must be a folder of its own: choose another one")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; pass --force (force=True) to replace it")


def _check_space(out: Path, nbytes: int) -> None:
    """Refuse up front when the disk holding ``out`` has less room than the merged tensors need."""
    where = out.resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < nbytes:
        raise MergeError(f"the merged model needs {nbytes / 2**30:.2f} GiB, but the disk holding {where} has "
                         f"{free / 2**30:.2f} GiB free; free some space or choose another output folder")


def merge(recipe: Recipe | str | Path | dict, out: str | Path | None = None, *, force: bool = False,
          allow_pickle: bool = False, progress: Callable[[int, int, str], None] | None = None) -> MergeResult:
    """Run a merge recipe out of core and write the merged model folder to ``out`` (default: the recipe's).

    ``progress(i, n, name)`` is called after each tensor. Raises before writing anything if the recipe, the
    inputs or an adapter do not fit; the output appears at ``out`` only when complete.
    """
    started = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out if out is not None else recipe.out or "")
    if not str(out) or out == Path():
        raise ValueError("no output folder: set out: in the recipe or pass one")
    spec = ops.get(recipe.method)
    refs = [m.ref for m in recipe.models] + ([recipe.base] if recipe.base is not None else [])
    opened = _open_all(refs, allow_pickle)
    models, base = opened[:len(recipe.models)], (opened[-1] if recipe.base is not None else None)
    ref = base if base is not None else models[0]
    _check_out(out, force, models + ([base] if base else []))
    problems = _check_inputs(ref, [m for m in models if m is not ref])
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise MergeInputError("the inputs do not fit together:\n  " + "\n  ".join(shown))
    items = _plan(recipe, spec, ref)
    _check_space(out, sum(_nbytes(i.shape, i.dtype) for i in items))

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        shards = _write(tmp, items, recipe, spec, models, base, ref, progress)
        _copy_files(ref.ckpt.folder, tmp, recipe.dtype)
        _finish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tied = [f"{m.ref}: {k} <- {v}" for m in models for k, v in m.aliases.items()]
    return MergeResult(out, spec.name, len(models), len(items), shards,
                       sum(_nbytes(i.shape, i.dtype) for i in items),
                       time.perf_counter() - started, recipe.dtype, tied,
                       [i.name for i in items if i.params is None])


def _write(tmp: Path, items: list[_Item], recipe: Recipe, spec: ops.OpSpec, models: list[Input],
           base: Input | None, ref: Input, progress: Callable[[int, int, str], None] | None) -> int:
    entries = [(i.name, i.dtype, i.shape) for i in items]
    plan = shard_plan(entries, recipe.shard_size)
    files = ([SINGLE] if len(plan) == 1 else
             [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])
    done = 0
    for file, idx in zip(files, plan):
        writer = ShardWriter(tmp / file, [entries[i] for i in idx])
        try:
            for i in idx:
                it = items[i]
                blocks = _blocks(it, spec)
                if len(blocks) > 1 and spec.blockwise == "magnitude":
                    it = _with_cutoffs(it, blocks, spec, models, base)
                for rows in blocks:
                    writer.write(it.name, _merge_one(it, rows, recipe, spec, models, base, ref))
                done += 1
                if progress is not None:
                    progress(done, len(items), it.name)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(shape, dt) for _, dt, shape in entries)},
                 "weight_map": {entries[i][0]: f for f, idx in zip(files, plan) for i in idx}}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(plan)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def _blocks(it: _Item, spec: ops.OpSpec) -> list[tuple[int, int] | None]:
    numel = torch.Size(it.shape).numel()
    if it.params is None or spec.blockwise is None or not it.shape or numel <= CHUNK_ELEMENTS:
        return [None]
    if spec.blockwise == "magnitude" and (it.params.get("rescale", "none") != "none"):
        return [None]  # a norm over the whole tensor: no blocks
    per_row = max(1, numel // it.shape[0])
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(a, min(a + step, it.shape[0])) for a in range(0, it.shape[0], step)]


def _with_cutoffs(it: _Item, blocks: list[tuple[int, int]], spec: ops.OpSpec, models: list[Input],
                  base: Input | None) -> _Item:
    """First pass of a block-wise magnitude trim: each model's cut-off over the WHOLE tensor, computed
    one model at a time from ``|tau_i|`` gathered block by block (one float32 copy of the tensor)."""
    density = it.params.get("density", spec.defaults.get("density", 1.0))
    density = [float(density)] * len(models) if isinstance(density, (int, float)) else [float(d) for d in density]
    numel = torch.Size(it.shape).numel()
    per_row = numel // it.shape[0]
    cutoffs = []
    for m, d in zip(models, density):
        if d >= 1:
            cutoffs.append(0.0)
            continue
        mags = torch.empty(numel, dtype=torch.float32)
        for a, b in blocks:
            tau = m.read(it.name, (a, b)).float() - base.read(it.name, (a, b)).float()
            mags[a * per_row:b * per_row] = tau.abs_().reshape(-1)
            del tau
        cutoffs.append(magnitude_cutoff(mags, d))
        del mags
    return replace(it, params={**it.params, "cutoff": cutoffs})


def _merge_one(it: _Item, rows: tuple[int, int] | None, recipe: Recipe, spec: ops.OpSpec, models: list[Input],
               base: Input | None, ref: Input) -> Tensor:
    if it.params is None:
        return ref.read(it.name)
    tensors = [m.read(it.name, rows) for m in models]
    b = base.read(it.name, rows) if (base is not None and spec.needs_base) else None
    seed = None
    if spec.random:
        seed = (recipe.seed + zlib.crc32(f"{it.name}:{rows[0] if rows else 0}".encode())) % 2**63
    merged = ops.apply(spec.name, tensors, b, seed=seed, **it.params).to(it.dtype)
    if not torch.isfinite(merged).all():
        where = f" (rows {rows[0]}..{rows[1]})" if rows else ""
        hint = (f"; {it.dtype} overflows: merge to float32 or bfloat16 (dtype: in the recipe)"
                if it.dtype == torch.float16 else "; check the inputs and the recipe's parameters")
        raise MergeError(f"merged tensor {it.name!r}{where} holds inf or NaN values{hint}; nothing was written")
    return merged


def _copy_files(src: Path, dst: Path, dtype: str | None) -> None:
    cfg = src / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if dtype is not None:
            keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["torch_dtype", "dtype"]
            for k in keys:
                data[k] = dtype
        (dst / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _finish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder to ``out`` (replacing an empty one, or any one with ``force``)."""
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif not force:
            raise FileExistsError(f"{out} appeared during the merge and is not empty; nothing was replaced")
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
