"""Read a Hydra multirun folder into tables and plots (used by ``experiments/<slug>/analyze.py``).

A multirun folder holds one sub-folder per job, each with ``metrics.jsonl`` and
``.hydra/overrides.yaml`` (the job's ``key=value`` overrides). Runs are grouped by the values
of some keys (e.g. ``algorithm`` and ``experiment``); the other swept key (``seed``) is what
the mean ± std is over.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    path: Path
    overrides: dict[str, str]
    rows: list[dict] = field(repr=False)

    @property
    def complete(self) -> bool:
        """The run finished (the trainer writes ``summary.json`` last)."""
        return (self.path / "summary.json").exists()

    def final(self, metric: str) -> float | None:
        """The metric's last logged value (None if never logged)."""
        values = [r[metric] for r in self.rows if metric in r]
        return float(values[-1]) if values else None

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], float(r[metric])) for r in self.rows if metric in r]
        return [s for s, _ in pts], [v for _, v in pts]


def load_runs(root: str | Path) -> list[Run]:
    """Every job folder below ``root`` that has a ``metrics.jsonl``, sorted by path."""
    import yaml

    runs = []
    for metrics in sorted(Path(root).rglob("metrics.jsonl")):
        job = metrics.parent
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides = {}
        if ov_file.exists():
            for o in yaml.safe_load(ov_file.read_text()) or []:
                key, _, value = str(o).partition("=")
                overrides[key.lstrip("+~")] = value
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        runs.append(Run(job, overrides, rows))
    return runs


def group_runs(runs: list[Run], by: list[str]) -> dict[tuple[str, ...], list[Run]]:
    groups: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(r.overrides.get(k, "-") for k in by)].append(r)
    return dict(sorted(groups.items()))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(runs: list[Run], by: list[str], metrics: list[str]) -> str:
    """A markdown table: one row per group, ``mean ± std (n)`` of each metric's final value."""
    lines = ["| " + " | ".join([*by, *metrics]) + " |", "|" + " --- |" * (len(by) + len(metrics))]
    for key, group in group_runs(runs, by).items():
        cells = []
        for m in metrics:
            vals = [v for v in (r.final(m) for r in group) if v is not None and math.isfinite(v)]
            if vals:
                mu, sd = mean_std(vals)
                cells.append(f"{mu:.3f} ± {sd:.3f} ({len(vals)})")
            else:
                cells.append("—")
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[Run], by: list[str], metric: str, path: str | Path) -> None:
    """Learning curves of ``metric``: per group, the mean over its runs at each logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for key, group in group_runs(runs, by).items():
        by_step: dict[int, list[float]] = defaultdict(list)
        for r in group:
            for s, v in zip(*r.curve(metric)):
                by_step[s].append(v)
        if by_step:
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".", label=" ".join(key))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bars(runs: list[Run], by: list[str], metric: str, path: str | Path) -> None:
    """Final ``metric`` per group: mean with the sample std as the error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, means, stds = [], [], []
    for key, group in group_runs(runs, by).items():
        vals = [v for v in (r.final(metric) for r in group) if v is not None]
        if vals:
            mu, sd = mean_std(vals)
            labels.append("\n".join(key))
            means.append(mu)
            stds.append(sd)
    fig, ax = plt.subplots(figsize=(max(4, len(labels) * 0.8), 4), dpi=80)
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
