"""The algorithm zoo end to end on the CPU: a Hydra sweep over the four core algorithms, PPO's
critic (trained, checkpointed, resumed; separate or sharing the policy's backbone), and a new
algorithm added from outside the project (a plugin folder, an entry point) with no core edit."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from test_e2e import SMOKE, SMOKE_LEARNS, _resolved, _rows

from coderlplus.trainer import Trainer

CORE = ("ppo", "grpo", "reinforce_pp", "rloo")


def _cli(args, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, "-m", "coderlplus.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_multirun_sweep_runs_all_four_algorithms(tiny_model_dir, tmp_path):
    sweep = tmp_path / "sweep"
    _cli(
        [
            "-m",
            f"algorithm={','.join(CORE)}",
            "trainer.max_steps=2",
            *SMOKE_LEARNS,
            "trainer.eval_max_tasks=2",
            "model=hf",
            f"model.path={tiny_model_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    from safetensors.torch import load_file

    start = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    seen = {}
    for run in sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()):
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        name = next(a for a in CORE if f"algorithm={a}\n" in overrides + "\n")
        steps = [r for r in _rows(run) if "reward/mean" in r]
        assert [r["step"] for r in steps] == [1, 2], name
        for r in steps:
            for key in ("actor/pg_loss", "actor/clipfrac", "actor/approx_kl", "actor/grad_norm", "adv/std"):
                assert math.isfinite(r[key]), (name, key)
        end = load_file(next((run / "checkpoints" / "step_000002" / "model").glob("*.safetensors")))
        changed = sum(not torch.equal(start[k], end[k]) for k in start)
        assert changed > len(start) // 2, f"{name} did not update the policy"
        seen[name] = steps
    assert set(seen) == set(CORE)
    assert "critic/explained_variance" in seen["ppo"][0] and "critic/vf_loss" in seen["ppo"][0]
    assert "critic/vf_loss" not in seen["grpo"][0]
    for name in ("ppo", "reinforce_pp"):  # KL folded into the reward: no KL loss term
        assert "actor/kl_loss" not in seen[name][0] and "actor/kl_ref" in seen[name][0]
    assert "actor/kl_loss" in seen["grpo"][0]


def _ppo_overrides(tiny_model_dir, *extra):
    return [
        *SMOKE,
        "model=hf",
        f"model.path={tiny_model_dir}",
        "algorithm=ppo",
        "trainer.eval_max_tasks=2",
        "trainer.save_every=1",
        *extra,
    ]


def test_ppo_trains_a_separate_critic_and_resumes_it(tiny_model_dir, tmp_path):
    trainer = Trainer(_resolved(_ppo_overrides(tiny_model_dir, "trainer.max_steps=1")), tmp_path)
    head0 = trainer.critic.head.weight.detach().clone()
    backbone0 = {k: v.clone() for k, v in trainer.critic.backbone.state_dict().items()}
    policy_ids = {id(p) for p in trainer.policy.parameters()}
    assert not policy_ids & {id(p) for p in trainer.critic.parameters()}, "separate critic shares tensors"
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert not torch.equal(head0, trainer.critic.head.weight), "the value head did not train"
    after = trainer.critic.backbone.state_dict()
    assert any(not torch.equal(backbone0[k], after[k]) for k in after), "the critic's backbone did not train"
    ckpt = tmp_path / "checkpoints" / "step_000001"
    assert (ckpt / "critic.pt").exists()
    resumed = Trainer(
        _resolved(_ppo_overrides(tiny_model_dir, "trainer.max_steps=2", "trainer.resume=auto")), tmp_path
    )
    try:
        assert resumed.step == 1
        assert torch.equal(resumed.critic.head.weight, trainer.critic.head.weight)
        state = resumed.critic_optimizer.state_dict()["state"]
        assert state and all(int(s["step"]) == 1 for s in state.values())
        resumed.fit()
    finally:
        resumed.close()
    rows = [r for r in _rows(tmp_path) if "critic/vf_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["critic/explained_variance"]) or r["reward/std"] == 0 for r in rows)


def test_ppo_with_a_shared_backbone_trains_the_policy_through_the_value_loss(tiny_model_dir, tmp_path):
    overrides = _ppo_overrides(tiny_model_dir, "trainer.max_steps=1", "algorithm.share_backbone=true")
    trainer = Trainer(_resolved(overrides), tmp_path)
    try:
        critic_params = list(trainer.critic.parameters())
        assert critic_params == list(trainer.critic.head.parameters()), "shared critic owns only its head"
        batch_ids = torch.randint(0, 100, (2, 12))
        mask = torch.ones_like(batch_ids)
        trainer.critic.head.weight.data.fill_(0.1)  # a non-zero head, so gradients reach the backbone
        values = trainer.critic(batch_ids, mask, 4)  # (2, 4)
        assert values.shape == (2, 4)
        values.sum().backward()
        embed = trainer.policy.get_input_embeddings().weight
        assert embed.grad is not None and embed.grad.abs().sum() > 0
    finally:
        trainer.close()


PLUGIN = textwrap.dedent(
    '''
    """A test algorithm from outside the project: advantage = sign(reward - group mean)."""
    from dataclasses import dataclass

    import torch

    from coderlplus.algorithm import Algorithm, AlgorithmConfig
    from coderlplus.ops import group_normalize
    from coderlplus.registry import register_algorithm


    @dataclass
    class SignConfig(AlgorithmConfig):
        scale: float = 1.0
        """Multiplies the sign."""


    @register_algorithm("{name}")
    class SignAdvantage(Algorithm):
        Config = SignConfig

        @torch.no_grad()
        def compute_advantages(self, batch, cfg):
            centred = group_normalize(batch.rewards, batch.group_ids, norm_by_std=False)
            return cfg.scale * torch.sign(centred).unsqueeze(-1) * batch.response_mask

        def policy_loss(self, logp, batch, adv, cfg, entropy=None):
            loss, metrics = super().policy_loss(logp, batch, adv, cfg, entropy)
            metrics["actor/{name}_ran"] = 1.0
            return loss, metrics
    '''
)


def _one_step(name, tiny_model_dir, tmp_path, env):
    run = tmp_path / "run"
    _cli(
        [
            f"algorithm={name}",
            "algorithm.scale=2.0",
            *SMOKE,
            "trainer.max_steps=1",
            "trainer.eval_max_tasks=2",
            "model=hf",
            f"model.path={tiny_model_dir}",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        env,
    )
    (row,) = [r for r in _rows(run) if "reward/mean" in r]
    assert abs(row[f"actor/{name}_ran"] - 1.0) < 1e-6  # its policy_loss ran (weighted over micro-batches)
    assert row["adv/max"] <= 2.0 and row["adv/min"] >= -2.0  # the plugin's advantages, scaled by its option
    assert all(abs(v) in (0.0, 1.0, 2.0) for v in (row["adv/max"], row["adv/min"]))


def test_a_plugin_folder_adds_an_algorithm_without_editing_the_project(tiny_model_dir, tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "sign_adv.py").write_text(PLUGIN.replace("{name}", "sign_adv"))
    _one_step("sign_adv", tiny_model_dir, tmp_path, {"CODERLPLUS_PLUGIN_PATH": str(folder)})


def test_an_entry_point_adds_an_algorithm_without_installing(tiny_model_dir, tmp_path):
    # A package's metadata on sys.path is all importlib.metadata needs: what `pip install` of a
    # package declaring [project.entry-points."coderlplus.plugins"] would leave behind.
    site = tmp_path / "site"
    (site / "sign_ep_pkg-0.1.dist-info").mkdir(parents=True)
    (site / "sign_ep_pkg-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sign-ep-pkg\nVersion: 0.1\n"
    )
    (site / "sign_ep_pkg-0.1.dist-info" / "entry_points.txt").write_text(
        "[coderlplus.plugins]\nsign_ep = sign_ep_module\n"
    )
    (site / "sign_ep_module.py").write_text(PLUGIN.replace("{name}", "sign_ep"))
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    _one_step("sign_ep", tiny_model_dir, tmp_path, {"PYTHONPATH": pythonpath})
