"""CodeRL+ on the CPU, end to end: `experiment=coderlplus_cpu` learns to predict its programs.

The preset's whole run (60 steps; the first time it also builds its warm-start model, ~15 min
on one core): alignment prompts enter the batches once the buffer holds a batch's worth, and
the share of fully correct alignment answers rises over the run. Three seeds of this run gave
0.09 → 0.19, 0.01 → 0.12 and 0.03 → 0.13 for the mean of the first and last 20 steps with
alignment prompts (experiments/align_rise/README.md).
"""

from __future__ import annotations

import json

import pytest
from conftest import train_cli


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(2700)
def test_coderlplus_cpu_preset_raises_alignment_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    train_cli(
        [
            "experiment=coderlplus_cpu",
            f"hydra.run.dir={run_dir}",
            "trainer.eval_splits=[validation]",  # the evaluation is not what is tested: keep it short
            "trainer.eval_max_tasks=20",
            "trainer.progress=false",
            "logger.wandb_mode=disabled",
        ],
        tmp_path,
        timeout=2600,
        env={"OMP_NUM_THREADS": "1"},
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "batch/rollouts" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))

    # Step 1 has an empty buffer: code generation only. Once the first harvest is in, every
    # batch holds alignment prompts (0.6 of 12 prompts: 7).
    assert "batch/align_share" not in steps[0] and steps[0]["align/added"] >= 7
    mixed = [r for r in steps if r.get("batch/align_share")]
    assert mixed and mixed[0]["step"] <= 3
    assert [r["step"] for r in mixed] == list(range(mixed[0]["step"], 61))
    assert all(abs(r["batch/align_share"] - 7 / 12) < 1e-9 for r in mixed)

    accuracy = [r["align/accuracy"] for r in mixed]
    first, last = _mean(accuracy[:20]), _mean(accuracy[-20:])
    assert last > 0
    assert last >= first + 0.04 and last >= 2 * first, (first, last)
