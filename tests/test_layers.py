"""The layers hold: every module's imports (at module level AND inside functions) follow one-way rules.

    core  <-  methods                       (methods import core only)
    core  <-  io  <-  models.py             (io imports core; models.py alone knows transformers' loading)
    core, io, models  <-  merge             (methods only through the registry)
    core, io, merge, models, generation  <-  train, serve, continual   (train and serve never each other)
    the root __init__, cli.py, demo.py, doctor.py: anything

A function-level import of an internal module is allowed only in cli.py / demo.py / doctor.py and in the short,
commented ALLOWED_LOCAL list below; and no import cycle exists, counting function-level imports too. The checker
works on sources, so the tests below also prove it catches what it must (a forbidden import added to a method file,
a function-level import, a cycle).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "deltatune"

# top-level part of the package -> the parts it may import (itself always)
RULES: dict[str, set[str]] = {
    "_version": set(),
    "core": set(),
    "methods": {"core"},
    "io": {"core", "_version"},
    "models": {"core", "io"},
    "generation": {"core"},
    "merge": {"core", "io", "models", "_version"},
    "train": {"core", "io", "merge", "models", "generation"},
    "serve": {"core", "io", "merge", "models", "generation"},
    "continual": {"core", "io", "merge", "models", "generation", "train"},
}
APPS = {"__init__", "cli", "demo", "doctor"}  # may import anything
LOCAL_OK = {"deltatune.cli", "deltatune.demo"}  # may import internal modules inside functions
# third-party packages each part may import beyond the standard library (None: not checked)
THIRD_PARTY: dict[str, set[str] | None] = {"core": {"torch", "pydantic"}, "methods": {"torch", "pydantic", "transformers"}}
# (module, imported module): function-level imports of internal modules outside the apps, each with its reason
ALLOWED_LOCAL: dict[tuple[str, str], str] = {
    ("deltatune", "deltatune.models"): "`import deltatune` must not import transformers (models.py loads it)",
    ("deltatune.serve", "deltatune.serve.server"): "the engine and adapter cache work without the serve extra; "
                                                "build_app / serve import FastAPI and uvicorn when used",
}
# calls that load from a model hub or folder: only models.py makes them (and these, with their reason)
LOADING = {"from_pretrained", "from_config", "_from_config"}
ALLOWED_LOADING: dict[str, str] = {
    "deltatune.methods.prompt_tuning": "PEFT's prompt-tuning config names the tokenizer that turns init_text into ids",
}


def part_of(module: str) -> str:
    """``deltatune.methods.lora`` -> ``methods``; ``deltatune`` -> ``__init__``."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


class Import:
    """One import of one module; ``typing_only``: under ``if TYPE_CHECKING:`` (a type annotation's need, never run:
    it obeys the layer rules but is no edge of an import cycle)."""

    def __init__(self, source: str, target: str, line: int, local: bool, typing_only: bool = False):
        self.source, self.target, self.line, self.local, self.typing_only = source, target, line, local, typing_only

    def __repr__(self) -> str:
        where = "inside a function" if self.local else "at module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> tuple[list[Import], list[Import], list[int]]:
    """(internal imports, third-party imports, lines of loading calls) of one module's source. Internal targets are
    resolved to the module they name (``from . import kv`` -> ``deltatune.core.kv`` when that is a module)."""
    tree = ast.parse(source)
    local_nodes = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    typing_nodes = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                    for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    package = module if is_package else module.rsplit(".", 1)[0]
    internal, external, loading = [], [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOADING:
            loading.append(node.lineno)
        if isinstance(node, ast.Import):
            names = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [(mod, a.name) for a in node.names]
        else:
            continue
        local = id(node) in local_nodes
        for mod, name in names:
            if mod == "deltatune" or mod.startswith("deltatune."):
                target = f"{mod}.{name}" if name and f"{mod}.{name}" in known else mod
                internal.append(Import(module, target, node.lineno, local, id(node) in typing_nodes))
            elif mod.split(".")[0] not in sys.stdlib_module_names and mod != "__future__":
                external.append(Import(module, mod.split(".")[0], node.lineno, local))
    return internal, external, loading


def read_tree(root: Path = SRC) -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package) for every module of the package."""
    return {module_name(p, root): (p.read_text(), p.name == "__init__.py") for p in sorted(root.rglob("*.py"))}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself): import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(tree: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken rule in ``tree`` (module name -> (source, is a package)), as readable sentences."""
    known = set(tree)
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for module, (source, is_package) in tree.items():
        internal, external, loading = imports_of(module, source, is_package, known)
        part = part_of(module)
        for imp in internal:
            if not imp.typing_only:
                edges.setdefault(module, set()).add(imp.target)
            target_part = part_of(imp.target)
            if part not in APPS:
                allowed = RULES.get(part)
                if allowed is None:
                    problems.append(f"{module}: not in any layer of tests/test_layers.py's RULES")
                    break
                if target_part != part and target_part not in allowed:
                    problems.append(f"{imp}: {part} may import only {sorted(allowed | {part})}")
            if imp.local and module not in LOCAL_OK and (module, imp.target) not in ALLOWED_LOCAL:
                problems.append(f"{imp}: a function-level import of an internal module (hides a dependency); "
                                f"import at module level, or add it to ALLOWED_LOCAL with the reason")
        allowed_ext = THIRD_PARTY.get(part)
        for imp in external:
            if allowed_ext is not None and imp.target not in allowed_ext:
                problems.append(f"{imp}: {part} may import only the standard library and {sorted(allowed_ext)}")
        if loading and part not in APPS and module != "deltatune.models" and module not in ALLOWED_LOADING:
            problems.append(f"{module}:{loading[0]} loads a model, config or tokenizer (from_pretrained / "
                            f"from_config): only deltatune.models does")
    for comp in cycles(edges):
        problems.append(f"import cycle (counting function-level imports) among: {', '.join(comp)}")
    return list(dict.fromkeys(problems))  # one import statement naming several things is one problem


def test_the_package_keeps_its_layers():
    problems = violations(read_tree())
    assert not problems, "\n".join(problems)


def test_the_allow_lists_name_real_imports():
    """An allow-list entry whose import went away must go too: the lists stay short and true."""
    tree = read_tree()
    known = set(tree)
    local = {(i.source, i.target) for m, (src, pkg) in tree.items()
             for i in imports_of(m, src, pkg, known)[0] if i.local}
    assert set(ALLOWED_LOCAL) <= local, set(ALLOWED_LOCAL) - local
    assert all(imports_of(m, *tree[m], known)[2] for m in ALLOWED_LOADING)


def _with(tree: dict[str, tuple[str, bool]], module: str, extra: str) -> dict[str, tuple[str, bool]]:
    source, pkg = tree[module]
    return {**tree, module: (source + "\n" + extra + "\n", pkg)}


@pytest.mark.parametrize("module, added, found", [
    ("deltatune.methods.lora", "from ..train import trainer", "deltatune.methods.lora:"),
    ("deltatune.methods.lora", "def f():\n    from ..train.trainer import Trainer", "inside a function"),
    ("deltatune.core.site", "def f():\n    from ..io import adapter", "core may import only"),
    ("deltatune.io.adapter", "from ..merge import ops", "io may import only"),
    ("deltatune.train.trainer", "from ..serve import engine", "train may import only"),
    ("deltatune.serve.engine", "from ..train import trainer", "serve may import only"),
    ("deltatune.core.config", "import transformers", "standard library"),
    ("deltatune.merge.ops", "def f(p):\n    return p.from_pretrained(p)", "only deltatune.models"),
])
def test_a_forbidden_import_is_caught(module, added, found):
    problems = violations(_with(read_tree(), module, added))
    assert any(found in p for p in problems), problems


def test_a_cycle_through_a_function_level_import_is_caught():
    tree = _with(read_tree(), "deltatune.core.delta", "def f():\n    from . import model")
    assert any("import cycle" in p and "deltatune.core.delta" in p and "deltatune.core.model" in p
               for p in violations(tree))
