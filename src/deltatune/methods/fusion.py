"""AdapterFusion (Pfeiffer et al. 2021): learned attention over several frozen adapters' outputs, per site.

    dm.load("adapters/sentiment", "sent"); dm.load("adapters/topic", "topic")       # frozen (trainable=False)
    dm.add(dt.FusionConfig(adapters=["sent", "topic"]), "st")                      # fusion parameters train
    dm.activate(dt.Fuse("sent", "topic"))
    Trainer(dm, data, cfg, "out").train()      # trains "st" (the composition's first adapter); saves it to out/

A fusion is an adapter of its own, so it adds, trains, counts, saves (safetensors, deltatune's section: the
fused adapters' names are in its config) and loads like any other: load the fused adapters first, then the
fusion. It has a :class:`FusionDelta` at every module where one of its adapters has a delta, and works only
inside a ``dt.Fuse`` block (activating it alone, or routing rows to it, raises), which calls
:meth:`FusionDelta.fuse` with the adapters' contributions there (see ``core/blocks.py``).

As in AdapterHub's ``adapters`` library (the paper's reference code), keys and values take each adapter's
contribution ``c_i = a_i(h) - h`` (for a bottleneck adapter its up-projection output; for LoRA ``dW_i x``),
the query the layer's output ``h``, and the residual ``h`` is added back after the weighted sum. Not included:
AdapterHub's optional temperature annealing and value regulariser (``temperature`` here is a fixed divisor).
Fused adapters must act on module outputs: no prompt/prefix tuning, no ``modules_to_save`` copies.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.model import owner_of
from ..core.modules import CONV, out_in
from ..core.registry import register
from ..core.targeting import ALL_LINEAR, is_linear, layer_index, matches


def _out_dim(module: nn.Module) -> int | None:
    """Features of a module's output along its last dimension (None where that is not the feature axis)."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if is_linear(module):
        return out_in(module)[0]
    if isinstance(module, CONV):
        return None
    lins = [m for m in module.modules() if is_linear(m)]  # a block (an FFN): its last linear layer's output
    return _out_dim(lins[-1]) if lins else None


class FusionDelta(Delta):
    """AdapterFusion at one site; ``h``: the layer's output (..., d), ``c_i``: adapter i's contribution (..., d)::

        s_i = softmax_i( Q(h) . K(c_i) / T )       Q, K: Linear(d, d) with bias, N(0, 0.02) init, zero bias
        h'  = h + V( sum_i s_i c_i )               V: Linear(d, d), no bias, identity at init

    At init ``Q(h) . K(c_i)`` is small, so ``h'`` starts near the plain average of the contributions.
    """

    def __init__(self, dim: int, temperature: float = 1.0):
        super().__init__()
        self.fusion_query = nn.Linear(dim, dim)
        self.fusion_key = nn.Linear(dim, dim)
        self.fusion_value = nn.Linear(dim, dim, bias=False)
        self.temperature = temperature
        with torch.no_grad():
            for lin in (self.fusion_query, self.fusion_key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.fusion_value.weight.copy_(torch.eye(dim))

    def forward(self, x: Tensor, y: Tensor, base: nn.Module) -> Tensor:
        raise RuntimeError("an AdapterFusion combines other adapters' outputs; activate it with dm.activate(dt.Fuse(...))")

    def fuse(self, h: Tensor, contributions: list[Tensor]) -> Tensor:
        dt = self.fusion_query.weight.dtype
        c = torch.stack([ci.to(dt) for ci in contributions], dim=-2)  # (..., n, d)
        q = self.fusion_query(h.to(dt)).unsqueeze(-2)  # (..., 1, d)
        s = torch.softmax((q * self.fusion_key(c)).sum(-1) / self.temperature, dim=-1)  # (..., n)
        return h + self.fusion_value((s.unsqueeze(-1) * c).sum(-2)).to(h.dtype)


@register
class FusionConfig(DeltaConfig):
    """AdapterFusion over ``adapters`` (two or more loaded adapters, by name).

    Sites: every module where one of them has a delta (``targets``/``exclude``/``layers`` may narrow that; where
    the fusion has no parameters, ``dt.Fuse`` averages the contributions); ``temperature``: the softmax's divisor.
    """

    type: ClassVar[str] = "fusion"
    default_targets: ClassVar[str] = r"(?!)"  # sites come from the fused adapters (for_model)
    adapters: list[str] = Field(min_length=2)
    temperature: float = Field(1.0, gt=0)

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"adapters must be distinct, got {v}")
        return v

    @field_validator("modules_to_save")
    @classmethod
    def _no_copies(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError("a fusion saves no module copies (modules_to_save must be unset)")
        return v

    def combines(self) -> list[str]:
        return list(self.adapters)

    def supports(self, module: nn.Module) -> bool:
        return _out_dim(module) is not None

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        return FusionDelta(_out_dim(module), self.temperature)

    def for_model(self, model: nn.Module) -> FusionConfig:
        """Targets: exactly the modules the fused adapters adapt (they must be loaded), narrowed by the fields."""
        dm = owner_of(model)
        loaded = dm.configs if dm is not None else {}
        missing = [a for a in self.adapters if a not in loaded]
        if missing:
            raise ValueError(f"fusion over {self.adapters}: adapter(s) {missing} are not loaded (loaded: "
                             f"{sorted(loaded)}); load the fused adapters first")
        nested = [a for a in self.adapters if loaded[a].combines()]
        if nested:
            raise ValueError(f"fusion over {self.adapters}: {nested[0]!r} is itself a fusion")
        sites: list[str] = []
        for path, site in dm.sites():
            here = [site.deltas[a] for a in self.adapters if a in site.deltas]
            for a, d in ((a, site.deltas[a]) for a in self.adapters if a in site.deltas):
                if d.input_level or d.replaces_base:
                    why = "acts on the model's inputs (prompt/prefix tuning)" if d.input_level else \
                        f"saves its own copy of {path!r} (modules_to_save)"
                    raise ValueError(f"fusion over {self.adapters}: adapter {a!r} {why}; AdapterFusion combines "
                                     f"module outputs")
            if here and self._keeps(path):
                if _out_dim(site.base) is None:
                    raise ValueError(f"fusion: {path} ({type(site.base).__name__}) has no feature axis last; "
                                     f"AdapterFusion cannot attend over its output")
                sites.append(path)
        if not sites:
            raise ValueError(f"fusion over {self.adapters}: targets/exclude/layers leave no module to fuse at")
        exact = "(" + "|".join(re.escape(p) for p in sites) + ")"
        return self.model_copy(update={"targets": exact, "exclude": None, "layers": None, "layers_pattern": None})

    def _keeps(self, path: str) -> bool:
        if self.targets not in (None, ALL_LINEAR) and not matches(self.targets, path):
            return False
        if self.exclude is not None and matches(self.exclude, path):
            return False
        return self.layers is None or layer_index(path, self.layers_pattern) in self.layers
