"""REINFORCE++ (Hu et al. 2025, arXiv 2501.03262).

How it departs from PPO: no critic. The KL penalty to the reference is folded into the
token-level reward (``r_t = -kl_coef * KL_t``, plus the rollout's reward on its last token),
the advantage of a token is its return-to-go ``G_t = sum_{s >= t} gamma^(s-t) r_s``, and the
advantages are whitened over the *global batch* (all tokens of all prompts) instead of within
each prompt's group — which the paper argues is more stable than GRPO's per-prompt
normalisation. Trained with PPO's clipped surrogate; no KL loss term.

``reinforce_pp_baseline`` subtracts each group's mean reward first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, token_rewards
from coderlplus.ops import discounted_returns, masked_whiten
from coderlplus.registry import register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class ReinforcePPConfig(AlgorithmConfig):
    kl_coef: float = 0.01
    """Coefficient of the per-token KL penalty in the reward."""
    kl_in_reward: bool = True
    """REINFORCE++ folds the KL into the reward."""
    kl_estimator: str = "k1"
    """k1 = log(pi_old / pi_ref) per token, as in the paper."""
    gamma: float = 1.0
    """Discount of the returns-to-go."""


@register_algorithm("reinforce_pp")
class ReinforcePP(Algorithm):
    Config = ReinforcePPConfig

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: ReinforcePPConfig) -> torch.Tensor:
        """``[B, T]``: returns-to-go of the KL-penalised token rewards, whitened over the batch."""
        rewards = token_rewards(batch, cfg)  # (B, T)
        returns = discounted_returns(rewards, batch.response_mask, cfg.gamma)  # (B, T)
        return masked_whiten(returns, batch.response_mask)  # (B, T), 0 on padding
