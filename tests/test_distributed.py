"""distributed=ddp|fsdp2: real torchrun launches with the gloo backend on the CPU.

The reference for a 2-rank update is the same update in one process on the same global batch
(tests/dist_update_worker.py); the reference for a 2-rank run is what a 1-rank run logs and
resumes from; the reference for a resumed 2-rank run is the uninterrupted one, and for what a
sharded (DCP) checkpoint loads, DCP's own conversion of its files to one state dict.
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

from coderlplus.distributed import FSDP2, DistributedConfig, Strategy, make_strategy
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
    """``algorithm -> the world-size-1 result`` (each computed once)."""
    results = {}

    def get(algorithm: str) -> dict:
        if algorithm not in results:
            out = tmp_path_factory.mktemp("dist") / f"world1-{algorithm}.pt"
            _run([sys.executable, str(WORKER), "none", str(tiny_model_dir), str(out), algorithm])
            results[algorithm] = torch.load(out)
        return results[algorithm]

    return get


def _update_gap(one: dict, two: dict, start: dict) -> tuple[float, str]:
    """The largest ``|one - two| / |one - start|`` over tensors (Frobenius norms): how far apart
    the two runs' updates are, relative to the update itself; and that tensor's name."""
    return max(
        (float((one[k] - two[k]).norm() / (one[k] - start[k]).norm().clamp(min=1e-12)), k) for k in one
    )


# Rounding differs between 1 and 2 ranks (the sums split differently), and Adam turns it into
# lr-sized steps where a gradient is ~zero (the attention's k_proj biases: softmax ignores them),
# so elementwise the parameters after 4 updates at lr 0.01 agree to 1e-4 on one CPU and only to
# ~1e-3 on another (AVX2: 6e-4 in a k_proj weight). Each tensor's update is therefore compared as
# a whole — within 1 % of its size (measured: <= 8e-4 on both CPUs; a rank that trained on its
# own half of the batch is off by tens of per cent) — and the metrics, the loss terms and the
# gradient norms before clipping (which would show gradients summed instead of averaged, to
# which Adam's step is blind), to 1e-4.
@pytest.mark.parametrize("strategy, algorithm", [("ddp", "grpo"), ("fsdp2", "grpo"), ("fsdp2", "ppo")])
def test_two_rank_update_equals_one_process_on_the_same_global_batch(
    strategy, algorithm, one_process_update, tiny_model_dir, tmp_path
):
    out = tmp_path / "world2.pt"
    worker = [str(WORKER), strategy, str(tiny_model_dir), str(out), algorithm]
    _run([*TORCHRUN, "--master_port", _port(), *worker])
    two, one = torch.load(out), one_process_update(algorithm)
    assert (one["world"], two["world"]) == (1, 2)
    from coderlplus.models.hf import load_causal_lm

    start = load_causal_lm(tiny_model_dir)[0].state_dict()
    moved = max((one["params"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2, "the updates did not move the parameters: the check would prove nothing"
    gap, name = _update_gap(one["params"], two["params"], start)
    assert gap < 1e-2, f"2 ranks vs 1: the update of {name} differs by {gap:.2%} of its size"
    if algorithm == "ppo":  # the critic: trained, sharded like the policy, gathered back whole
        assert one["critic"].keys() == two["critic"].keys() and "head.weight" in one["critic"]
        assert one["critic"]["head.weight"].abs().max() > 1e-2  # moved from its zero start
        assert one["critic_start"].keys() == one["critic"].keys()
        gap, name = _update_gap(one["critic"], two["critic"], one["critic_start"])
        assert gap < 1e-2, f"2 ranks vs 1: the critic's update of {name} differs by {gap:.2%} of its size"
    for m1, m2 in zip(one["metrics"], two["metrics"]):  # the loss terms and the gradient norms too
        assert m1.keys() == m2.keys()
        for k in m1:
            if k == "critic/explained_variance":  # a ratio per micro-batch: depends on how rows are grouped
                continue
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
    # fsdp2: the optimiser state as DCP shards (distributed.checkpoint=auto); ddp: one optimizer.pt
    saved = tmp_path / "checkpoints" / "step_000003"
    assert (saved / ("dcp/.metadata" if strategy == "fsdp2" else "optimizer.pt")).exists()

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


# --------------------------------------------------------------------------- sharded checkpoints

SHARDED = [
    "experiment=smoke",
    "model=hf",
    "trainer.max_steps=3",
    "trainer.save_every=1",
    "trainer.keep_last=3",
    "trainer.threads=1",
    "optim.lr=1e-3",  # steps that move the weights well beyond the tolerances below
]


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A 3-step 2-rank fsdp2 run with a (sharded) checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("fsdp2-sharded")
    _run([*TORCHRUN, "--master_port", _port(), "-m", "coderlplus.train", *SHARDED, "distributed=fsdp2",
          "trainer.deterministic=true", f"model.path={tiny_model_dir}", f"hydra.run.dir={run_dir}"])  # fmt: skip
    return run_dir


def _dcp_as_one_dict(checkpoint: Path, out: Path) -> dict:
    """A sharded checkpoint's DCP state, read by DCP's own converter (independent of the trainer)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "dcp", out)
    return torch.load(out, weights_only=False)


def _training_row(run_dir: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["step"] == step and "reward/mean" in r]
    return {k: v for k, v in row.items() if not k.startswith("timing/")}


def test_fsdp2_checkpoints_are_sharded_and_resume_on_two_ranks_like_an_uninterrupted_run(
    sharded_run, tiny_model_dir, tmp_path
):
    from test_resume import _weights

    ckpt = sharded_run / "checkpoints"
    for step in (2, 3):
        shards = ckpt / f"step_{step:06d}" / "dcp"
        sizes = [(shards / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
        assert min(sizes) > 0.3 * sum(sizes), f"each rank writes its half of the state: {sizes}"
        assert not (shards.parent / "optimizer.pt").exists() and (shards.parent / "rng_ranks.pt").exists()
        assert list((shards.parent / "model").glob("*.safetensors"))  # the from_pretrained export too

    _run([*TORCHRUN, "--master_port", _port(), "-m", "coderlplus.train", *SHARDED, "distributed=fsdp2",
          "trainer.deterministic=true", f"model.path={tiny_model_dir}", f"hydra.run.dir={tmp_path}",
          f"trainer.resume={ckpt / 'step_000002'}"])  # fmt: skip
    resumed, uninterrupted = tmp_path / "checkpoints" / "step_000003", ckpt / "step_000003"
    assert _training_row(tmp_path, 3) == _training_row(sharded_run, 3)  # the same rollouts, losses, norms
    before, after, again = (_weights(ckpt / "step_000002" / "model"), _weights(uninterrupted / "model"),
                            _weights(resumed / "model"))  # fmt: skip
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 1e-4  # step 3 moved them
    for k in after:
        torch.testing.assert_close(again[k], after[k], rtol=0, atol=1e-6, msg=k)
    one, two = (
        _dcp_as_one_dict(uninterrupted, tmp_path / "a.pt"),
        _dcp_as_one_dict(resumed, tmp_path / "b.pt"),
    )
    for fqn, moments in one["policy"]["optim"]["state"].items():  # AdamW's moments, shard by shard
        for name, value in moments.items():
            torch.testing.assert_close(two["policy"]["optim"]["state"][fqn][name], value, rtol=0, atol=1e-6)


def test_a_sharded_checkpoint_resumes_in_one_process(sharded_run, tiny_model_dir, tmp_path):
    from test_e2e import _resolved
    from test_resume import _weights

    from coderlplus.trainer import Trainer

    saved = sharded_run / "checkpoints" / "step_000003"
    ref = _dcp_as_one_dict(saved, tmp_path / "ref.pt")["policy"]
    exported = _weights(saved / "model")
    overrides = [*SHARDED, "distributed=none", f"model.path={tiny_model_dir}", f"trainer.resume={saved}"]
    trainer = Trainer(_resolved([*overrides, "trainer.max_steps=4"]), tmp_path)
    try:
        assert trainer.step == 3
        live = trainer.train_model.state_dict()  # policy.<name>: the 2 ranks' shards, joined
        assert ref["model"].keys() == live.keys()
        for fqn, value in ref["model"].items():
            assert torch.equal(live[fqn], value), fqn
            name = fqn.removeprefix("policy.")
            assert name not in exported or torch.equal(value, exported[name]), fqn  # = the model/ export
        assert len(exported) >= len(live) - 1  # all but a tied lm_head
        names = [n for n, _ in trainer.train_model.named_parameters()]
        state = trainer.optimizer.state_dict()["state"]
        assert len(state) == len(names) == len(ref["optim"]["state"])
        for i, fqn in enumerate(names):
            for name, value in ref["optim"]["state"][fqn].items():
                assert torch.equal(torch.as_tensor(state[i][name]), torch.as_tensor(value)), (fqn, name)
        summary = trainer.fit()  # and it trains on: step 4, checkpointed whole (distributed=none)
    finally:
        trainer.close()
    assert summary["steps"] == 1 and (tmp_path / "checkpoints" / "step_000004" / "optimizer.pt").exists()
    after = _weights(tmp_path / "checkpoints" / "step_000004" / "model")
    assert max((after[k] - exported[k]).abs().max().item() for k in exported) > 1e-4


def test_checkpoint_option_and_fsdp2_critic_limits():
    assert DistributedConfig(strategy="fsdp2").sharded_checkpoints  # auto
    assert not DistributedConfig(strategy="fsdp2", checkpoint="full").sharded_checkpoints
    assert not DistributedConfig(strategy="ddp").sharded_checkpoints
    assert DistributedConfig(strategy="ddp", checkpoint="sharded").sharded_checkpoints
    with pytest.raises(ConfigError, match="choose auto, sharded or full"):
        DistributedConfig(checkpoint="consolidated")
    strategy = FSDP2(DistributedConfig(strategy="fsdp2"))
    strategy.world = 2  # as under torchrun; refused before any sharding
    shared = torch.nn.Module()
    shared.share_backbone = True
    with pytest.raises(ConfigError, match="share_backbone=false"):
        strategy.wrap_critic(shared, torch.device("cpu"))
