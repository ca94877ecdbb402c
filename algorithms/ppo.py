"""PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347), as used for LLMs in
RLHF (Ouyang et al. 2022): the reference algorithm the others depart from.

Each response token is an action. A critic (``ValueModel``: a backbone and a scalar head,
separate from the policy by default or sharing its backbone) predicts ``V_t``. The rollout's
reward sits on its last token; ``kl_coef * KL(behaviour || reference)`` is subtracted from
every token's reward (``kl_in_reward``). Advantages come from GAE(gamma, lam) and are whitened
over the batch. The actor minimises the clipped surrogate (base class); the critic minimises
the clipped value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` towards the GAE returns ``R``,
with its own optimiser (``critic_lr``). ``critic/explained_variance`` says how useful it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, token_rewards
from coderlplus.models.value import ValueModel
from coderlplus.ops import (
    aggregate_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
)
from coderlplus.registry import ConfigError, register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class PPOConfig(AlgorithmConfig):
    kl_coef: float = 0.01
    """Coefficient of the per-token KL penalty in the reward."""
    kl_in_reward: bool = True
    """Classic RLHF-PPO folds the KL into the reward."""
    kl_estimator: str = "k1"
    """k1 = log(pi_old / pi_ref) per token."""
    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE lambda (1 = Monte-Carlo returns minus V, 0 = one-step TD)."""
    whiten_advantages: bool = True
    """Whiten the GAE advantages over the batch's tokens."""
    value_clip: float = 0.2
    """Clip the new values to old +- value_clip in the value loss (0 = no clipping)."""
    vf_coef: float = 1.0
    """Weight of the value loss."""
    critic_lr: float = 5e-4
    """Learning rate of the critic's optimiser."""
    share_backbone: bool = False
    """True: the critic is a value head on the policy's own backbone; False: a separate copy."""

    def __post_init__(self):
        super().__post_init__()
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        if self.critic_lr <= 0 or self.vf_coef < 0 or self.value_clip < 0:
            raise ConfigError("critic_lr must be > 0; vf_coef and value_clip must be >= 0")


@register_algorithm("ppo")
class PPO(Algorithm):
    Config = PPOConfig

    def make_critic(self, policy, cfg: PPOConfig) -> ValueModel:
        return ValueModel(policy, share_backbone=cfg.share_backbone, lr=cfg.critic_lr)

    def _gae(self, batch: RolloutBatch, cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.values is None:
            raise ValueError("PPO needs batch.values (the critic's values at sampling time)")
        rewards = token_rewards(batch, cfg)  # (B, T)
        return gae(rewards, batch.values, batch.response_mask, cfg.gamma, cfg.lam)  # (B, T) x2

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: PPOConfig) -> torch.Tensor:
        """``[B, T]``: GAE advantages (whitened over the batch), 0 on padding."""
        adv, _returns = self._gae(batch, cfg)
        return masked_whiten(adv, batch.response_mask) if cfg.whiten_advantages else adv

    def critic_loss(self, values, batch: RolloutBatch, cfg: PPOConfig):
        """Clipped value loss of the critic's new ``values [B, T]`` towards the GAE returns."""
        mask = batch.response_mask
        with torch.no_grad():
            _adv, returns = self._gae(batch, cfg)  # the targets, from the values at sampling time
        vf_loss, clipped = clipped_value_loss(values, batch.values, returns, cfg.value_clip)  # (B, T)
        loss = aggregate_loss(vf_loss, mask, cfg.loss_agg, cfg.loss_norm_tokens)
        metrics = {
            "critic/vf_loss": loss.item(),
            "critic/vf_clipfrac": masked_mean(clipped.float(), mask).item(),
            "critic/vpred_mean": masked_mean(values.detach(), mask).item(),
            "critic/returns_mean": masked_mean(returns, mask).item(),
            "critic/explained_variance": explained_variance(batch.values, returns, mask).item(),
        }
        return cfg.vf_coef * loss, metrics
