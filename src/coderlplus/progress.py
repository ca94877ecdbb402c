"""A rich progress bar with the live reward and pass rate, and the final summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]RL"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, m: dict[str, float]) -> None:
        stats = f"reward {m.get('reward/mean', 0):.3f}  pass {m.get('reward/pass_rate', 0):.3f}"
        stats += f"  {m.get('timing/step_s', 0):.1f}s/step"
        if "eval/pass@1" in m:
            stats += f"  eval pass@1 {m['eval/pass@1']:.3f}"
        self.progress.update(self.task, completed=step, stats=stats)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="coderlplus run summary", show_header=True)
    table.add_column("metric")
    table.add_column("before RL", justify="right")
    table.add_column("after RL", justify="right")
    for key in sorted(
        k[: -len("_before")] for k in summary if k.startswith("eval/") and k.endswith("_before")
    ):
        table.add_row(key, f"{summary[key + '_before']:.3f}", f"{summary[key + '_after']:.3f}")
    console.print(table)
    gain = 100 * (summary["pass@1_after"] - summary["pass@1_before"])
    console.print(
        f"steps {summary['steps']}  |  {summary['minutes']:.1f} min  |  pass@1 change {gain:+.1f} points\n"
        f"run dir: {summary['run_dir']}  (metrics.jsonl, eval/, checkpoints/)"
    )
    if "best_checkpoint" in summary:
        best = next(v for k, v in summary.items() if k.startswith("best_eval/"))
        console.print(f"best checkpoint (validation pass@1 {best:.3f}): {summary['best_checkpoint']}")
