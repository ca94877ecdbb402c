"""Smoke test of the sandbox throughput benchmark (experiments/bench_sandbox/run.py --quick)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "experiments" / "bench_sandbox" / "run.py"


def test_bench_sandbox_quick():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(RUN), "--quick"], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    for executor in ("baseline", "pool-bwrap", "pool-rlimit"):
        assert any(line.startswith(f"| {executor} | trivial |") for line in rows), out.stdout
    for executor in ("baseline", "pool-bwrap", "pool-bwrap-per-test", "pool-rlimit"):
        assert any(line.startswith(f"| {executor} | tinycode |") for line in rows), out.stdout
    assert "speed-up vs baseline" in out.stdout
    assert "trace / run" in out.stdout
