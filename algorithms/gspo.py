"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071) — the worked
example of algorithms/README.md: a new algorithm in one file, reusing the shared ops.

How it departs from GRPO: the importance ratio is per *sequence*, the geometric mean of the
token ratios, ``s_i = exp(mean_t(logp_t - old_logp_t))``, and the whole sequence is clipped
together (so one odd token cannot veto or inflate a sequence's update). Because ``s_i`` is
close to 1, its clip ranges are tiny (3e-4 / 4e-4 in the paper). This is the GSPO-token form:
every token carries ``sg[s_i] * pi_t / sg[pi_t]``, whose value is ``s_i`` and whose gradient is
the token's own — equal to sequence-level GSPO when the advantages are per sequence.
Advantages are GRPO's group-normalised rewards; aggregation ``seq-mean-token-mean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig, sequence_scores
from coderlplus.ops import clipped_policy_objective, group_normalize, masked_mean
from coderlplus.registry import register_algorithm
from coderlplus.types import RolloutBatch


@dataclass
class GSPOConfig(AlgorithmConfig):
    clip_low: float = 3e-4
    """Lower clip range of the sequence ratio."""
    clip_high: float = 4e-4
    """Upper clip range of the sequence ratio."""
    loss_agg: str = "seq-mean-token-mean"
    """Each sequence weighs the same."""
    kl_coef: float = 0.0
    """The paper trains without a KL term."""


@register_algorithm("gspo")
class GSPO(Algorithm):
    Config = GSPOConfig
    min_group_size = 2  # the baseline is the group's other rollouts

    @torch.no_grad()
    def compute_advantages(self, batch: RolloutBatch, cfg: GSPOConfig) -> torch.Tensor:
        """``[B, T]``: group-normalised score on every real response token."""
        adv = group_normalize(sequence_scores(batch, cfg), batch.group_ids)  # (B,)
        return adv.unsqueeze(-1) * batch.response_mask  # (B, T)

    def policy_loss(self, logp, batch, adv, cfg: GSPOConfig, entropy=None):
        mask = batch.response_mask
        seq_log_ratio = masked_mean(logp - batch.old_logp, mask, dim=-1)  # (B,) log s_i
        # value log s_i on every token; gradient d logp_t (GSPO-token)
        log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()  # (B, T)
        pg_loss, ratio, clipped = clipped_policy_objective(
            log_ratio, adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip
        )
        return self.finish_loss(pg_loss, ratio, clipped, logp, batch, cfg, entropy)
