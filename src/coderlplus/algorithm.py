"""The algorithm interface, the options every algorithm shares, and the standard policy loss.

An algorithm plugin (one file in ``algorithms/``) subclasses :class:`Algorithm`,
declares a ``Config`` dataclass extending :class:`AlgorithmConfig`, and registers with
``@register_algorithm("name")``. It implements

- ``compute_advantages(batch, cfg) -> adv [B, T]`` (pure, no grad), and may override
- ``policy_loss(logp, batch, adv, cfg, entropy) -> (loss, metrics)``: by default PPO's clipped
  surrogate (clip low/high, optional dual clip) + KL loss + entropy bonus, aggregated by
  ``cfg.loss_agg``;
- ``make_critic(policy, cfg)`` and ``critic_loss(values, batch, cfg)`` when it trains a critic (PPO).

The trainer owns everything else (sampling, micro-batching, optimisers). Use an algorithm
from a notebook::

    algo = ALGORITHMS.get("grpo")()
    cfg = algo.default_config()            # or algo.Config(norm_by_std=False, ...)
    adv = algo.compute_advantages(batch, cfg)
    loss, metrics = algo.policy_loss(logp, batch, adv, cfg)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from coderlplus.ops.core import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    aggregate_loss,
    clipped_policy_objective,
    kl_penalty,
    masked_mean,
    masked_sum,
    token_level_rewards,
)
from coderlplus.registry import ConfigError
from coderlplus.types import RolloutBatch


@dataclass
class AlgorithmConfig:
    clip_low: float = 0.2
    """Lower clip range of the ratio: r >= 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip range of the ratio: r <= 1 + clip_high (DAPO clip-higher: 0.28)."""
    dual_clip: float = 0.0
    """Dual-clip constant c > 1: caps the loss of negative-advantage tokens at c * |A| (0 = off)."""
    kl_coef: float = 0.001
    """Coefficient of KL(policy || reference); 0 = no reference model."""
    kl_in_reward: bool = False
    """False: kl_coef * KL is a loss term. True: kl_coef * KL(behaviour || reference) is
    subtracted from every token's reward before the advantages (RLHF-PPO, REINFORCE++)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (low variance, non-negative)."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum or
    seq-mean-token-sum-norm (Dr.GRPO: per-sequence sums over a constant)."""
    loss_norm_tokens: int = 0
    """The constant of seq-mean-token-sum-norm (0 = the batch's response width T; set it to
    sampler.max_new_tokens for Dr.GRPO's fixed generation budget)."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (subtracted from the loss)."""
    fused_loss: bool = False
    """Compute the clipped surrogate + KL loss of the default policy_loss in one autograd function
    (coderlplus.kernels.policy_loss; same values, fewer intermediate tensors)."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    mini_batches: int = 1
    """Optimiser steps per epoch (the batch is split in this many mini-batches)."""

    def __post_init__(self):
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ConfigError(
                f"clip_low={self.clip_low} must be in [0, 1) and clip_high={self.clip_high} >= 0"
            )
        if self.dual_clip and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip={self.dual_clip} must be > 1 (e.g. 3.0), or 0 to turn it off")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}; choose one of {list(KL_ESTIMATORS)}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ConfigError(f"loss_agg={self.loss_agg!r}; choose one of {list(LOSS_AGG_MODES)}")
        if self.loss_norm_tokens < 0:
            raise ConfigError(f"loss_norm_tokens={self.loss_norm_tokens} must be >= 0")
        if self.epochs < 1 or self.mini_batches < 1:
            raise ConfigError("epochs and mini_batches must be >= 1")
        if self.entropy_coef < 0:
            raise ConfigError(f"entropy_coef={self.entropy_coef} must be >= 0")


# ---------------------------------------------------------------------------- rewards with KL folded in
def reward_kl(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor | None:
    """``[B, T]`` KL(behaviour || reference) per token when it goes into the reward, else None."""
    if not (cfg.kl_in_reward and cfg.kl_coef > 0):
        return None
    if batch.ref_logp is None:
        raise ValueError("kl_in_reward needs batch.ref_logp (the trainer computes it when kl_coef > 0)")
    return kl_penalty(batch.old_logp, batch.ref_logp, cfg.kl_estimator) * batch.response_mask


def token_rewards(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """``[B, T]``: the rollout's reward on its last token, minus ``kl_coef * KL`` per token when
    ``kl_in_reward`` (for token-level estimators: GAE, returns-to-go)."""
    return token_level_rewards(batch.rewards, batch.response_mask, reward_kl(batch, cfg), cfg.kl_coef)


def sequence_scores(batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """``[B]``: the rollout's reward, minus ``kl_coef * sum_t KL_t`` when ``kl_in_reward``
    (for sequence-level estimators: GRPO, RLOO)."""
    kl = reward_kl(batch, cfg)
    scores = batch.rewards.float()
    return scores if kl is None else scores - cfg.kl_coef * masked_sum(kl, batch.response_mask, dim=-1)


class Algorithm:
    """Base class of RL algorithm plugins."""

    Config: ClassVar[type] = AlgorithmConfig
    registry_name: ClassVar[str | None] = None
    min_group_size: ClassVar[int] = 1
    """The smallest ``trainer.group_size`` that gives a learning signal (2 for a baseline made of the
    other rollouts of the same prompt: a group of one gets advantage 0); checked at start-up."""

    @classmethod
    def default_config(cls) -> AlgorithmConfig:
        return cls.Config()

    def needs_reference(self, cfg: AlgorithmConfig) -> bool:
        """Whether the trainer must compute ``batch.ref_logp`` (a frozen reference model)."""
        return cfg.kl_coef > 0

    def make_critic(self, policy: torch.nn.Module, cfg: AlgorithmConfig):
        """A :class:`~coderlplus.models.value.ValueModel` to train beside the policy, or None."""
        return None

    def compute_advantages(self, batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
        """``[B, T]`` advantages, 0 on padding (no grad)."""
        raise NotImplementedError

    def critic_loss(
        self, values: torch.Tensor, batch: RolloutBatch, cfg: AlgorithmConfig
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar critic loss from the critic's new ``values [B, T]`` (only with a critic)."""
        raise NotImplementedError(f"{type(self).__name__} trains no critic")

    def policy_loss(
        self,
        logp: torch.Tensor,
        batch: RolloutBatch,
        adv: torch.Tensor,
        cfg: AlgorithmConfig,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and float metrics. ``logp [B, T]`` carries gradients;
        ``entropy [B, T]`` is given when ``entropy_coef > 0`` (or for logging)."""
        if cfg.fused_loss:
            return self._fused_policy_loss(logp, batch, adv, cfg, entropy)
        log_ratio = logp - batch.old_logp  # (B, T)
        pg_loss, ratio, clipped = clipped_policy_objective(
            log_ratio, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip
        )
        return self.finish_loss(pg_loss, ratio, clipped, logp, batch, cfg, entropy)

    def finish_loss(self, pg_loss, ratio, clipped, logp, batch, cfg, entropy=None):
        """Aggregate a per-token policy loss ``[B, T]``, add the KL loss and entropy bonus, and
        compute the standard metrics (shared by every clipped-surrogate algorithm)."""
        mask = batch.response_mask
        loss = aggregate_loss(pg_loss, mask, cfg.loss_agg, cfg.loss_norm_tokens)
        metrics = {"actor/pg_loss": loss.item()}
        if batch.ref_logp is not None:
            kl = kl_penalty(logp, batch.ref_logp, cfg.kl_estimator)  # (B, T)
            metrics["actor/kl_ref"] = masked_mean(kl.detach(), mask).item()
            if cfg.kl_coef > 0 and not cfg.kl_in_reward:
                kl_loss = aggregate_loss(kl, mask, cfg.loss_agg, cfg.loss_norm_tokens)
                loss = loss + cfg.kl_coef * kl_loss
                metrics["actor/kl_loss"] = kl_loss.item()
        return self._entropy_and_metrics(loss, metrics, ratio, clipped, logp, batch, cfg, entropy)

    def _fused_policy_loss(self, logp, batch, adv, cfg, entropy):
        from coderlplus.kernels.policy_loss import fused_policy_loss

        mask = batch.response_mask
        kl_as_loss = cfg.kl_coef > 0 and not cfg.kl_in_reward and batch.ref_logp is not None
        loss, pg_loss, kl_loss, ratio, clipped = fused_policy_loss(
            logp, batch.old_logp, adv, mask, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
            batch.ref_logp, cfg.kl_coef if kl_as_loss else 0.0, cfg.kl_estimator,
            cfg.loss_agg, cfg.loss_norm_tokens,
        )  # fmt: skip
        metrics = {"actor/pg_loss": pg_loss.item()}
        if batch.ref_logp is not None:
            kl = kl_penalty(logp.detach(), batch.ref_logp, cfg.kl_estimator)
            metrics["actor/kl_ref"] = masked_mean(kl, mask).item()
            if kl_as_loss:
                metrics["actor/kl_loss"] = kl_loss.item()
        return self._entropy_and_metrics(loss, metrics, ratio, clipped, logp, batch, cfg, entropy)

    def _entropy_and_metrics(self, loss, metrics, ratio, clipped, logp, batch, cfg, entropy):
        mask = batch.response_mask
        log_ratio = logp.detach() - batch.old_logp
        metrics |= {
            "actor/clipfrac": masked_mean(clipped.float(), mask).item(),
            "actor/ratio_mean": masked_mean(ratio.detach(), mask).item(),
            "actor/approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
        }
        if entropy is not None and cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * aggregate_loss(entropy, mask, cfg.loss_agg, cfg.loss_norm_tokens)
        return loss, metrics
