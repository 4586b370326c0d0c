"""A continual run from a YAML file (``deltatune continual RUN.yaml``):

    model: minilm-l6                   # any backbone deltatune loads (encoder, or decoder with pooling: last)
    pooling: mean                      # mean | cls | last
    method: {type: lora, r: 8}         # any registry method (omit for training-free strategies: simplecil)
    strategy: {name: replay, memory: 2000}
    stream: {train: data/train.jsonl, task_size: 15, seed: 0}   # or train: [a.jsonl, b.jsonl] (one task per file)
    eval: [data/val.jsonl]             # any number; each gets its own accuracy matrix
    train: {steps: 200, batch_size: 32, lr: 1.0e-3}             # per task
    output: runs/clinc-replay
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.config import DeltaConfig
from ..core.registry import config_class
from ..models import load_pretrained
from ..train.run import read_run_file
from ..train.trainer import TrainConfig
from .learner import Learner
from .metrics import AccuracyMatrix
from .run import run_stream
from .strategies import STRATEGIES, make_strategy
from .stream import EvalSet, Setting, TaskStream


class StreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: Path | list[Path]
    setting: Setting = "class"
    task_size: int | None = Field(None, gt=0)
    first_task_size: int | None = Field(None, gt=0)
    seed: int = 0
    shots: int | None = Field(None, gt=0)
    num_tasks: int | None = Field(None, gt=0)


class ContinualRunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    pooling: Literal["mean", "cls", "last"] = "mean"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    method: dict[str, Any] | None = None
    strategy: dict[str, Any]
    stream: StreamConfig
    eval: list[Path | list[Path]] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    max_length: int = Field(128, gt=0)
    batch_size: int = Field(64, gt=0)  # feature extraction
    output: Path

    @field_validator("method")
    @classmethod
    def _method(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            if "type" not in v:
                raise ValueError("method needs a 'type' (e.g. lora)")
            config_class(v["type"])(**{k: x for k, x in v.items() if k != "type"})  # raises naming the field
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("name") not in STRATEGIES:
            raise ValueError(f"strategy needs a 'name', one of {', '.join(sorted(STRATEGIES))}; got {v.get('name')!r}")
        return v

    def method_config(self) -> DeltaConfig | None:
        if self.method is None:
            return None
        v = dict(self.method)
        return config_class(v.pop("type"))(**v)

    def build_stream(self) -> TaskStream:
        s = self.stream
        if isinstance(s.train, list):
            return TaskStream.from_files(s.train, setting=s.setting)
        if s.task_size is None:
            raise ValueError("stream: one train file needs task_size (classes per task)")
        return TaskStream.from_file(s.train, task_size=s.task_size, seed=s.seed, first_task_size=s.first_task_size,
                                    setting=s.setting, shots=s.shots, num_tasks=s.num_tasks)

    def build_evals(self, stream: TaskStream) -> list[EvalSet]:
        out = []
        for i, e in enumerate(self.eval):
            if isinstance(e, list):
                out.append(EvalSet.from_files(e, stream, name=f"eval{i}"))
            else:
                name = Path(e).stem
                if any(x.name == name for x in out):
                    name = f"{name}{i}"
                out.append(EvalSet.from_file(e, stream, name=name))
        return out


def load_continual_config(path: str | Path, overrides: list[str] = ()) -> ContinualRunConfig:
    return read_run_file(path, ContinualRunConfig, overrides, "model, method, strategy, stream, eval, train, output")


def run_continual(cfg: ContinualRunConfig, *, resume: bool = False, progress: bool = True,
                  report=None) -> dict[str, AccuracyMatrix]:
    """Build the stream and evaluation sets (every file checked before the model loads), then learn task after task
    into ``cfg.output`` (resumable between tasks); ``report(line)`` gets one line per task."""
    stream = cfg.build_stream()
    evals = cfg.build_evals(stream)
    opts = {k: v for k, v in cfg.strategy.items() if k != "name"}
    backbone, tok = load_pretrained(cfg.model, dtype=cfg.dtype)
    torch.manual_seed(cfg.train.seed)
    learner = Learner(backbone, tok, stream.num_classes, cfg.method_config(), cfg.train, pooling=cfg.pooling,
                      max_length=cfg.max_length, batch_size=cfg.batch_size, progress=progress)
    strategy = make_strategy(cfg.strategy["name"], learner, stream, **opts)
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / "run.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))

    def done(t: int, seconds: float) -> None:
        if report is not None:
            report(f"task {t + 1}/{len(stream)} done in {seconds:.1f} s")

    return run_stream(strategy, stream, evals, cfg.output, resume=resume, progress=done)
