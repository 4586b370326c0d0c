"""Composition: several loaded adapters used at once, combined at every site by a small tree of blocks.

    dm.activate(dt.Stack("lang", dt.Parallel("a", "b")))
    dm.activate(dt.Average("a", "b", weights=[0.3, 0.7]))
    dm.add(dt.FusionConfig(adapters=["a", "b"]), "ab"); dm.activate(dt.Fuse("a", "b"))   # trainable fusion
    dm.activate(dt.Split("a", "b", splits=16))     # positions < 16 use a, the rest b
    dm.activate("a")                               # a plain name or list drops the composition

Semantics. At one site, with input ``x`` and output so far ``h`` (the base module's output), every block is a
function ``h -> h'``; the Site computes the base once and asks the active composition for the result:

- a name ``a``: ``a(h) = d_a(x, h)``, the adapter's delta at this site; the identity where ``a`` has no delta
  (or is merged). A delta that saves its own copy of the module (``modules_to_save``) gives ``copy(x)``.
- ``Stack(b1, ..., bn)``: ``bn(... b1(h))``, one after another (what ``dm.activate(["a", "b"])`` does).
- ``Parallel(b1, ..., bn)``: ``h + sum_i (b_i(h) - h)``: each child sees the same ``h``; contributions add.
- ``Average(b1, ..., bn, weights=w)``: ``h + sum_i w_i (b_i(h) - h)``; ``w`` defaults to ``1/n`` and is
  normalised to sum 1 unless ``normalize_weights=False`` (then it is a weighted sum).
- ``Fuse(a1, ..., an)``: AdapterFusion (Pfeiffer et al. 2021): ``h + sum_i s_i V c_i`` with ``c_i = a_i(h) - h``
  and ``s = softmax_i((Q h) . (K c_i))``, with the per-site Q, K, V of a fusion adapter
  (:class:`deltatune.methods.fusion.FusionConfig`) that trains while the fused adapters stay frozen. At a
  module the fusion's ``targets`` leave out, the contributions are averaged.
- ``Split(b1, ..., bn, splits=[k1, ..., k_{n-1}])``: position ``t`` of the sequence (dim 1 of the site's input
  and output) uses ``b1`` for ``t < k1``, ``b2`` for the next ``k2`` positions, ..., ``bn`` for the rest.
  Positions are absolute: tokens already in the KV cache count (``generate`` decodes position ``t``, not 0),
  and a site that sees only the last positions (an LM head under ``logits_to_keep``) is aligned to the end.
  Each child runs on its own span only, so this is exact for position-wise deltas (every linear, embedding
  and FFN site). Sites without a sequence dimension (a pooler, a classifier) are refused.

What that means for the methods. Weight-level deltas add ``dW x`` to ``h``, so for them Stack == Parallel ==
the sum of the deltas, and ``Average`` is one LoRA per adapter with its ``B`` scaled by ``w_i``; merging
such a composition merges ``W + sum_i w_i dW_i`` (``dm.merge()``; Fuse and Split depend on the input and are
never merged). Multiplicative deltas (IA3, DoRA, OFT) give their own output, so Stack multiplies them while
Parallel adds their differences. Sequential bottleneck adapters ``a(h) = h + f_a(h)``: ``Stack(a1, a2) =
a2(a1(h))``, ``Parallel = h + sum_i f_i(h)``, ``Average = h + sum_i w_i f_i(h)``.

Rules: every name appears once in a tree; ``Fuse`` takes adapter names (its fusion parameters belong to them);
an input-level adapter (prompt or prefix tuning) acts on the whole input and may only be a direct child of
a top-level ``Stack``; a composition and per-row routing do not mix (``routing`` refuses). Differences from
AdapterHub's blocks of the same names: its ``Parallel`` replicates the batch (multi-task inference), here it
sums the deltas; its ``Split`` takes one size per child, here the last child takes the rest.

This file holds the blocks (pure, validated objects); ``core/composition.py`` checks one against a model and
is what the Site calls.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .composition import SiteView

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class Block:
    """A composition block: children are adapter names or blocks. Immutable; validated on construction."""

    min_children = 2
    children: tuple[str | Block, ...]

    def __init__(self, *children: str | Block):
        kind = type(self).__name__
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        if len(children) < self.min_children:
            raise ValueError(f"{kind} needs at least {self.min_children} children, got {len(children)}")
        for c in children:
            if isinstance(c, str):
                if not _NAME.match(c):
                    raise ValueError(f"{kind}: {c!r} is not an adapter name (letters, digits, _ or -)")
            elif not isinstance(c, Block):
                raise TypeError(f"{kind}: a child must be an adapter name or a block (Stack, Parallel, Average, "
                                f"Fuse, Split), got {type(c).__name__}")
        object.__setattr__(self, "children", tuple(children))
        seen: set[str] = set()
        for n in self.leaves():
            if n in seen:
                raise ValueError(f"{kind}: adapter {n!r} appears more than once in the composition")
            seen.add(n)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new block")

    def leaves(self) -> list[str]:
        """Every adapter name in the tree, in order."""
        return [n for c in self.children for n in ([c] if isinstance(c, str) else c.leaves())]

    def _options(self) -> tuple:
        return ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.children, self._options()) == (other.children, other._options())

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children, self._options()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))}{self._extra()})"

    def _extra(self) -> str:
        return ""

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _apply(child: str | Block, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
    return at.leaf(child, x, h) if isinstance(child, str) else child._run(at, x, h)


def _branch(child: str | Block, at: SiteView, x: Tensor, h: Tensor) -> Tensor | None:
    """A child's output on its own copy of ``h`` (deltas may add to their ``y`` in place); None where it does
    nothing at this site."""
    return _apply(child, at, x, h.clone()) if at.touches(child) else None


class Stack(Block):
    """One after another: ``bn(... b1(h))``."""

    min_children = 1

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
        for c in self.children:
            h = _apply(c, at, x, h)
        return h


class Parallel(Block):
    """The children's contributions add: ``h + sum_i (b_i(h) - h)``."""

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
        out = h
        for c in self.children:
            z = _branch(c, at, x, h)
            if z is not None:
                out = out + (z - h)
        return out


class Average(Block):
    """Weighted mean of the children's contributions: ``h + sum_i w_i (b_i(h) - h)``.

    weights: one per child (default ``1/n``); normalised to sum 1 unless ``normalize_weights=False``.
    """

    weights: tuple[float, ...]

    def __init__(self, *children: str | Block, weights: list[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        n = len(self.children)
        w = [1.0 / n] * n if weights is None else [float(v) for v in weights]
        if len(w) != n:
            raise ValueError(f"Average: {len(w)} weights for {n} children")
        if not all(math.isfinite(v) for v in w):
            raise ValueError(f"Average: weights must be finite, got {w}")
        if normalize_weights:
            total = sum(w)
            if abs(total) < 1e-12:
                raise ValueError(f"Average: weights {w} sum to 0 and cannot be normalised (normalize_weights=False "
                                 f"uses them as given)")
            w = [v / total for v in w]
        object.__setattr__(self, "weights", tuple(w))

    def _options(self) -> tuple:
        return self.weights

    def _extra(self) -> str:
        return f", weights={[round(v, 6) for v in self.weights]}"

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
        out = h
        for c, w in zip(self.children, self.weights):
            z = _branch(c, at, x, h)
            if z is not None:
                out = out + w * (z - h)
        return out


class Fuse(Block):
    """AdapterFusion over adapters (by name): learned attention over their contributions at each site.

    fusion: the fusion adapter to use (a :class:`~deltatune.methods.fusion.FusionConfig` over exactly these
        adapters); found automatically when there is exactly one.
    """

    fusion: str | None

    def __init__(self, *children: str, fusion: str | None = None):
        super().__init__(*children)
        bad = [c for c in self.children if not isinstance(c, str)]
        if bad:
            raise TypeError(f"Fuse combines adapters by name (its fusion parameters belong to them), got {bad[0]!r}")
        if fusion is not None and not _NAME.match(fusion):
            raise ValueError(f"Fuse: fusion {fusion!r} is not an adapter name")
        object.__setattr__(self, "fusion", fusion)

    def _options(self) -> tuple:
        return (self.fusion,)

    def _extra(self) -> str:
        return f", fusion={self.fusion!r}" if self.fusion else ""

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
        zs = [_branch(c, at, x, h) for c in self.children]
        if all(z is None for z in zs):
            return h
        cs = [torch.zeros_like(h) if z is None else z - h for z in zs]
        f = at.site.deltas[self.fusion] if self.fusion in at.site.deltas else None
        if f is None:  # a module the fusion's targets left out: the plain mean (a fresh fusion's starting point)
            return h + sum(cs) / len(cs)
        return f.fuse(h, cs)


class Split(Block):
    """Different children for different spans of the sequence (dim 1).

    splits: the sizes of the first n-1 spans (an int for two children); the last child takes the rest.
    """

    splits: tuple[int, ...]

    def __init__(self, *children: str | Block, splits: int | list[int]):
        super().__init__(*children)
        n = len(self.children)
        sizes = [splits] if isinstance(splits, int) and not isinstance(splits, bool) else splits
        if not isinstance(sizes, (list, tuple)) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                           for k in sizes):
            raise TypeError(f"Split: splits must be an int or a list of ints, got {splits!r}")
        if len(sizes) != n - 1:
            raise ValueError(f"Split: {n} children need {n - 1} span size(s) (the last child takes the rest), "
                             f"got {list(sizes)}")
        if any(k <= 0 for k in sizes):
            raise ValueError(f"Split: span sizes must be > 0, got {list(sizes)}")
        object.__setattr__(self, "splits", tuple(sizes))

    def _options(self) -> tuple:
        return self.splits

    def _extra(self) -> str:
        return f", splits={list(self.splits)}"

    def _run(self, at: SiteView, x: Tensor, h: Tensor) -> Tensor:
        if not at.touches(self):
            return h
        if h.dim() < 3 or x.dim() < 2 or x.shape[:2] != h.shape[:2]:
            raise ValueError(f"Split needs a sequence dimension (dim 1) shared by a site's input and output; "
                             f"{type(at.site.base).__name__} maps {tuple(x.shape)} to {tuple(h.shape)} (e.g. a "
                             f"pooler or classifier): leave it out of the split adapters' targets")
        t = h.shape[1]
        start = at.comp.first_position(t)
        bounds = [0]
        for k in self.splits:
            bounds.append(bounds[-1] + k)
        bounds.append(math.inf)
        pieces = []
        for i, c in enumerate(self.children):
            lo = min(max(bounds[i] - start, 0), t)
            hi = min(max(bounds[i + 1] - start, 0), t)
            if hi > lo:
                pieces.append(_apply(c, at, x[:, lo:hi], h[:, lo:hi]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
