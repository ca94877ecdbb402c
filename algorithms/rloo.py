"""RLOO: REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

How it departs from PPO: no critic. The baseline of a rollout is the mean reward of the
*other* G-1 rollouts of its prompt, so the advantage ``r_i - mean_{j != i} r_j`` is an
unbiased estimate (the rollout's own reward never enters its baseline) and is not divided by
a std. Equal to ``G / (G-1) * (r_i - mean_g)``: GRPO without the std, rescaled. Broadcast to
every response token and trained with PPO's clipped surrogate (with ``epochs: 1,
mini_batches: 1`` the ratio is 1 and this is plain REINFORCE with the leave-one-out baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, sequence_scores
from coderlplus.ops import leave_one_out
from coderlplus.registry import register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class RLOOConfig(AlgorithmConfig):
    pass


@register_algorithm("rloo")
class RLOO(Algorithm):
    Config = RLOOConfig
    min_group_size = 2  # the baseline is the group's other rollouts

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: RLOOConfig) -> torch.Tensor:
        """``[B, T]``: reward minus the leave-one-out group mean, on every real token."""
        scores = sequence_scores(batch, cfg)  # (B,) reward (minus KL when kl_in_reward)
        adv = leave_one_out(scores, batch.group_ids)  # (B,)
        return adv.unsqueeze(-1) * batch.response_mask  # (B, T)
