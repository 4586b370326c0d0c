"""Continual-learning metrics from the accuracy matrix ``a[t][i]``: after training on task t, the accuracy on task
i's test examples (i <= t; in a class-incremental stream, over every class seen so far).

- ``accuracy[t]``: after task t, the accuracy on every test example of tasks 0..t (example-weighted, A_t).
- ``last``: ``accuracy[T-1]``; ``average_incremental``: the mean of ``accuracy`` over tasks (Rebuffi et al. 2017).
- ``forgetting``: mean over i < T-1 of ``max_{i <= t < T-1} a[t][i] - a[T-1][i]`` (Chaudhry et al. 2018).
- ``backward_transfer``: mean over i < T-1 of ``a[T-1][i] - a[i][i]`` (Lopez-Paz & Ranzato 2017, BWT).

Accuracies are fractions in [0, 1]; the JSON holds the matrix (null above the diagonal), the counts and the summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AccuracyMatrix:
    """``rows[t][i]`` for i <= t (rows grow as tasks are learnt); ``counts[i]``: task i's test examples."""

    counts: list[int]
    rows: list[list[float]] = field(default_factory=list)
    name: str = "eval"

    def add_row(self, row: list[float]) -> None:
        t = len(self.rows)
        if len(row) != t + 1:
            raise ValueError(f"after task {t} the row holds {t + 1} accuracies (tasks 0..{t}), got {len(row)}")
        if any(not (0.0 <= a <= 1.0) and not math.isnan(a) for a in row):
            raise ValueError(f"accuracies are fractions in [0, 1], got {row}")
        self.rows.append([float(a) for a in row])

    @property
    def tasks(self) -> int:
        return len(self.rows)

    def accuracy(self) -> list[float]:
        """A_t for every task learnt: accuracy on all test examples of tasks 0..t, weighted by their counts."""
        out = []
        for t, row in enumerate(self.rows):  # a task with no test examples (NaN accuracy) weighs nothing
            n = sum(self.counts[: t + 1])
            out.append(sum(a * c for a, c in zip(row, self.counts) if c) / n if n else math.nan)
        return out

    def summary(self) -> dict[str, float]:
        acc = self.accuracy()
        if not acc:
            return {}
        last_t = len(self.rows) - 1
        old = range(last_t)
        forgetting = [max(self.rows[t][i] for t in range(i, last_t)) - self.rows[last_t][i] for i in old]
        bwt = [self.rows[last_t][i] - self.rows[i][i] for i in old]
        return {
            "last": acc[-1],
            "average_incremental": sum(acc) / len(acc),
            "forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
            "backward_transfer": sum(bwt) / len(bwt) if bwt else 0.0,
        }

    # -- files -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        n = len(self.counts)
        return {"name": self.name, "counts": self.counts,
                "matrix": [row + [None] * (n - len(row)) for row in self.rows],
                "accuracy": self.accuracy(), **self.summary()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccuracyMatrix:
        m = cls(list(d["counts"]), name=d.get("name", "eval"))
        for row in d["matrix"]:
            m.add_row([a for a in row if a is not None])
        return m

    def save(self, folder: str | Path, *, plots: bool = True) -> Path:
        """``<name>.json`` (+ ``<name>_matrix.png`` heatmap and ``<name>_accuracy.png`` curve) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"{self.name}.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(out)
        if plots and self.rows:
            self.plot(folder)
        return out

    def plot(self, folder: Path) -> tuple[Path, Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.counts)
        grid = [[math.nan] * n for _ in range(n)]
        for t, row in enumerate(self.rows):
            grid[t][: len(row)] = [100 * a for a in row]
        fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 0.8 + 0.45 * n), dpi=120)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for t in range(len(self.rows)):
            for i in range(t + 1):
                ax.text(i, t, f"{grid[t][i]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[t][i] < 60 else "black")
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        ax.set_title(f"{self.name}: accuracy (%)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        heat = folder / f"{self.name}_matrix.png"
        fig.savefig(heat)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(range(1, len(self.rows) + 1), [100 * a for a in self.accuracy()], "o-")
        ax.set_xlabel("tasks learnt")
        ax.set_ylabel("accuracy on classes seen (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        curve = folder / f"{self.name}_accuracy.png"
        fig.savefig(curve)
        plt.close(fig)
        return heat, curve
