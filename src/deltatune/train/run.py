"""A training run from a YAML file: validated before anything loads, then model -> data -> delta -> train.

    model: smollm2-135m            # short name, HF folder, or .gguf file
    task: causal-lm                # or classification (then num_labels)
    method: {type: lora, r: 16, alpha: 32, targets: all-linear}
    data: {train: data/train.jsonl, eval: data/eval.jsonl, format: prompt_completion, max_length: 256}
    train: {steps: 200, batch_size: 8, lr: 2.0e-4, warmup: 20, seed: 0, save_every: 50, eval_every: 50}
    output: runs/my-adapter
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.config import DeltaConfig
from ..core.model import DeltaModel
from ..core.registry import config_class
from ..core.targeting import output_heads
from ..models import load_pretrained
from .data import Collator, load_dataset
from .trainer import TrainConfig, Trainer, TrainResult

M = TypeVar("M", bound=BaseModel)


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: Path
    eval: Path | None = None
    format: Literal["text", "prompt_completion", "messages", "classification"] | None = None
    max_length: int = Field(512, gt=0)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    task: Literal["causal-lm", "classification"] = "causal-lm"
    num_labels: int | None = Field(None, gt=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    method: dict[str, Any] = Field(default_factory=lambda: {"type": "lora"})
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: Path

    @field_validator("method")
    @classmethod
    def _method(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "type" not in v:
            raise ValueError("method needs a 'type' (e.g. lora)")
        kwargs = {k: x for k, x in v.items() if k != "type"}
        config_class(v["type"])(**kwargs)  # raises naming the bad field
        return v

    @model_validator(mode="after")
    def _labels(self) -> RunConfig:
        if self.task == "classification" and self.num_labels is None:
            raise ValueError("task: classification needs num_labels")
        return self

    def method_config(self) -> DeltaConfig:
        v = dict(self.method)
        return config_class(v.pop("type"))(**v)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a section")
    d[last] = value


def read_run_file(path: str | Path, schema: type[M], overrides: Sequence[str] = (), sections: str = "") -> M:
    """Read a run YAML into ``schema``; ``overrides`` are ``key.sub=value`` strings (values parsed as YAML).
    Every problem names the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({sections or ', '.join(schema.model_fields)})")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        _set(raw, key.strip(), yaml.safe_load(value))
    try:
        return schema(**raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {problems}") from None


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a training run YAML (see :func:`read_run_file`)."""
    return read_run_file(path, RunConfig, overrides, "model, method, data, train, output")


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Load the model and data, attach the method, train; the adapter lands in ``cfg.output``.

    A fresh run refuses an output folder holding an earlier run unless ``overwrite`` (see ``Trainer.claim_output``).
    """
    fmt = cfg.data.format or ("classification" if cfg.task == "classification" else None)
    for f in (cfg.data.train, cfg.data.eval):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"data file not found: {f}")
    model, tok = load_pretrained(cfg.model, task=cfg.task, num_labels=cfg.num_labels, dtype=cfg.dtype)
    train_ds = load_dataset(cfg.data.train, tok, format=fmt, max_length=cfg.data.max_length)
    eval_ds = None
    if cfg.data.eval:  # same label order as training, whatever labels the eval file happens to hold
        eval_ds = load_dataset(cfg.data.eval, tok, format=fmt, max_length=cfg.data.max_length,
                               label_names=train_ds.label_names)
    mcfg = cfg.method_config()
    if cfg.task == "classification" and not mcfg.modules_to_save:
        mcfg = mcfg.model_copy(update={"modules_to_save": sorted(output_heads(model))})
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    dm = DeltaModel(model).add(mcfg)
    trainer = Trainer(dm, train_ds, cfg.train, cfg.output, eval_data=eval_ds, task=cfg.task,
                      collate=Collator(tok), progress=progress)
    trainer.claim_output(resume, overwrite)  # before anything is written into the folder
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return trainer.train(resume=resume)
