"""One rank of tests/test_distributed.py's update check (run by torchrun, or alone for world size 1).

    python tests/dist_update_worker.py STRATEGY MODEL_DIR OUT.pt [ALGORITHM]

Runs two optimiser updates of the trainer's ``_update`` on a fixed, seeded batch of 16
rollouts (2 mini-batches, micro-batches of 2, clipping and KL active) and has rank 0
save the parameters and the update metrics to OUT.pt. ALGORITHM (default grpo) ``ppo``
also trains PPO's critic (a separate backbone, replicated or sharded like the policy) and
saves its parameters too.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import coderlplus
from coderlplus.config import conf_dir, register_hydra_configs, resolve_config
from coderlplus.distributed import make_strategy
from coderlplus.models.hf import load_causal_lm
from coderlplus.registry import ALGORITHMS
from coderlplus.trainer import Trainer
from coderlplus.types import RolloutBatch


def main(strategy: str, model_dir: str, out: str, algorithm: str = "grpo") -> None:
    torch.set_num_threads(1)
    coderlplus.load_plugins()
    register_hydra_configs()
    overrides = [
        f"distributed={strategy}",
        f"algorithm={algorithm}",
        "trainer.prompts_per_step=4",
        "trainer.group_size=4",
        "trainer.micro_batch_size=2",
        "algorithm.mini_batches=2",
        "algorithm.kl_coef=0.05",
        "optim.lr=0.01",
        "optim.grad_clip=1.0",
        "optim.warmup_steps=0",
    ]
    if algorithm == "ppo":
        overrides.append("algorithm.critic_lr=0.01")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        rc = resolve_config(
            OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)
        )

    trainer = object.__new__(Trainer)  # only what _update uses: no sampler, sandbox or data
    trainer.cfg, trainer.device = rc, torch.device("cpu")
    trainer.dist = make_strategy(rc.distributed)
    trainer.policy, _ = load_causal_lm(model_dir)
    trainer.algo = ALGORITHMS.get(rc.algorithm_name)()
    trainer.critic = trainer.algo.make_critic(trainer.policy, rc.algorithm)  # None but for ppo
    critic_start = {
        k: v.detach().clone() for k, v in (trainer.critic or torch.nn.Module()).state_dict().items()
    }
    trainer.critic_train = trainer.dist.wrap_critic(trainer.critic, trainer.device)
    if trainer.critic is not None:  # as the trainer does: the optimiser on the (sharded) critic
        trainer.critic_optimizer = torch.optim.AdamW(trainer.critic.parameters(), lr=trainer.critic.lr)
    trainer.train_model = trainer.dist.wrap(trainer.policy, trainer.device)
    trainer.optimizer = torch.optim.AdamW(trainer.train_model.parameters(), lr=rc.optim.lr)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)

    batch = _batch(trainer.policy.config.vocab_size)
    adv = trainer.algo.compute_advantages(batch, rc.algorithm)
    metrics = [trainer._update(batch, adv, step) for step in (1, 2)]
    trainer.dist.sync_policy(trainer.train_model, trainer.policy)
    critic = trainer.dist.model_state(trainer.critic) if trainer.critic is not None else {}  # every rank
    if trainer.dist.is_main:
        params = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
        critic = {k: v.detach().clone() for k, v in critic.items()}
        result = {
            "params": params,
            "critic": critic,
            "critic_start": critic_start,
            "metrics": metrics,
            "world": trainer.dist.world,
        }
        torch.save(result, out)
    trainer.dist.close()


def _batch(vocab: int, B: int = 16, P: int = 5, T: int = 6) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (B, P + T), generator=g)
    attention_mask = torch.ones(B, P + T, dtype=torch.long)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # responses of different lengths
    for i, n in enumerate(lengths.tolist()):
        attention_mask[i, P + n :] = 0
    response_mask = attention_mask[:, P:].float()
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rewards=torch.randint(0, 2, (B,), generator=g).float(),
        group_ids=torch.arange(B // 4).repeat_interleave(4),
        old_logp=(-2.0 - torch.rand(B, T, generator=g)) * response_mask,  # ratios far from 1: clipping
        ref_logp=(-2.0 - torch.rand(B, T, generator=g)) * response_mask,
        values=torch.randn(B, T, generator=g) * response_mask,  # the critic's at sampling time (ppo)
        task_kinds=["codegen"] * B,
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
