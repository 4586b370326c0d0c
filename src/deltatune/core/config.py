"""Config: a validated, serialisable description of one method.

Every method's config subclasses :class:`DeltaConfig`, which carries what all methods share: where the
delta goes (``targets``, ``exclude``, ``layers``), which whole modules train alongside
(``modules_to_save``) and the adapter dtype policy. Bad values fail at construction with a pydantic
error naming the field; unknown fields fail too (``from_dict`` tolerates them with a warning, for files
written by newer releases).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

if TYPE_CHECKING:
    from torch import nn

    from .delta import Delta

TargetSpec = str | list[str] | None


class DeltaConfig(BaseModel):
    """Fields shared by every method.

    targets: a string is a regex that must fully match a module's qualified name; a list matches exact
        names or dotted suffixes; ``"all-linear"`` selects every linear layer except the output head.
        ``None`` means the method's own default.
    exclude: same forms as ``targets``; wins over it.
    layers: indices of the transformer blocks to adapt (the block pattern is inferred, or given as
        ``layers_pattern``, e.g. ``"layers"`` or ``"h"``).
    modules_to_save: modules trained and saved in full (e.g. a classification head), per adapter.
    adapter_dtype: ``"float32"`` keeps the delta in float32 on a half-precision base (default),
        ``"base"`` uses the base weight's dtype.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    type: ClassVar[str] = "base"
    default_targets: ClassVar[str | list[str]] = "all-linear"
    peft_type: ClassVar[str | None] = None  # the name of the method in the PEFT format, if it has one
    # what PEFT puts before module paths in this method's files (prompt-learning methods: "base_model.")
    peft_prefix: ClassVar[str] = "base_model.model."
    targets: TargetSpec = None
    exclude: TargetSpec = None
    layers: list[int] | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] | None = None
    adapter_dtype: str = "float32"

    @field_validator("targets", "exclude")
    @classmethod
    def _non_empty(cls, v: TargetSpec) -> TargetSpec:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list selects nothing; give module names or leave unset")
        if isinstance(v, str) and not v.strip():
            raise ValueError("an empty string selects nothing")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {v}")
        return v

    @field_validator("adapter_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        allowed = ("float32", "base", "bfloat16", "float16")
        if v not in allowed:
            raise ValueError(f"adapter_dtype must be one of {allowed}, got {v!r}")
        return v

    # -- what a method file provides ------------------------------------------------------------
    def supports(self, module: nn.Module) -> bool:
        """Whether this method can adapt ``module``."""
        raise NotImplementedError

    def make_delta(self, module: nn.Module, path: str) -> Delta:
        """A fresh delta for ``module`` (at qualified name ``path``), initialised per the config."""
        raise NotImplementedError

    def make_deltas(self, modules: dict[str, nn.Module]) -> dict[str, Delta]:
        """Fresh deltas for all selected ``modules`` (path -> module) at once.

        The default calls :meth:`make_delta` per module. A method whose deltas share state across modules
        (VeRA's frozen projections, sized to the largest selected layer) overrides this. It must raise
        before anything is installed; the core places each delta on its module's device and dtype.
        """
        return {path: self.make_delta(m, path) for path, m in modules.items()}

    # -- what other layers need to know about the saved tensors (combining, compressing) -------------------
    # A saved tensor's parameter name (its key after the module path: "lora_B.weight", "ia3_l"; "adapter_down.*"
    # stands for every parameter under adapter_down) -> its role when adapters are combined (merge/combine.py):
    #   "delta"      the update is linear in it (LoRA's B, a bias shift, an up-projection): combined with the
    #                signed weights, so a weight of -1 negates the adapter;
    #   "factor"     the partner of a delta tensor (LoRA's A, a down-projection): combined with |weights|;
    #   "scale"      a multiplicative scale whose identity is 1 (SSF's scale): 1 + sum_i w_i (x_i - 1);
    #   "log_scale"  a scale combined in log space by default (IA3's vectors): exp(sum_i w_i log x_i).
    # A tensor with no role is a whole parameter (a saved module, a norm, a prompt): averaged, never negated.
    tensor_roles: ClassVar[dict[str, str]] = {}
    # The (A, B) parameter-name pairs of a plain low-rank update dW = s B A with a per-module scale ``scaling(path)``
    # (LoRA, DoRA): combine's exact rank-concatenation and SVD combinations and rank truncation work on these.
    low_rank_pairs: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Whether the update is a product of small factors (the delta/factor tensors): ComPEFT and DARE compress those.
    factorised: ClassVar[bool] = False
    # Config fields that may differ between adapters combined together (they do not change what the tensors mean,
    # or the tensors' shapes say it), beyond the targeting and init fields every method has.
    combine_loose: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def tensor_role(cls, key: str) -> tuple[str | None, str | None]:
        """``(role, parameter name)`` of saved tensor ``key`` (a full key, module path included) by
        :attr:`tensor_roles`, the longest matching name first; ``(None, None)`` for a whole parameter."""
        bits = key.split(".")
        for i in range(len(bits)):
            name = ".".join(bits[i:])
            if name in cls.tensor_roles:
                return cls.tensor_roles[name], name
            if i < len(bits) - 1 and (star := ".".join([*bits[i:-1], "*"])) in cls.tensor_roles:
                return cls.tensor_roles[star], name
        return None, None

    # -- a config made of other configs (a union: several methods as one adapter) ---------------------
    composite: ClassVar[bool] = False  # True when build() composes other configs' deltas (not per module)

    def build(self, build_one: Callable[[DeltaConfig], dict[str, Delta]]) -> dict[str, Delta]:
        """The adapter's deltas, module path -> delta. ``build_one(cfg)`` is the caller's build of one ordinary
        config (DeltaModel's selects the targets, calls :meth:`make_deltas`, places the deltas and adds the
        ``modules_to_save`` copies). Ordinary methods keep this default; a composite config (``methods/union.py``)
        overrides it to build each member (``member.build(build_one)``) and compose them per module."""
        return build_one(self)

    # -- tensors shared by all deltas of one adapter, saved outside any module path ----------------
    shared_keys: ClassVar[tuple[str, ...]] = ()  # their full keys in the file (e.g. "base_model.vera_A")

    def export_shared(self, deltas: dict[str, Delta]) -> dict[str, Any]:
        """Tensors to save besides the per-module ones, keyed by their full key in the file.

        ``deltas``: this adapter's deltas by module path. Most methods have none.
        """
        return {}

    def import_shared(self, deltas: dict[str, Delta], tensors: dict[str, Any]) -> None:
        """Load the :attr:`shared_keys` tensors found in a file into freshly built ``deltas`` (before they are
        installed); raise naming the key on a missing tensor or a shape mismatch."""
        if tensors:
            raise KeyError(f"{type(self).__name__} saves no shared tensors, but the file has {sorted(tensors)}")

    # -- the PEFT format: what is particular to this method; io/peft.py maps the rest, both ways --------
    peft_saved_as: ClassVar[str | None] = None  # the peft_type written, when not peft_type (DoRA: "LORA")
    peft_fields: ClassVar[dict[str, str]] = {}  # deltatune field -> PEFT key, copied both ways (null: the default)
    peft_constants: ClassVar[dict[str, Any]] = {}  # PEFT keys written with a fixed value ("fan_in_fan_out": False)
    peft_layers: ClassVar[bool] = True  # PEFT's config has layers_to_transform / layers_pattern
    peft_prompt_learning: ClassVar[bool] = False  # PEFT's prompt-learning layout: no target_modules, task_type

    def peft_extra(self) -> dict[str, Any]:
        """PEFT keys computed from the config (beyond ``peft_fields`` and ``peft_constants``); most methods: none."""
        return {}

    @classmethod
    def peft_extra_in(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Fields computed from a PEFT config, and checks that refuse what deltatune cannot represent (raise a
        ValueError saying what); applied after the plain ``peft_fields`` copies. Most methods: none."""
        return {}

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        """The PEFT-format ``adapter_config.json`` fields, for exactly ``target_modules`` (io/peft.py)."""
        return _PEFT["to"](self, target_modules)

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> DeltaConfig:
        """The config a PEFT-format ``adapter_config.json`` describes (io/peft.py)."""
        return _PEFT["from"](cls, data)

    def for_model(self, model: nn.Module) -> DeltaConfig:
        """This config with the fields that depend on the model filled in (and checked against it), before any
        delta is built. Most methods depend on nothing beyond the adapted modules and return ``self``; input-level
        methods record the model's geometry (layers, heads, task), as the PEFT format does. Raise a ValueError
        naming the field if the config cannot apply to ``model``."""
        return self

    def training_callbacks(self, dm: Any, name: str) -> list[Any]:
        """Training hooks (:class:`deltatune.core.hooks.TrainingHook`) this method needs while adapter ``name``
        trains, e.g. a rank-budget schedule or a regulariser. Most methods need none."""
        return []

    def combines(self) -> list[str]:
        """The adapters whose outputs this adapter's deltas combine (an AdapterFusion's); most methods: none. Such
        an adapter works only inside a composition block (``dt.Fuse``), and its adapters stay while it exists."""
        return []

    def saved_config(self) -> DeltaConfig:
        """The config that describes the *saved* files (a method may save in a converted form)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build from a dict, dropping (with a warning) keys this release does not know."""
        data = {k: v for k, v in data.items() if k != "type"}
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown config keys {unknown} (written by a newer release?)",
                stacklevel=2,
            )
            data = {k: v for k, v in data.items() if k not in unknown}
        return cls(**data)


# The PEFT format is io's business: io/peft.py registers its mapper here when imported (importing deltatune does).
_PEFT: dict[str, Callable[..., Any]] = {}


def register_peft_mapper(to_peft: Callable[..., dict[str, Any]], from_peft: Callable[..., DeltaConfig]) -> None:
    """Install the functions behind :meth:`DeltaConfig.to_peft` and :meth:`DeltaConfig.from_peft`."""
    _PEFT.update({"to": to_peft, "from": from_peft})
