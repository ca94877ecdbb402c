"""Table and plots of the TinyCode ablation: {ppo, grpo, reinforce_pp, rloo} x {rlvr, coderlplus}
x seeds. Reads the multirun folder (default ``multirun/tinycode_ablation``) and writes
``results.md``, ``curves_pass1.png``, ``curves_align.png`` and ``bars_pass1.png`` here.

    python experiments/tinycode_ablation/analyze.py [MULTIRUN_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from coderlplus.analysis import load_runs, plot_bars, plot_curves, summary_table

HERE = Path(__file__).resolve().parent
BY = ["algorithm", "experiment"]
METRICS = ["eval/pass@1", "eval/align/accuracy", "reward/codegen/mean"]


def main(root: str = "multirun/tinycode_ablation") -> str:
    found = load_runs(root)
    runs = [r for r in found if r.complete]  # a run still going would count its step-0 evaluation
    if len(runs) < len(found):
        print(f"skipping {len(found) - len(runs)} unfinished runs")
    if not runs:
        raise SystemExit(f"no runs (metrics.jsonl) below {root}")
    table = summary_table(runs, BY, METRICS)
    (HERE / "results.md").write_text(f"Final values, mean ± std (n seeds), from `{root}`:\n\n{table}")
    plot_curves(runs, BY, "eval/pass@1", HERE / "curves_pass1.png")
    plot_curves(runs, BY, "eval/align/accuracy", HERE / "curves_align.png")
    plot_bars(runs, BY, "eval/pass@1", HERE / "bars_pass1.png")
    print(table)
    return table


if __name__ == "__main__":
    main(*sys.argv[1:])
