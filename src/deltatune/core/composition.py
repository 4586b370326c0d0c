"""A composition block bound to one DeltaModel: checked (:func:`compose`), held by its SiteState, called by Sites.

The blocks and their semantics are in ``core/blocks.py``. Here: the per-site evaluation context, the check
against the model (names, fusions, input-level adapters, module copies), the weights a composition merges
with, and the positions a ``Split`` needs (a pre-hook on the wrapped model reads the KV cache length).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import Tensor, nn

from . import kv
from .blocks import Average, Block, Fuse, Split, Stack
from .delta import MergeError

if TYPE_CHECKING:
    from .model import DeltaModel
    from .site import Site


class SiteView:
    """One site's view during a composed forward."""

    __slots__ = ("site", "args", "kwargs", "comp")

    def __init__(self, site: Site, args: tuple, kwargs: dict, comp: Composition):
        self.site, self.args, self.kwargs, self.comp = site, args, kwargs, comp

    def touches(self, b: str | Block) -> bool:
        """Whether ``b`` changes anything at this site."""
        if isinstance(b, Block):
            return any(self.touches(c) for c in b.children)
        d = self.site.deltas[b] if b in self.site.deltas else None
        return d is not None and not d.input_level and b not in self.site.merged

    def leaf(self, name: str, x: Tensor, h: Tensor) -> Tensor:
        site = self.site
        d = site.deltas[name] if name in site.deltas else None
        if d is None or d.input_level or name in site.merged:
            return h
        if d.replaces_base:
            return d(x, None, site.base, *self.args, **self.kwargs)
        return d(x, h, site.base)


class Composition:
    """A block checked against one DeltaModel (:func:`compose`), held by its SiteState: every Site calls it.

    ``names``: the adapters it uses (fusions first, then the leaves), which become the model's active ones.
    """

    def __init__(self, block: Block, names: tuple[str, ...]):
        self.block = block
        self.names = names
        self.offset, self.length = 0, None  # cached positions and input length of the current forward (Split)
        self._hooks: list = []

    def __call__(self, site: Site, x: Tensor, *args, **kwargs) -> Tensor:
        h = site.base(x, *args, **kwargs)
        at = SiteView(site, args, kwargs, self)
        return self.block._run(at, x, h) if at.touches(self.block) else h

    def first_position(self, t: int) -> int:
        """The absolute position of index 0 of a site input of length ``t`` in this forward."""
        if self.length is not None and t < self.length:
            return self.offset + self.length - t
        return self.offset

    # -- positions for Split: a pre-hook on the wrapped model reads the KV cache length and the input length --
    def attach(self, model: nn.Module) -> None:
        if not _has(self.block, Split):
            return
        ref = weakref.ref(self)
        self._hooks = [model.register_forward_pre_hook(_PositionsIn(ref), with_kwargs=True),
                       model.register_forward_hook(_PositionsOut(ref), always_call=True)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- merging -------------------------------------------------------------------------------------
    def merge_scales(self, dm: DeltaModel) -> dict[str, float]:
        """Adapter -> the weight its delta merges with; raises MergeError where a merge cannot be exact."""
        scales: dict[str, float] = {}

        def walk(b: str | Block, f: float) -> None:
            if isinstance(b, str):
                scales[b] = f
            elif isinstance(b, (Fuse, Split)):
                raise MergeError(f"a composition with {type(b).__name__} cannot be merged: its effect depends on the "
                                 f"input ({'attention over adapters' if isinstance(b, Fuse) else 'token position'}), "
                                 f"not on fixed weights")
            else:
                ws = b.weights if isinstance(b, Average) else [1.0] * len(b.children)
                for c, w in zip(b.children, ws):
                    walk(c, f * w)

        walk(self.block, 1.0)
        for path, site in dm.sites():
            copies = [n for n in scales if n in site.deltas and site.deltas[n].replaces_base]
            if len(copies) > 1 or any(scales[n] != 1.0 for n in copies):
                raise MergeError(f"{path}: adapter(s) {copies} save their own copy of this module; a weighted or "
                                 f"combined copy cannot be merged")
        return scales


class _PositionsIn:
    def __init__(self, ref: weakref.ref):
        self.ref = ref

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        comp = self.ref()
        if comp is None:
            return
        cache = kv.cache_of(kwargs)
        seen = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        ids = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids") if ids is None else ids
        ids = args[0] if ids is None and args and isinstance(args[0], Tensor) else ids
        comp.offset = int(seen)
        comp.length = int(ids.shape[1]) if isinstance(ids, Tensor) and ids.dim() >= 2 else None


class _PositionsOut:
    def __init__(self, ref: weakref.ref):
        self.ref = ref

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        comp = self.ref()
        if comp is not None:  # calls that bypass the wrapped model (a backbone alone) start at position 0
            comp.offset, comp.length = 0, None


def _has(b: str | Block, kind: type) -> bool:
    return isinstance(b, kind) or (isinstance(b, Block) and any(_has(c, kind) for c in b.children))


# -- checking a block against a model ---------------------------------------------------------------
def compose(dm: DeltaModel, block: Block) -> Composition:
    """Check ``block`` against ``dm`` and resolve its fusions; raises before anything changes."""
    if not isinstance(block, Block):
        raise TypeError(f"expected a composition block (dt.Stack, dt.Parallel, ...), got {type(block).__name__}")
    leaves = block.leaves()
    dm._require(*leaves)
    fused = [n for n in leaves if dm.configs[n].combines()]
    if fused:
        raise ValueError(f"adapter {fused[0]!r} is an AdapterFusion over {dm.configs[fused[0]].combines()}; use it "
                         f"through dt.Fuse(...), not as a member of a block")
    merged = sorted({n for _, s in dm.sites() for n in s.merged})
    if merged:
        raise RuntimeError(f"adapter(s) {merged} are merged into the weights; unmerge before activating a composition")
    inputs = [n for n in leaves if dm._input_level(n)]
    top = block.children if isinstance(block, Stack) else ()
    misplaced = [n for n in inputs if n not in top]
    if misplaced:
        raise ValueError(f"adapter(s) {misplaced} act on the model's inputs (prompt/prefix tuning) for the whole "
                         f"sequence; they can only be direct members of a top-level Stack, e.g. "
                         f"Stack({misplaced[0]!r}, Parallel(...))")
    if len(inputs) > 1:
        raise ValueError(f"adapters {inputs} each act on the model's inputs; use at most one in a composition")
    copies = {n: {p for p, d in dm.deltas(n).items() if d.replaces_base} for n in leaves}
    _check_copies(block, copies)
    block, fusions = _resolve_fusions(block, dm)
    return Composition(block, tuple(dict.fromkeys(fusions + leaves)))


def _check_copies(b: str | Block, copies: dict[str, set[str]]) -> set[str]:
    """Modules saved in full under ``b``; in a Stack two children must not both replace one module."""
    if isinstance(b, str):
        return copies[b]
    sets = [_check_copies(c, copies) for c in b.children]
    if isinstance(b, Fuse) and any(sets):
        raise ValueError(f"{b!r}: fused adapters must not save their own module copies (modules_to_save)")
    out: set[str] = set()
    for s in sets:
        if isinstance(b, Stack) and out & s:
            raise ValueError(f"{b!r}: two of its members each save their own copy of {sorted(out & s)[0]!r} "
                             f"(modules_to_save); in a Stack the second would discard the first")
        out |= s
    return out


def _resolve_fusions(b: str | Block, dm: DeltaModel) -> tuple[str | Block, list[str]]:
    """The block with every Fuse's fusion adapter named, and those names."""
    if isinstance(b, str):
        return b, []
    if isinstance(b, Fuse):
        want = sorted(b.children)
        found = [n for n, c in dm.configs.items() if c.combines() and sorted(c.combines()) == want]
        if b.fusion is not None:
            dm._require(b.fusion)
            got = dm.configs[b.fusion].combines()
            if sorted(got) != want:
                raise ValueError(f"{b.fusion!r} is not a fusion over {want}" + (f" (it fuses {got})" if got else ""))
            name = b.fusion
        elif len(found) == 1:
            name = found[0]
        elif not found:
            raise ValueError(f"no fusion over {want} is loaded; add one: dm.add(dt.FusionConfig(adapters={want}), "
                             f"'<name>')")
        else:
            raise ValueError(f"several fusions over {want} are loaded ({found}); pick one: Fuse(..., fusion='name')")
        return Fuse(*b.children, fusion=name), [name]
    kids, names = [], []
    for c in b.children:
        k, n = _resolve_fusions(c, dm)
        kids.append(k)
        names += n
    if isinstance(b, Average):
        return Average(*kids, weights=list(b.weights), normalize_weights=False), names
    if isinstance(b, Split):
        return Split(*kids, splits=list(b.splits)), names
    return type(b)(*kids), names
