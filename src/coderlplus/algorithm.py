"""The algorithm interface, and the options every algorithm shares.

An algorithm plugin (one file in ``algorithms/``) subclasses :class:`Algorithm`,
declares a ``Config`` dataclass extending :class:`AlgorithmConfig`, implements
two pure functions, and registers with ``@register_algorithm("name")``:

- ``compute_advantages(batch, cfg) -> adv [B, T]`` (no grad);
- ``policy_loss(logp, batch, adv, cfg) -> (loss, metrics)``.

The trainer owns everything else (sampling, micro-batching, optimiser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from coderlplus.ops.core import KL_ESTIMATORS, LOSS_AGG_MODES
from coderlplus.registry import ConfigError
from coderlplus.types import RolloutBatch


@dataclass
class AlgorithmConfig:
    clip_low: float = 0.2
    """Lower clip range of the ratio: r >= 1 - clip_low."""
    clip_high: float = 0.2
    """Upper clip range of the ratio: r <= 1 + clip_high (DAPO clip-higher: 0.28)."""
    kl_coef: float = 0.001
    """Coefficient of KL(policy || reference) added to the loss; 0 = no reference model."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (low variance)."""
    loss_agg: str = "token-mean"
    """Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (subtracted from the loss)."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    mini_batches: int = 1
    """Optimiser steps per epoch (the batch is split in this many mini-batches)."""

    def __post_init__(self):
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ConfigError(
                f"clip_low={self.clip_low} must be in [0, 1) and clip_high={self.clip_high} >= 0"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}; choose one of {list(KL_ESTIMATORS)}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ConfigError(f"loss_agg={self.loss_agg!r}; choose one of {list(LOSS_AGG_MODES)}")
        if self.epochs < 1 or self.mini_batches < 1:
            raise ConfigError("epochs and mini_batches must be >= 1")


class Algorithm:
    """Base class of RL algorithm plugins."""

    Config: ClassVar[type] = AlgorithmConfig
    registry_name: ClassVar[str | None] = None

    def default_config(self) -> AlgorithmConfig:
        return self.Config()

    def needs_reference(self, cfg: AlgorithmConfig) -> bool:
        """Whether the trainer must compute ``batch.ref_logp`` (a frozen reference model)."""
        return cfg.kl_coef > 0

    def compute_advantages(self, batch: RolloutBatch, cfg: AlgorithmConfig) -> torch.Tensor:
        raise NotImplementedError

    def policy_loss(
        self,
        logp: torch.Tensor,
        batch: RolloutBatch,
        adv: torch.Tensor,
        cfg: AlgorithmConfig,
        entropy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and float metrics. ``entropy [B,T]`` is given when ``entropy_coef > 0``."""
        raise NotImplementedError
