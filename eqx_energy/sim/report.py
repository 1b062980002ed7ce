"""Success-rate table of closed-loop evaluations: Wilson 95% intervals, JSON, Markdown and a PNG bar chart.

Wilson score interval for k successes in n trials, p = k / n, z = 1.95996 (95%):
    center = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
It stays inside [0, 1] and is not degenerate at p = 0 or 1 (the normal interval is).

    runs = {"no correction": evaluate(...), "correction": evaluate(...)}
    paths = write_report(runs, "runs/eval")          # results.json, results.md, success.png
    runs = load_results(paths["json"])               # the same EvalResult objects back
"""

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eqx_energy._files import atomic_write

Z95 = 1.959963984540054  # Phi^-1(0.975)


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) for successes / trials (see the module docstring)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval needs trials >= 1 and 0 <= successes <= trials; "
                         f"got successes={successes}, trials={trials}")
    p, n = successes / trials, trials
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return (0.0 if successes == 0 else center - half), (1.0 if successes == trials else center + half)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """Per-episode outcomes of one task: success flags, episode lengths (env steps), wall seconds."""

    task: str
    successes: tuple[bool, ...]
    lengths: tuple[int, ...]
    wall_s: float

    def __post_init__(self):
        if not self.successes or len(self.successes) != len(self.lengths):
            raise ValueError(f"TaskResult({self.task!r}) needs one success flag and one length per episode; "
                             f"got {len(self.successes)} flags and {len(self.lengths)} lengths")

    @property
    def episodes(self) -> int:
        return len(self.successes)

    @property
    def success_rate(self) -> float:
        return sum(self.successes) / self.episodes

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(sum(self.successes), self.episodes)

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths))

    def summary(self) -> dict[str, Any]:
        """The derived numbers (rate, Wilson CI, mean length, wall time) as a JSON-ready dict."""
        lengths_ok = [n for n, ok in zip(self.lengths, self.successes) if ok]
        return {"episodes": self.episodes, "successes": sum(self.successes), "success_rate": self.success_rate,
                "ci95": list(self.ci95), "mean_length": self.mean_length,
                "mean_length_success": float(np.mean(lengths_ok)) if lengths_ok else None, "wall_s": self.wall_s}


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation setting: a TaskResult per task (in order) and the settings that produced it."""

    tasks: tuple[TaskResult, ...]
    settings: Mapping[str, Any]

    @property
    def overall(self) -> TaskResult:
        """All tasks' episodes pooled (the rate is over episodes, so tasks weigh by their episode counts)."""
        return TaskResult("overall", sum((t.successes for t in self.tasks), ()),
                          sum((t.lengths for t in self.tasks), ()), sum(t.wall_s for t in self.tasks))

    def __getitem__(self, task: str) -> TaskResult:
        for result in self.tasks:
            if result.task == task:
                return result
        raise KeyError(f"no result for task {task!r}; have {[t.task for t in self.tasks]}")

    def to_json(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "overall": self.overall.summary(),
                "tasks": {t.task: {**t.summary(), "per_episode": {"success": list(t.successes),
                                                                  "length": list(t.lengths)}}
                          for t in self.tasks}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EvalResult":
        tasks = tuple(TaskResult(name, tuple(bool(s) for s in r["per_episode"]["success"]),
                                 tuple(int(n) for n in r["per_episode"]["length"]), float(r["wall_s"]))
                      for name, r in data["tasks"].items())
        return cls(tasks, dict(data["settings"]))


def _as_runs(runs: "EvalResult | Mapping[str, EvalResult]") -> dict[str, EvalResult]:
    return {"eval": runs} if isinstance(runs, EvalResult) else dict(runs)


def markdown_table(runs: "EvalResult | Mapping[str, EvalResult]") -> str:
    """Rows: tasks + overall; columns: one per run, 'rate [low, high] (mean length)'."""
    runs = _as_runs(runs)
    names = list(dict.fromkeys(t.task for r in runs.values() for t in r.tasks)) + ["overall"]
    lines = ["| task | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for name in names:
        cells = []
        for result in runs.values():
            if name != "overall" and name not in {t.task for t in result.tasks}:
                cells.append("-")
                continue
            t = result.overall if name == "overall" else result[name]
            lo, hi = t.ci95
            cells.append(f"{t.success_rate:.2f} [{lo:.2f}, {hi:.2f}] ({t.mean_length:.0f} steps, n={t.episodes})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_success(runs: "EvalResult | Mapping[str, EvalResult]", path: str | os.PathLike) -> Path:
    """Grouped bar chart: one group per task (+ overall), one bar per run, Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _as_runs(runs)
    names = list(dict.fromkeys(t.task for r in runs.values() for t in r.tasks)) + ["overall"]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) * len(runs) ** 0.5), 4.5), layout="constrained")
    for i, (label, result) in enumerate(runs.items()):
        have = {t.task: t for t in result.tasks} | {"overall": result.overall}
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, n in enumerate(names) if n in have]
        rates = np.array([have[n].success_rate for n in names if n in have])
        cis = np.array([have[n].ci95 for n in names if n in have])
        ax.bar(xs, rates, width, yerr=np.stack([rates - cis[:, 0], cis[:, 1] - rates]), capsize=3, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("success rate (Wilson 95% CI)")
    fig.legend(loc="outside upper center", ncols=min(4, len(runs)), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(runs: "EvalResult | Mapping[str, EvalResult]", out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json (every run, per episode), results.md (the table) and success.png into out_dir."""
    runs, out = _as_runs(runs), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "success.png"}
    atomic_write(paths["json"], json.dumps({name: r.to_json() for name, r in runs.items()}, indent=1) + "\n")
    atomic_write(paths["markdown"], markdown_table(runs))
    plot_success(runs, paths["png"])
    return paths


def load_results(path: str | os.PathLike) -> dict[str, EvalResult]:
    """The runs of a results.json written by write_report."""
    return {name: EvalResult.from_json(data) for name, data in json.loads(Path(path).read_text()).items()}
