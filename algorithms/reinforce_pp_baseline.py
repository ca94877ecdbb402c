"""REINFORCE++ with a group baseline (Hu et al. 2025, arXiv 2501.03262, "REINFORCE++-baseline").

How it departs from REINFORCE++: each rollout's reward is first centred on the mean reward of
its prompt's group (``r - mean_g``: no std, so easy and hard prompts are not rescaled), then
the KL-penalised token rewards, returns-to-go and *global-batch* whitening are as in
``reinforce_pp``. The group mean removes the prompt's difficulty from the signal; the global
whitening keeps the scale stable. Suited to reasoning tasks with several rollouts per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, token_rewards
from coderlplus.ops import discounted_returns, group_normalize, masked_whiten
from coderlplus.registry import register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class ReinforcePPBaselineConfig(AlgorithmConfig):
    kl_coef: float = 0.01
    """Coefficient of the per-token KL penalty in the reward."""
    kl_in_reward: bool = True
    """REINFORCE++ folds the KL into the reward."""
    kl_estimator: str = "k1"
    """k1 = log(pi_old / pi_ref) per token, as in the paper."""
    gamma: float = 1.0
    """Discount of the returns-to-go."""


@register_algorithm("reinforce_pp_baseline")
class ReinforcePPBaseline(Algorithm):
    Config = ReinforcePPBaselineConfig
    min_group_size = 2  # the baseline is the group's other rollouts

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: ReinforcePPBaselineConfig) -> torch.Tensor:
        """``[B, T]``: group-centred reward, then KL-penalised returns-to-go whitened over the batch."""
        centred = group_normalize(batch.rewards, batch.group_ids, norm_by_std=False)  # (B,)
        rewards = token_rewards(replace(batch, rewards=centred), cfg)  # (B, T)
        returns = discounted_returns(rewards, batch.response_mask, cfg.gamma)  # (B, T)
        return masked_whiten(returns, batch.response_mask)  # (B, T), 0 on padding
