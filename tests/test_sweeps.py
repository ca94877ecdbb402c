"""Hydra sweeps for real: a 2-job multirun through the joblib launcher (2 parallel workers), each
job a readable, grouped, tagged run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_e2e import SMOKE, _rows


def test_joblib_sweep_runs_two_jobs_grouped_and_named(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [
            sys.executable, "-m", "coderlplus.train", "-m",
            "algorithm=grpo,rloo", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            *SMOKE, "trainer.max_steps=1", "trainer.eval_max_tasks=2", "trainer.eval_splits=[test]",
            "model=hf", f"model.path={tiny_model_dir}", f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Joblib" in out.stdout + out.stderr  # the joblib launcher ran the jobs
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").exists())
    assert len(runs) == 2
    infos = [json.loads((r / "logger.json").read_text()) for r in runs]
    assert {i["group"] for i in infos} == {f"sweep-{sweep.name}"}
    assert sorted(i["name"] for i in infos) == ["algorithm=grpo", "algorithm=rloo"]
    for info in infos:
        assert info["name"] in info["tags"]
    for r in runs:
        assert [row["step"] for row in _rows(r) if "reward/mean" in row] == [1]


def test_swept_keys_come_from_the_command_line_and_from_sweeper_params(tmp_path):
    from coderlplus.config import LoggerConfig
    from coderlplus.train import sweep_logger, swept_keys

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n"
        "  overrides:\n    task: ['algorithm=grpo,rloo', trainer.max_steps=3, 'seed=range(0,3)', 'trainer.eval_splits=[validation,test]']\n"
        "  sweeper:\n    params:\n      experiment: rlvr,coderlplus\n"
    )
    assert swept_keys(str(tmp_path)) == {"algorithm", "seed", "experiment"}
    assert swept_keys(str(tmp_path / "nope")) is None
    lc = sweep_logger(
        LoggerConfig(tags=["mine"]),
        str(tmp_path),
        ["algorithm=rloo", "trainer.max_steps=3", "seed=1", "experiment=rlvr"],
    )
    assert lc.name == "algorithm=rloo,seed=1,experiment=rlvr" and lc.group == f"sweep-{tmp_path.name}"
    assert lc.tags == ["mine", "algorithm=rloo", "seed=1", "experiment=rlvr"]
