"""Does alignment accuracy rise during a CodeRL+ run on the CPU?

Runs ``coderlplus-train experiment=coderlplus`` (plus any overrides) and turns its
``metrics.jsonl`` into a table of 10-step means (train ``align/accuracy``,
``align/item_accuracy``, ``align/format_rate``, codegen reward; held-out
``eval/align/accuracy`` and ``eval/pass@1`` at each evaluation), a least-squares slope per
10 steps, and a plot::

    .venv/bin/python experiments/align_rise/run.py                      # the README's run
    .venv/bin/python experiments/align_rise/run.py --name lr3e-4 optim.lr=3e-4
    .venv/bin/python experiments/align_rise/run.py --name P2 experiment=coderlplus_cpu seed=2  # its own steps
    .venv/bin/python experiments/align_rise/run.py --analyze outputs/align_rise/default other/run \
        --plot experiments/align_rise/align_rise.png

Runs go to ``outputs/align_rise/<name>``; the table to ``<run>/align_rise.md`` (and stdout),
the plot to ``<run>/align_rise.png`` (one figure for all runs given to ``--analyze``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The README's run: the preset as it stands, the step budget and evaluation cadence of this study.
BASE = [
    "experiment=coderlplus",
    "trainer.max_steps=60",
    "trainer.eval_every=10",
    "trainer.eval_splits=[validation]",
    "trainer.progress=false",
    "logger.wandb_mode=offline",
]
TRAIN = ["align/accuracy", "align/item_accuracy", "align/format_rate", "reward/codegen/mean"]
EVAL = ["eval/align/accuracy", "eval/align/item_accuracy", "eval/pass@1"]


def load(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    train = [r for r in rows if "batch/rollouts" in r]
    evals = [r for r in rows if "eval/align/accuracy" in r]
    return train, evals


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def table(run: Path, window: int = 10) -> str:
    train, evals = load(run)
    aligned = [r for r in train if "align/accuracy" in r]
    if not aligned:
        return f"{run}: no step with alignment prompts yet\n"
    last = max(r["step"] for r in train)
    lines = [
        f"### {run}\n",
        "| steps | "
        + " | ".join(f"`{m}`" for m in TRAIN)
        + " | "
        + " | ".join(f"`{m}`" for m in EVAL)
        + " |",
        "| --- " * (1 + len(TRAIN) + len(EVAL)) + "|",
    ]
    for lo in range(1, last + 1, window):
        hi = min(lo + window - 1, last)
        part = [r for r in train if lo <= r["step"] <= hi]
        cells = []
        for m in TRAIN:
            vals = [r[m] for r in part if m in r]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "—")
        ev = [r for r in evals if r["step"] == hi]  # the evaluation at the window's last step
        for m in EVAL:
            cells.append(f"{ev[-1][m]:.3f}" if ev and m in ev[-1] else "—")
        lines.append(f"| {lo}–{hi} | " + " | ".join(cells) + " |")
    before = [r for r in evals if r["step"] == 0]
    if before:
        lines.append(
            "\nBefore RL (step 0): " + ", ".join(f"`{m}` {before[0][m]:.3f}" for m in EVAL if m in before[0])
        )
    steps = [r["step"] for r in aligned]
    lines.append(
        "\nSlope per 10 steps (least squares over every step with alignment prompts): "
        + ", ".join(f"`{m}` {10 * slope(steps, [r[m] for r in aligned]):+.4f}" for m in TRAIN[:2])
        + "\n"
    )
    return "\n".join(lines)


def plot(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        train, evals = load(run)
        aligned = [r for r in train if "align/accuracy" in r]
        for ax, m in zip(axes[:2], TRAIN[:2]):
            steps, vals = [r["step"] for r in aligned], [r[m] for r in aligned]
            smooth = [
                sum(vals[max(0, i - 9) : i + 1]) / len(vals[max(0, i - 9) : i + 1]) for i in range(len(vals))
            ]
            (line,) = ax.plot(steps, vals, alpha=0.3)
            ax.plot(steps, smooth, color=line.get_color(), label=run.name)
            ax.set_title(f"train {m} (raw, 10-step mean)")
        axes[2].plot(
            [r["step"] for r in evals], [r["eval/align/accuracy"] for r in evals], "o-", label=run.name
        )
        axes[2].set_title("held-out eval/align/accuracy (greedy)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="default", help="run folder under outputs/align_rise/")
    ap.add_argument("--analyze", nargs="+", type=Path, help="only analyze these run dirs")
    ap.add_argument("--plot", type=Path, help="where the plot goes (default: <first run>/align_rise.png)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for coderlplus-train")
    args = ap.parse_args()
    runs = args.analyze
    if not runs:
        run = ROOT / "outputs" / "align_rise" / args.name
        base = BASE
        if any(o.startswith("experiment=") for o in args.overrides):  # another preset replaces ours
            base = [o for o in BASE if not o.startswith(("experiment=", "trainer.max_steps="))]
        cmd = [sys.executable, "-m", "coderlplus.train", *base, *args.overrides, f"hydra.run.dir={run}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        runs = [run]
    for run in runs:
        text = table(run)
        (run / "align_rise.md").write_text(text)
        print(text)
    out = args.plot or runs[0] / "align_rise.png"
    plot(runs, out)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
