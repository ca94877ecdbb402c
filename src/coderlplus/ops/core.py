"""Masked reductions, group-normalised advantages, KL estimators, clipped objective, loss aggregation."""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``x``, ``mask``: same shape."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 if there are none)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (unbiased std)."""
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps)


def group_normalize(
    scores: torch.Tensor, group_ids: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: ``(r - mean_g) / (std_g + eps)`` within each group.

    Args:
        scores: ``[B]`` scalar reward per rollout.
        group_ids: ``[B]`` rollouts of the same prompt share an id.
        norm_by_std: divide by the group's (unbiased) std; False is Dr.GRPO.
    Returns: ``[B]``. A group of one rollout gets advantage 0.
    """
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    scores = scores.float()
    sums = torch.zeros(counts.shape[0], dtype=scores.dtype).index_add_(0, inverse, scores)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inverse, (scores - means[inverse]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    adv = scores - means[inverse]
    if norm_by_std:
        adv = adv / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs. ``[B, T]``.

    With ``log_ratio = ref_logp - logp``: k1 = ``-log_ratio``; k2 = ``log_ratio**2 / 2``;
    k3 = ``exp(log_ratio) - 1 - log_ratio`` (unbiased, non-negative, low variance;
    Schulman 2020, verl's ``low_var_kl``, clamped to [-10, 10] like verl).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.exp(log_ratio) - 1 - log_ratio).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def clipped_policy_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a per-token loss to minimise.

    ``loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))`` with
    ``r = exp(logp - old_logp)``. All inputs ``[B, T]`` (``adv`` broadcast).
    Returns ``(loss [B,T], ratio [B,T], clipped [B,T] bool)``.
    """
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, ratio, clipped > unclipped


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token-mean``: mean over all real tokens of the batch (DAPO; default).
    - ``seq-mean-token-mean``: mean over tokens of each sequence, then over sequences (original GRPO).
    - ``seq-mean-token-sum``: sum over tokens of each sequence, then mean over sequences (Dr.GRPO).
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=-1).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGG_MODES}")


def micro_batch_weight(micro_mask: torch.Tensor, full_mask: torch.Tensor, mode: str) -> float:
    """The factor that makes a sum of micro-batch losses equal the full batch's loss.

    ``aggregate_loss`` normalises by tokens (token-mean) or sequences (seq-mean-*);
    a micro-batch holds a share of those. ``micro_mask``: ``[b, T]``; ``full_mask``: ``[B, T]``.
    """
    if mode == "token-mean":
        return float(micro_mask.sum() / full_mask.sum().clamp(min=1))
    return micro_mask.shape[0] / full_mask.shape[0]
