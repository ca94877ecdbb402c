"""distributed=ddp|fsdp2: real torchrun launches with the gloo backend on the CPU.

The reference for a 2-rank update is the same update in one process on the same global batch
(tests/dist_update_worker.py); the reference for a 2-rank run is what a 1-rank run logs and
resumes from.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coderlplus.distributed import DistributedConfig, Strategy, make_strategy
from coderlplus.registry import ConfigError
from coderlplus.trainer import _merge_ranks
from coderlplus.types import RewardOutput, Rollout, Task

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_update_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TORCHELASTIC_ERROR_FILE": ""}


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=HERE.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def one_process_update(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "world1.pt"
    _run([sys.executable, str(WORKER), "none", str(tiny_model_dir), str(out)])
    return torch.load(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_update_equals_one_process_on_the_same_global_batch(
    strategy, one_process_update, tiny_model_dir, tmp_path
):
    out = tmp_path / "world2.pt"
    _run([*TORCHRUN, "--master_port", _port(), str(WORKER), strategy, str(tiny_model_dir), str(out)])
    two, one = torch.load(out), one_process_update
    assert (one["world"], two["world"]) == (1, 2)
    from coderlplus.models.hf import load_causal_lm

    start = load_causal_lm(tiny_model_dir)[0].state_dict()
    moved = max((one["params"][k] - start[k]).abs().max().item() for k in start)
    diff = max((one["params"][k] - two["params"][k]).abs().max().item() for k in start)
    assert moved > 1e-2, "the updates did not move the parameters: the check would prove nothing"
    assert diff < 1e-4, f"2 ranks vs 1: parameters differ by {diff} (they moved by {moved})"
    for m1, m2 in zip(one["metrics"], two["metrics"]):  # the loss terms and the gradient norm too
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_rank_run_logs_once_and_its_checkpoint_resumes_in_one_process(strategy, tiny_model_dir, tmp_path):
    common = ["experiment=smoke", "model=hf", f"model.path={tiny_model_dir}", f"hydra.run.dir={tmp_path}"]
    two = _run([*TORCHRUN, "--master_port", _port(), "-m", "coderlplus.train", *common,
                f"distributed={strategy}", "trainer.max_steps=3"])  # fmt: skip
    assert two.stdout.count("coderlplus run summary") == 1  # rank 0 alone prints and logs
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3]
    for r in rows[1:4]:  # each step's batch: 4 prompts x 4 rollouts, gathered from both ranks
        assert r["batch/rollouts"] == 16
    assert (tmp_path / "checkpoints" / "step_000003" / "optimizer.pt").exists()

    one = _run(
        [sys.executable, "-m", "coderlplus.train", *common, "trainer.max_steps=4", "trainer.resume=auto"]
    )
    assert "resumed from" in one.stdout + one.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 3, 4, 4]
    assert rows[5]["batch/rollouts"] == 16
    state = torch.load(tmp_path / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=False)
    assert len(state["state"]) == len(state["param_groups"][0]["params"]) > 0  # every parameter's moments


def test_none_under_torchrun_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed=ddp"):
        make_strategy(DistributedConfig(strategy="none"))


def test_a_plain_launch_of_ddp_is_one_rank(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    strategy = make_strategy(DistributedConfig(strategy="ddp"))
    assert (strategy.rank, strategy.world, strategy.is_main) == (0, 1, True)
    assert strategy.gather("x") == ["x"] and strategy.sum_metrics({"a": 2.0}) == {"a": 2.0}


def test_shards_must_divide_evenly():
    from test_e2e import _resolved

    from coderlplus.trainer import Trainer

    trainer = object.__new__(Trainer)
    trainer.dist = Strategy(DistributedConfig())
    trainer.dist.world = 2
    trainer.cfg = _resolved(["trainer.prompts_per_step=3", "trainer.group_size=4"])
    with pytest.raises(ConfigError, match="divisible by 2"):
        trainer._check_shards()
    trainer.cfg = _resolved(["trainer.prompts_per_step=4", "trainer.group_size=4"])
    trainer._check_shards()  # 4 prompts, mini-batch of 16: fine


def test_merge_ranks_keeps_groups_apart():
    def rollouts(tag, groups):
        task = {g: Task(id=f"{tag}{g}", kind="codegen", prompt=[], payload={}) for g in groups}
        return [Rollout(task[g], "c", [], [], [], group_id=g) for g in groups for _ in range(2)]

    rank0, rank1 = rollouts("a", [0, 1]), rollouts("b", [0, 1])
    merged, scores = _merge_ranks([(rank0, [RewardOutput(0.0)] * 4), (rank1, [RewardOutput(1.0)] * 4)])
    assert [r.group_id for r in merged] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r.task.id for r in merged] == ["a0", "a0", "a1", "a1", "b0", "b0", "b1", "b1"]
    assert [s.reward for s in scores] == [0.0] * 4 + [1.0] * 4
