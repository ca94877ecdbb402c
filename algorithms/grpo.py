"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300).

How it departs from PPO: no critic. Each prompt gets G rollouts (a group); a rollout's
advantage is its reward standardised within its group, ``(r - mean_g) / (std_g + eps)``,
broadcast to every response token. The loss is PPO's clipped surrogate (the base class's
``policy_loss``) plus ``kl_coef * KL(policy || reference)`` as a loss term (k3), not folded
into the reward (``kl_in_reward: true`` folds ``kl_coef * sum_t KL_t`` into the score instead).

Dr.GRPO (Liu et al. 2025, arXiv 2503.20783): ``norm_by_std: false`` (mean-centred only) with
``loss_agg: seq-mean-token-sum-norm`` (per-sequence token sums over a constant), which removes
GRPO's question-difficulty and length biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, sequence_scores
from coderlplus.ops import group_normalize
from coderlplus.registry import register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class GRPOConfig(AlgorithmConfig):
    norm_by_std: bool = True
    """Divide by the group's reward std (False = Dr.GRPO: mean-centred only)."""
    eps: float = 1e-6
    """Added to the group std before dividing."""


@register_algorithm("grpo")
class GRPO(Algorithm):
    Config = GRPOConfig
    min_group_size = 2  # the baseline is the group's other rollouts

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: GRPOConfig) -> torch.Tensor:
        """``[B, T]``: group-normalised score on every real response token, 0 on padding."""
        scores = sequence_scores(batch, cfg)  # (B,) reward (minus KL when kl_in_reward)
        adv = group_normalize(scores, batch.group_ids, cfg.norm_by_std, cfg.eps)  # (B,)
        return adv.unsqueeze(-1) * batch.response_mask  # (B, T)
