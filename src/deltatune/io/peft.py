"""The PEFT format's ``adapter_config.json``: one mapper, both ways, for every method.

A method declares on its Config what is particular to it (see ``DeltaConfig``, "the PEFT format"): its
``peft_type``, the fields PEFT names differently or the same (``peft_fields``: deltatune field -> PEFT key), the
keys PEFT wants with a fixed value (``peft_constants``), and, only for what is not a plain copy, ``peft_extra()``
(computed keys written) and ``peft_extra_in(d)`` (checks and computed fields read). Everything every method
shares is here: the header (type, task, inference mode, base model), targeting (``target_modules``,
``exclude_modules``, ``layers_to_transform``, ``layers_pattern``, ``modules_to_save``, as PEFT spells each form),
the refusal of trained biases, and PEFT's prompt-learning layout (no target modules; the model's geometry).
"""

from __future__ import annotations

from typing import Any

from ..core.config import DeltaConfig, register_peft_mapper

_HEADER_END = {"inference_mode": True, "base_model_name_or_path": None, "revision": None}


def to_peft(cfg: DeltaConfig, target_modules: str | list[str] | None) -> dict[str, Any]:
    """``cfg`` as PEFT's ``adapter_config.json`` fields, adapting exactly ``target_modules``. Raises
    NotImplementedError for a method PEFT does not have."""
    kind = cfg.peft_saved_as or cfg.peft_type
    if kind is None:
        raise NotImplementedError(f"{type(cfg).__name__} has no PEFT-format equivalent")
    out: dict[str, Any] = {"peft_type": kind}
    if cfg.peft_prompt_learning:  # its task_type is a field (peft_fields)
        out["num_transformer_submodules"] = 1
    else:
        out.update(task_type=None, target_modules=target_modules, exclude_modules=None)
        if cfg.peft_layers:
            out.update(layers_to_transform=None, layers_pattern=None)  # the exact target_modules say it all
    out["modules_to_save"] = cfg.modules_to_save
    out.update({key: getattr(cfg, field) for field, key in cfg.peft_fields.items()})
    out.update(cfg.peft_constants)
    out.update(_HEADER_END)
    out.update(cfg.peft_extra())
    return out


def from_peft(cls: type[DeltaConfig], d: dict[str, Any]) -> DeltaConfig:
    """The config of class ``cls`` a PEFT ``adapter_config.json`` (``d``) describes; a ValueError names what
    deltatune cannot represent."""
    name = cls.__name__.removesuffix("Config")
    if d.get("bias", "none") != "none":
        raise ValueError(f"{name} with bias={d['bias']!r} (trained biases) is not supported; only bias='none'")
    kw: dict[str, Any] = {}
    if cls.peft_prompt_learning:
        if (d.get("num_transformer_submodules") or 1) != 1:
            raise ValueError(f"{d.get('peft_type')} with num_transformer_submodules={d['num_transformer_submodules']} "
                             f"(encoder-decoder models) is not supported")
        kw["modules_to_save"] = list(dict.fromkeys(d.get("modules_to_save") or [])) or None
    else:
        layers, pattern = d.get("layers_to_transform"), d.get("layers_pattern")
        kw.update(targets=d.get("target_modules"), exclude=d.get("exclude_modules") or None,
                  modules_to_save=d.get("modules_to_save") or None)
        if cls.peft_layers:
            kw.update(layers=[layers] if isinstance(layers, int) else layers,
                      layers_pattern=pattern[0] if isinstance(pattern, list) else pattern)
    for field, key in cls.peft_fields.items():
        if d.get(key) is not None:  # absent or null: the field's default
            kw[field] = d[key]
    kw.update(cls.peft_extra_in(d))
    return cls(**kw)


register_peft_mapper(to_peft, from_peft)  # behind DeltaConfig.to_peft / from_peft
