"""Summarise training runs side by side: median per-phase step times, reward, pass@1.

    python experiments/gpu_vllm/summarize.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a ``coderlplus-train`` run directory (``metrics.jsonl``, ``summary.json``,
``train.log``). The first step is left out of the medians (it includes CUDA/Triton warm-up);
the ratio column compares every run with the first one given.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from coderlplus.analysis import load_runs

PHASES = ["timing/step_s", "timing/sample_s", "timing/logprob_s", "timing/update_s", "timing/reward_wait_s"]


def load(run: Path) -> dict:
    (metrics,) = load_runs(run)
    steps, _ = metrics.curve("timing/step_s")  # the training rows
    out = {"name": run.name, "steps": len(steps)}
    for key in PHASES:
        _, vals = metrics.curve(key)
        vals = vals[1:] or vals
        out[key] = statistics.median(vals) if vals else float("nan")
    _, rewards = metrics.curve("reward/mean")
    out["reward_first5"] = statistics.mean(rewards[:5]) if rewards else float("nan")
    out["reward_last5"] = statistics.mean(rewards[-5:]) if rewards else float("nan")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    out["pass_before"] = summary.get("pass@1_before", float("nan"))
    out["pass_after"] = summary.get("pass@1_after", float("nan"))
    out["minutes"] = summary.get("minutes", float("nan"))
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    m = re.search(r"vLLM engine started in ([0-9.]+) s", log)
    out["engine_start_s"] = float(m.group(1)) if m else None
    return out


def table(runs: list[dict]) -> str:
    base = runs[0]
    lines = [
        "| run | steps | step s | vs " + base["name"] + " | sample s | log-prob s | update s | reward wait s "
        "| reward first 5 → last 5 | pass@1 before → after | minutes | engine start s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in runs:
        ratio = r["timing/step_s"] / base["timing/step_s"]
        start = f"{r['engine_start_s']:.1f}" if r["engine_start_s"] is not None else "–"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['timing/step_s']:.3f} | {ratio:.2f}× | {r['timing/sample_s']:.3f} "
            f"| {r['timing/logprob_s']:.3f} | {r['timing/update_s']:.3f} | {r['timing/reward_wait_s']:.3f} "
            f"| {r['reward_first5']:.3f} → {r['reward_last5']:.3f} | {r['pass_before']:.3f} → {r['pass_after']:.3f} "
            f"| {r['minutes']:.2f} | {start} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    runs = [load(Path(a)) for a in argv if (Path(a) / "metrics.jsonl").exists()]
    missing = [a for a in argv if not (Path(a) / "metrics.jsonl").exists()]
    if runs:
        print(table(runs))
    for a in missing:
        print(f"(no metrics.jsonl in {a})")
    return 0 if runs and not missing else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
