"""A task stream: classes (or domains) arriving in order, each task with its training examples.

Settings (van de Ven et al. 2022, "Three types of incremental learning"):

- ``class``: class-incremental. Each task brings new classes; at test time no task id is given and the learner
  chooses among every class seen so far.
- ``task``: task-incremental. As ``class``, but the task id is given at test time: the choice is among that task's
  classes only.
- ``domain``: domain-incremental. Every task has the same label set, from another data file (domain).

A class's id is its position in the stream's class order, so task ``t`` of a class-incremental stream holds ids
``offsets[t] .. offsets[t+1]-1`` and ``label_names[id]`` is its name in the data file.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..train.data import DataError, read_rows

Setting = Literal["class", "task", "domain"]
SETTINGS: tuple[str, ...] = ("class", "task", "domain")


@dataclass
class Task:
    """Task ``index``: the class ids it is about, and its training examples as (text, class id) pairs."""

    index: int
    classes: list[int]
    examples: list[tuple[str, int]]
    name: str = ""

    @property
    def texts(self) -> list[str]:
        return [t for t, _ in self.examples]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.examples]


@dataclass
class TaskStream:
    """Tasks in order, the class names (index = class id) and the setting."""

    tasks: list[Task]
    label_names: list[str]
    setting: Setting = "class"
    meta: dict = field(default_factory=dict)  # how it was built (file, seed, task size, shots), saved with results

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def seen_classes(self, t: int) -> list[int]:
        """Class ids of tasks 0..t (in order, without repeats)."""
        out: list[int] = []
        for task in self.tasks[: t + 1]:
            out += [c for c in task.classes if c not in out]
        return out

    def task_of_class(self) -> dict[int, int]:
        """The first task each class appears in."""
        owner: dict[int, int] = {}
        for task in self.tasks:
            for c in task.classes:
                owner.setdefault(c, task.index)
        return owner

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, *, task_size: int, seed: int = 0, first_task_size: int | None = None,
                  setting: Setting = "class", shots: int | None = None, num_tasks: int | None = None,
                  class_order: Sequence[str] | None = None) -> TaskStream:
        """Split one classification file (``text``/``label`` rows) into tasks of ``task_size`` classes.

        The class order is the sorted label names shuffled by ``seed`` (or ``class_order``, the label names in the
        order wanted); the first task may be larger (``first_task_size``, the "B50-Inc10"-style protocols);
        ``shots`` keeps that many examples per class in every task after the first (few-shot class-incremental
        learning, seeded); ``num_tasks`` stops the stream early.
        """
        if setting not in ("class", "task"):
            raise ValueError(f"from_file builds class- or task-incremental streams, not {setting!r}; a "
                             f"domain-incremental stream comes from one file per domain (TaskStream.from_files)")
        if task_size <= 0 or (first_task_size is not None and first_task_size <= 0):
            raise ValueError(f"task sizes must be > 0, got task_size={task_size}, first_task_size={first_task_size}")
        if shots is not None and shots <= 0:
            raise ValueError(f"shots must be > 0, got {shots}")
        rows = _labelled(path)
        names = sorted({y for _, y in rows})
        if class_order is not None:
            order = [str(c) for c in class_order]
            if sorted(order) != names:
                missing = sorted(set(names) - set(order))
                extra = sorted(set(order) - set(names))
                raise ValueError(f"{path}: class_order must list every label once; missing {missing[:5]}, "
                                 f"not in the file {extra[:5]}")
        else:
            order = list(names)
            random.Random(seed).shuffle(order)
        first = first_task_size or task_size
        if first > len(order):
            raise ValueError(f"{path}: the first task needs {first} classes; the file has {len(order)}")
        bounds = [0, first]
        while bounds[-1] < len(order):
            bounds.append(min(bounds[-1] + task_size, len(order)))
        if num_tasks is not None:
            if num_tasks <= 0:
                raise ValueError(f"num_tasks must be > 0, got {num_tasks}")
            bounds = bounds[: num_tasks + 1]
        full, order = order, order[: bounds[-1]]
        cid = {n: i for i, n in enumerate(order)}
        by_class: dict[int, list[str]] = {}
        for text, y in rows:
            if y in cid:
                by_class.setdefault(cid[y], []).append(text)
        rng = random.Random(seed + 1)
        tasks = []
        for t in range(len(bounds) - 1):
            classes = list(range(bounds[t], bounds[t + 1]))
            examples = []
            for c in classes:
                texts = by_class[c]
                if shots is not None and t > 0:
                    if len(texts) < shots:
                        raise ValueError(f"{path}: class {order[c]!r} has {len(texts)} examples, fewer than "
                                         f"shots={shots}")
                    texts = rng.sample(texts, shots)
                examples += [(x, c) for x in texts]
            tasks.append(Task(t, classes, examples, name=f"task {t}"))
        meta = {"file": str(path), "seed": seed, "task_size": task_size, "first_task_size": first_task_size,
                "shots": shots, "setting": setting, "num_tasks": num_tasks, "class_order": full}
        return cls(tasks, order, setting, meta)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], *, setting: Setting = "domain") -> TaskStream:
        """One task per file. ``domain``: every file has the same label set (another domain of one problem);
        ``class``/``task``: each file brings its own classes (a label seen in an earlier file is refused)."""
        if not paths:
            raise ValueError("from_files needs at least one data file")
        files = [_labelled(p) for p in paths]
        if setting == "domain":
            names = sorted({y for _, y in files[0]})
            for p, rows in zip(paths, files):
                if (got := sorted({y for _, y in rows})) != names:
                    raise ValueError(f"{p}: a domain-incremental stream needs the same labels in every file; "
                                     f"{paths[0]} has {names[:8]}, this one {got[:8]}")
            cid = {n: i for i, n in enumerate(names)}
            tasks = [Task(t, list(range(len(names))), [(x, cid[y]) for x, y in rows], name=Path(p).stem)
                     for t, (p, rows) in enumerate(zip(paths, files))]
            return cls(tasks, names, "domain", {"files": [str(p) for p in paths], "setting": "domain"})
        names, tasks = [], []
        for t, (p, rows) in enumerate(zip(paths, files)):
            new = sorted({y for _, y in rows})
            if clash := [n for n in new if n in names]:
                raise ValueError(f"{p}: labels {clash[:5]} already came in an earlier file; class- and "
                                 f"task-incremental streams need disjoint label sets")
            start = len(names)
            names += new
            cid = {n: start + i for i, n in enumerate(new)}
            tasks.append(Task(t, list(range(start, len(names))), [(x, cid[y]) for x, y in rows], name=Path(p).stem))
        return cls(tasks, names, setting, {"files": [str(p) for p in paths], "setting": setting})


@dataclass
class EvalSet:
    """Test examples split by task: ``parts[i]`` are task i's (text, class id) pairs."""

    name: str
    parts: list[list[tuple[str, int]]]

    @classmethod
    def from_file(cls, path: str | Path, stream: TaskStream, name: str | None = None) -> EvalSet:
        """A file in the stream's format; each row goes to the task its class belongs to (for a domain stream use
        :meth:`from_files`). Rows of classes the stream does not hold (cut by ``num_tasks``) are left out; a label
        the stream never had is an error."""
        if stream.setting == "domain":
            raise ValueError("a domain-incremental stream is evaluated on one file per domain (EvalSet.from_files)")
        rows = _labelled(path)
        cid = {n: i for i, n in enumerate(stream.label_names)}
        known = set(stream.meta.get("class_order") or stream.label_names)
        owner = stream.task_of_class()
        parts: list[list[tuple[str, int]]] = [[] for _ in stream.tasks]
        for text, y in rows:
            if y not in known:
                raise DataError(f"{path}: label {y!r} is not one of the stream's classes")
            if y in cid:
                parts[owner[cid[y]]].append((text, cid[y]))
        return cls(name or Path(path).stem, parts)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], stream: TaskStream, name: str = "eval") -> EvalSet:
        """One file per task, in task order (a domain stream's test domains)."""
        if len(paths) != len(stream):
            raise ValueError(f"{len(paths)} eval files for {len(stream)} tasks; give one per task")
        cid = {n: i for i, n in enumerate(stream.label_names)}
        parts = []
        for p in paths:
            part = []
            for text, y in _labelled(p):
                if y not in cid:
                    raise DataError(f"{p}: label {y!r} is not one of the stream's classes")
                part.append((text, cid[y]))
            parts.append(part)
        return cls(name, parts)


def _labelled(path: str | Path) -> list[tuple[str, str]]:
    """(text, label name) pairs of a classification file; labels as strings (``1`` and ``"1"`` are one class)."""
    out = []
    for n, row in enumerate(read_rows(path), 1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, row {n}: field 'text' must be a non-empty string")
        if label is None or isinstance(label, bool) or not isinstance(label, int | str) or not str(label).strip():
            raise DataError(f"{path}, row {n}: field 'label' must be an integer or a non-empty string, got {label!r}")
        out.append((text, str(label).strip()))
    return out
