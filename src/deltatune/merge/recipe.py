"""Merge recipes: the YAML ``deltatune merge RECIPE.yaml`` reads, in mergekit's vocabulary.

::

    method: ties                    # an operator of deltatune.merge.ops (alias: merge_method)
    base: path/to/base              # HF folder or .safetensors file (alias: base_model); needed by task-vector ops
    models:
      - {model: path/to/ft_math, weight: 0.6, density: 0.5}
      - {model: path/to/ft_code+path/to/lora, weight: [0, 0.5, 1]}   # model+adapter; a gradient
    params: {normalize: true}       # shared parameters; per-model ones here are defaults for every model
    dtype: bfloat16                 # output dtype (default: each tensor keeps the reference model's)
    out: merged/
    shard_size: 2GB
    seed: 0

Every parameter value is a *setting*, resolved per tensor exactly as mergekit 0.1.5 does
(``mergekit.config.evaluate_setting``):

- a scalar: that value everywhere;
- a list of scalars, a *gradient* ``[v_0, ..., v_{n-1}]``: at layer ``l`` of ``L`` (``t = l / (L - 1)``,
  ``t = 1`` when ``L = 1``, ``t = 0`` for tensors outside the numbered layers: embeddings, final norm, head)
  the value is the linear interpolation ``(1 - f) v_i + f v_{i+1}`` with ``s = t (n - 1)``, ``i = floor(s)``,
  ``f = s - i``; non-numeric gradients pick ``v_{floor(t (n - 1))}``;
- ``{filter: self_attn, value: ...}`` or a list of them: the first entry whose ``filter`` is a substring of
  the tensor name (or is ``*`` / absent) gives the value (itself a scalar or a gradient); none matching
  means "not set here".

A per-model parameter is looked up in the model's own entry, then in ``params``, then the operator's
default; a shared parameter in ``params``, then the default. Everything is checked against the operator's
spec (``ops.get(method)``) when the recipe is loaded, before any tensor is read. Relative paths are
relative to the working directory, as in mergekit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from . import ops

Scalar = bool | int | float | str
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64", "fp64": "float64"}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


class RecipeError(ValueError):
    """A recipe that cannot run: bad YAML, unknown method or parameter, a value of the wrong type."""


@dataclass(frozen=True)
class Cond:
    """One entry of a setting: ``value`` (scalar or gradient) where ``filter`` matches the tensor name."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


Setting = tuple[Cond, ...]


def parse_setting(v: Any, where: str) -> Setting:
    """Normalise a YAML parameter value (scalar, gradient, ``{filter, value}`` or a list of those)."""
    def cond(d: dict) -> Cond:
        extra = set(d) - {"filter", "value"}
        if extra or "value" not in d:
            raise RecipeError(f"{where}: a filtered value is {{filter: <substring>, value: <value>}}, got {d}")
        if d.get("filter") is not None and not isinstance(d["filter"], str):
            raise RecipeError(f"{where}: filter must be a string, got {d['filter']!r}")
        return Cond(_value(d["value"], where), d.get("filter"))

    if isinstance(v, dict):
        return (cond(v),)
    if isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
        return tuple(cond(e) for e in v)
    return (Cond(_value(v, where)),)


def _value(v: Any, where: str) -> Scalar | tuple[Scalar, ...]:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        if not v:
            raise RecipeError(f"{where}: an empty list is not a value")
        if not all(isinstance(e, (bool, int, float, str)) for e in v):
            raise RecipeError(f"{where}: a gradient is a list of numbers, got {v}")
        return tuple(v)
    raise RecipeError(f"{where}: expected a number, a gradient list or {{filter, value}} entries, got {v!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def gradient_value(v: Scalar | tuple[Scalar, ...], t: float) -> Scalar:
    """A scalar as is; a gradient interpolated at ``t`` in [0, 1] (mergekit's rule, see the module doc)."""
    if not isinstance(v, tuple):
        return v
    if not all(_is_number(e) for e in v):
        return v[int(t * (len(v) - 1))]
    s = t * (len(v) - 1)
    i0 = int(s)
    i1 = min(len(v) - 1, i0 + 1)
    f = s - i0
    return (1 - f) * v[i0] + f * v[i1]


def evaluate(setting: Setting | None, tensor: str, t: float) -> Scalar | None:
    """The value of ``setting`` for ``tensor`` at layer position ``t``; None when no filter matches."""
    for c in setting or ():
        if c.filter is None or c.filter == "*" or c.filter in tensor:
            return gradient_value(c.value, t)
    return None


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """``t`` per tensor name: ``l / (L - 1)`` for the first numbered component (``model.layers.<l>.``),
    ``L`` the number of layers under that prefix (1 if ``L == 1``), 0 for tensors outside numbered layers."""
    found: dict[str, tuple[str, int]] = {}
    count: dict[str, int] = {}
    for n in names:
        m = _LAYER.search(n)
        if m:
            prefix, idx = n[:m.start()], int(m.group(1))
            found[n] = (prefix, idx)
            count[prefix] = max(count.get(prefix, 0), idx + 1)
    out = {}
    for n in names:
        if n not in found:
            out[n] = 0.0
        else:
            prefix, idx = found[n]
            total = count[prefix]
            out[n] = idx / (total - 1) if total > 1 else 1.0
    return out


def parse_size(v: int | str) -> int:
    """``2GB`` -> 2e9 bytes (``GiB``: 2**30; a plain integer is bytes)."""
    if isinstance(v, bool):
        raise RecipeError(f"shard_size must be a size like 2GB, got {v!r}")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(v))
        if not m or m.group(2).lower() not in _UNITS or m.group(1).count(".") > 1:
            raise RecipeError(f"shard_size must be a size like 2GB, 500MB or 1GiB, got {v!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower() or "b"])
    if n <= 0:
        raise RecipeError(f"shard_size must be positive, got {v!r}")
    return n


@dataclass(frozen=True)
class ModelRef:
    """One input: a checkpoint, optionally with an adapter folder applied on read (``model+adapter``)."""

    path: Path
    adapter: Path | None = None

    @classmethod
    def parse(cls, s: str) -> ModelRef:
        if "+" in s and not Path(s).exists():
            model, adapter = s.rsplit("+", 1)
            return cls(Path(model), Path(adapter))
        return cls(Path(s))

    def __str__(self) -> str:
        return str(self.path) + (f"+{self.adapter}" if self.adapter else "")


class ModelEntry(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ref: ModelRef
    params: dict[str, Setting] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A validated merge recipe (see the module docstring). Build with :func:`load_recipe`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    method: str = Field(validation_alias=AliasChoices("method", "merge_method"))
    base: ModelRef | None = Field(None, validation_alias=AliasChoices("base", "base_model"))
    models: list[ModelEntry] = Field(min_length=1)
    params: dict[str, Setting] = Field(default_factory=dict, validation_alias=AliasChoices("params", "parameters"))
    dtype: str | None = Field(None, validation_alias=AliasChoices("dtype", "out_dtype"))
    out: Path | None = None
    shard_size: int = 5 * 10**9
    seed: int = 0

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        if isinstance(v, str):
            ops.get(v)  # unknown method: the error lists the available ones
        return v

    @field_validator("base", mode="before")
    @classmethod
    def _base(cls, v: Any) -> Any:
        if v is None or isinstance(v, ModelRef):
            return v
        if not isinstance(v, str):
            raise ValueError(f"base must be a path, got {v!r}")
        ref = ModelRef.parse(v)
        if ref.adapter is not None:
            raise ValueError(f"base {v!r}: an adapter on the base is not supported; merge it into the base first")
        return ref

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError(f"models must be a list of {{model: path, <param>: value}} entries, got {v!r}")
        out = []
        for i, e in enumerate(v):
            if isinstance(e, ModelEntry):
                out.append(e)
                continue
            if isinstance(e, str):
                e = {"model": e}
            if not isinstance(e, dict) or not isinstance(e.get("model"), str):
                raise ValueError(f"models[{i}]: expected {{model: path, <param>: value}}, got {e!r}")
            params = {k: x for k, x in e.items() if k not in ("model", "parameters")}
            nested = e.get("parameters") or {}  # mergekit's form: {model: ..., parameters: {weight: ...}}
            if not isinstance(nested, dict):
                raise ValueError(f"models[{i}].parameters must be a mapping, got {nested!r}")
            both = sorted(set(params) & set(nested))
            if both:
                raise ValueError(f"models[{i}]: {both} given both directly and under parameters")
            params.update(nested)
            out.append(ModelEntry(ref=ModelRef.parse(e["model"]),
                                  params={k: parse_setting(x, f"models[{i}].{k}") for k, x in params.items()}))
        return out

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"params must be a mapping of parameter: value, got {v!r}")
        return {k: x if isinstance(x, tuple) else parse_setting(x, f"params.{k}") for k, x in v.items()}

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        if v is None:
            return v
        key = str(v).lower().removeprefix("torch.")
        if key not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {sorted(set(DTYPES.values()))}")
        return DTYPES[key]

    @field_validator("shard_size", mode="before")
    @classmethod
    def _shard(cls, v: Any) -> Any:
        return parse_size(v)

    @model_validator(mode="after")
    def _against_spec(self) -> Recipe:
        spec = ops.get(self.method)
        n = len(self.models)
        if spec.n_models is not None and n != spec.n_models:
            raise ValueError(f"{spec.name} merges exactly {spec.n_models} models; the recipe lists {n}")
        if spec.needs_base and self.base is None:
            raise ValueError(f"{spec.name} works on task vectors theta_i - theta_base: give a base model (base: ...)")
        self.params = {_canon(k, spec, "params"): s for k, s in self.params.items()}
        models = []
        for i, m in enumerate(self.models):
            params = {}
            for k, s in m.params.items():
                name = _canon(k, spec, f"models[{i}]")
                if name not in spec.per_model:
                    raise ValueError(f"models[{i}].{k}: {spec.name}'s {name!r} is shared by all models; "
                                     f"set it under params. Per-model parameters: {list(spec.per_model)}")
                params[name] = s
            models.append(m.model_copy(update={"params": params}))
        self.models = models
        for k, default in spec.defaults.items():
            per = k in spec.per_model
            for i, m in enumerate(self.models):
                if k in m.params:
                    m.params[k] = _checked(m.params[k], default, per, f"models[{i}].{k}")
            if k in self.params:
                self.params[k] = _checked(self.params[k], default, per, f"params.{k}")
        for k in spec.per_model:
            if spec.defaults[k] is None and k not in self.params:
                missing = [i for i, m in enumerate(self.models) if k not in m.params]
                if missing:
                    raise ValueError(f"{spec.name} needs {k!r} for every model; missing for models {missing} "
                                     f"({', '.join(str(self.models[i].ref) for i in missing)})")
        return self

    # -- resolution ----------------------------------------------------------------------------
    def resolve(self, tensor: str, t: float) -> dict[str, Any]:
        """The operator's keyword arguments for ``tensor`` at layer position ``t`` (per-model ones as lists)."""
        spec = ops.get(self.method)
        out: dict[str, Any] = {}
        for k, default in spec.defaults.items():
            if k in spec.per_model:
                values = []
                for i, m in enumerate(self.models):
                    v = evaluate(m.params.get(k), tensor, t)
                    v = evaluate(self.params.get(k), tensor, t) if v is None else v
                    v = default if v is None else v
                    if v is None:
                        raise RecipeError(f"{k!r} has no value for models[{i}] ({m.ref}) at tensor {tensor!r} "
                                          f"(no filter matches and there is no plain value)")
                    values.append(v)
                out[k] = values
            else:
                v = evaluate(self.params.get(k), tensor, t)
                if v is not None:
                    out[k] = v
        return out


def _canon(k: str, spec: ops.OpSpec, where: str) -> str:
    """The operator's name for parameter ``k`` (mergekit's ``lambda`` is ``lambda_`` in Python)."""
    if k in spec.defaults:
        return k
    if k + "_" in spec.defaults:
        return k + "_"
    raise ValueError(f"{where}.{k}: {spec.name} has no parameter {k!r}; it takes "
                     f"{sorted(p.rstrip('_') for p in spec.defaults)}")


def _checked(s: Setting, default: Any, per_model: bool, where: str) -> Setting:
    """``s`` with its values checked against the parameter's type (YAML's ``1e-3``, a string, becomes a number)."""
    numeric = per_model or (_is_number(default) and not isinstance(default, bool))

    def one(x: Scalar) -> Scalar:
        if numeric and isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                pass
        if numeric and not _is_number(x):
            raise ValueError(f"{where}: expected a number, got {x!r}")
        if isinstance(default, bool) and not isinstance(x, bool):
            raise ValueError(f"{where}: expected true or false, got {x!r}")
        if isinstance(default, str) and not isinstance(x, str):
            raise ValueError(f"{where}: expected a string, got {x!r}")
        return x

    return tuple(Cond(tuple(one(x) for x in c.value) if isinstance(c.value, tuple) else one(c.value), c.filter)
                 for c in s)


def _message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = ("unknown key" + (" (per-parameter filters go inside a parameter: "
                                    "weight: [{filter: self_attn, value: 0.5}, {value: 1}])"
                                    if loc == "filter" else ""))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_recipe(source: str | Path | dict) -> Recipe:
    """Read and validate a recipe from a YAML file (or an already-parsed mapping).

    Raises :class:`RecipeError` naming the file and the offending key, or ``FileNotFoundError``.
    """
    where = "recipe"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping (method:, base:, models:, ...), got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: {_message(e)}") from None
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
