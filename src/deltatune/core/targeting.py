"""Targeting: which modules of a model a config selects.

Rules (the same for ``targets``, ``exclude`` and ``modules_to_save``):
- a string is a regex that must fully match the module's qualified name;
- a list matches exact names or dotted suffixes (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- ``"all-linear"`` (targets only) is every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head.
``exclude`` wins over ``targets``; ``layers`` keeps only modules inside the given block indices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from .config import DeltaConfig, TargetSpec
from .site import Site

ALL_LINEAR = "all-linear"
LAYER_PATTERNS = ("layers", "layer", "h", "blocks", "block")
HEAD_NAMES = {"lm_head", "score", "classifier", "qa_outputs", "embed_out", "output"}


def is_linear(m: nn.Module) -> bool:
    """nn.Linear or transformers' GPT-2 Conv1D (checked by shape of the class, core imports no transformers)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "weight"))


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` as the user sees the model: a Site shows as the module it wraps."""
    seen: set[int] = set()

    def walk(m: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        if isinstance(m, Site):
            m = m.base
        if id(m) in seen:
            return
        seen.add(id(m))
        yield prefix, m
        for name, child in m._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def matches(spec: TargetSpec, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, pattern: str | None = None) -> int | None:
    for p in [pattern] if pattern else LAYER_PATTERNS:
        m = re.search(rf"(?:^|\.){re.escape(p)}\.(\d+)(?:\.|$)", name)
        if m:
            return int(m.group(1))
    return None


def output_heads(model: nn.Module) -> set[str]:
    """Names of the output head(s): the output embedding, and well-known head names."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except Exception:  # some models raise NotImplementedError
            out = None
    for name, m in iter_modules(model):
        if (out is not None and m is out) or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def _examples(names: list[str], k: int = 6) -> str:
    leaves = sorted({n for n in names if n})
    return ", ".join(leaves[:k]) + (", ..." if len(leaves) > k else "")


@dataclass
class Selection:
    names: list[str]
    modules: dict[str, nn.Module]


def select(
    model: nn.Module,
    cfg: DeltaConfig,
    supported: Callable[[nn.Module], bool],
    default_targets: TargetSpec = ALL_LINEAR,
) -> Selection:
    """The modules ``cfg`` adapts (not those it saves in full). Raises naming the spec if none match."""
    targets = cfg.targets if cfg.targets is not None else default_targets
    mods = list(iter_modules(model))
    saved = cfg.modules_to_save or []
    heads = output_heads(model) if targets == ALL_LINEAR else set()
    chosen: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    for name, m in mods:
        if not name or _inside(saved, name):
            continue
        if targets == ALL_LINEAR:
            if not is_linear(m) or name in heads:
                continue
        elif not matches(targets, name):
            continue
        if cfg.exclude is not None and matches(cfg.exclude, name):
            continue
        if cfg.layers is not None:
            idx = layer_index(name, cfg.layers_pattern)
            if idx is None or idx not in cfg.layers:
                continue
        if not supported(m):
            unsupported.append(f"{name} ({type(m).__name__})")
            continue
        chosen[name] = m
    if unsupported and targets != ALL_LINEAR and not chosen:
        raise ValueError(
            f"{type(cfg).__name__} cannot adapt the module(s) that targets={targets!r} selects: "
            f"{', '.join(unsupported[:5])}"
        )
    if not chosen:
        extra = f", exclude={cfg.exclude!r}" if cfg.exclude else ""
        extra += f", layers={cfg.layers}" if cfg.layers is not None else ""
        raise ValueError(
            f"targets={targets!r}{extra} selected no module of {type(model).__name__}; "
            f"modules include: {_examples([n for n, m in mods if not m._modules])}"
        )
    return Selection(list(chosen), chosen)


def _inside(spec: list[str], name: str) -> bool:
    """True if ``name`` or one of its ancestors matches ``spec`` (modules_to_save are never wrapped)."""
    parts = name.split(".")
    return bool(spec) and any(matches(spec, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def select_saved(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Resolve ``modules_to_save`` (exact names or dotted suffixes); every entry must match."""
    mods = dict(iter_modules(model))
    out: dict[str, nn.Module] = {}
    for spec in names:
        hits = {n: m for n, m in mods.items() if n and matches([spec], n)}
        if not hits:
            raise ValueError(f"modules_to_save entry {spec!r} matches no module; modules include: {_examples(list(mods))}")
        out.update(hits)
    return out


@dataclass
class Inspection:
    """What a targeting spec selects: rows of (name, type, weight shape, parameters)."""

    rows: list[tuple[str, str, tuple[int, ...], int]]
    total_params: int

    @property
    def selected_params(self) -> int:
        return sum(r[3] for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{len(self.rows)} modules selected, {self.selected_params:,} of {self.total_params:,} parameters"]
        for name, kind, shape, n in self.rows:
            lines.append(f"  {name:<60} {kind:<12} {str(list(shape)):<16} {n:>12,}")
        return "\n".join(lines)


def inspect(model: nn.Module, targets: TargetSpec = ALL_LINEAR, **kwargs) -> Inspection:
    """Which modules a spec selects (``targets``, ``exclude``, ``layers``, ``layers_pattern``)."""
    cfg = DeltaConfig(targets=targets, **kwargs)
    sel = select(model, cfg, supported=lambda m: True)
    rows = []
    for name in sel.names:
        m = sel.modules[name]
        w = getattr(m, "weight", None)
        rows.append((name, type(m).__name__, tuple(w.shape) if w is not None else (),
                     sum(p.numel() for p in m.parameters())))
    return Inspection(rows, sum(p.numel() for p in model.parameters()))


def exact_targets(model, paths: list[str]) -> str | list[str]:
    """A PEFT ``target_modules`` value that selects exactly ``paths``: leaf names if they suffice, else a regex."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    hits = {n for n, _ in iter_modules(model) if n and matches(leaves, n)}
    if hits == set(paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(paths)) + ")"
