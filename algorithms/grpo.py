"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300).

How it departs from PPO: no critic. Each prompt gets G rollouts (a group);
a rollout's advantage is its reward standardised within its group,
``(r - mean_g) / (std_g + eps)``, broadcast to every response token. The loss is
PPO's clipped surrogate plus ``kl_coef * KL(policy || reference)`` added as a
loss term (k3 estimator), not folded into the reward. ``norm_by_std: false``
with ``loss_agg: seq-mean-token-sum`` gives Dr.GRPO (arXiv 2503.20783).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig
from coderlplus.ops import aggregate_loss, clipped_policy_objective, group_normalize, kl_penalty, masked_mean
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

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: GRPOConfig) -> torch.Tensor:
        """``[B, T]``: group-normalised reward on every real response token, 0 on padding."""
        adv = group_normalize(batch.rewards, batch.group_ids, cfg.norm_by_std, cfg.eps)  # (B,)
        return adv.unsqueeze(-1) * batch.response_mask  # (B, T)

    def policy_loss(self, logp, batch, adv, cfg: GRPOConfig, entropy=None):
        mask = batch.response_mask
        pg_loss, ratio, clipped = clipped_policy_objective(
            logp, batch.old_logp, adv, cfg.clip_low, cfg.clip_high
        )
        loss = aggregate_loss(pg_loss, mask, cfg.loss_agg)
        metrics = {
            "actor/pg_loss": loss.item(),
            "actor/clipfrac": masked_mean(clipped.float(), mask).item(),
            "actor/ratio_mean": masked_mean(ratio.detach(), mask).item(),
            "actor/approx_kl": masked_mean(0.5 * (logp.detach() - batch.old_logp) ** 2, mask).item(),
        }
        if cfg.kl_coef > 0:
            kl = kl_penalty(logp, batch.ref_logp, cfg.kl_estimator)  # (B, T)
            kl_loss = aggregate_loss(kl, mask, cfg.loss_agg)
            loss = loss + cfg.kl_coef * kl_loss
            metrics["actor/kl_loss"] = kl_loss.item()
        if entropy is not None and cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, cfg.loss_agg)
        return loss, metrics
