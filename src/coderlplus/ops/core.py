"""The tensor ops every algorithm is built from: masked reductions, advantage estimators,
KL estimators, the clipped surrogate, value loss and loss aggregation.

Pure functions, no state. Shapes: B rollouts, T response tokens; ``mask [B, T]`` is 1 for
real response tokens and 0 for padding. Each function is tested against a slow loop
version and hand-computed cases (``tests/test_ops.py``).
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------- masked reductions
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``x``, ``mask``: same shape."""
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (0 if there are none)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries of ``x`` (a scalar; 0 with fewer than two)."""
    mean = masked_mean(x, mask)
    return masked_sum((x - mean) ** 2, mask) / (mask.sum() - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` with mean and (unbiased) std over the masked entries; 0 on padding."""
    out = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------- sequence-level baselines
def _group_stats(scores: torch.Tensor, group_ids: torch.Tensor):
    """(index of each row's group [B], group sizes [n_groups], group sums [n_groups])."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=scores.dtype, device=scores.device).index_add_(
        0, inverse, scores
    )
    return inverse, counts, sums


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
    scores = scores.float()
    inverse, counts, sums = _group_stats(scores, group_ids)
    means = sums / counts
    sq = torch.zeros_like(sums).index_add_(0, inverse, (scores - means[inverse]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    adv = scores - means[inverse]
    if norm_by_std:
        adv = adv / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))


def leave_one_out(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO advantages: ``r_i - mean_{j != i, same group} r_j``. ``[B] -> [B]``.

    Equal to ``G / (G - 1) * (r_i - mean_g)``. A group of one rollout gets advantage 0.
    """
    scores = scores.float()
    inverse, counts, sums = _group_stats(scores, group_ids)
    n = counts[inverse]
    baseline = (sums[inverse] - scores) / (n - 1).clamp(min=1)
    return torch.where(n > 1, scores - baseline, torch.zeros_like(scores))


# ---------------------------------------------------------------------------- token-level rewards, returns
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs. ``[B, T]``.

    With ``log_ratio = ref_logp - logp``: k1 = ``-log_ratio``; k2 = ``log_ratio**2 / 2``;
    k3 = ``exp(log_ratio) - 1 - log_ratio`` (computed with ``expm1``; unbiased, non-negative, low variance;
    Schulman 2020, verl's ``low_var_kl``, clamped to [-10, 10] like verl).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20, 20)
        return (torch.expm1(log_ratio) - log_ratio).clamp(-10, 10)  # expm1: >= 0 in fp32 too
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def token_level_rewards(
    scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """Per-token rewards ``[B, T]``: the rollout's score on its last real token, minus
    ``kl_coef * kl`` on every real token (KL folded into the reward, as in RLHF-PPO and
    REINFORCE++). ``scores [B]``, ``mask [B, T]``, ``kl [B, T]`` or None.
    """
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    has_tokens = (mask.sum(-1) > 0).float()
    rewards.scatter_(1, last.unsqueeze(-1), (scores.float() * has_tokens).unsqueeze(-1))
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.float()
    return rewards * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Returns-to-go ``G_t = sum_{s >= t} gamma^(s-t) r_s`` over the real tokens. ``[B, T] -> [B, T]``."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last real token is 0),
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``R_t = A_t + V_t`` (the critic's target).
    All ``[B, T]``; padding gets 0. Returns ``(advantages, returns)``.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_value = values[:, t]
    return adv, (adv + values) * mask


# ---------------------------------------------------------------------------- losses
def clipped_policy_objective(
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate as a per-token loss to minimise.

    ``loss = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(log_ratio)``
    (``log_ratio = logp - old_logp``); separate low/high ranges give DAPO's clip-higher.
    ``dual_clip = c > 1`` (Ye et al. 2020) also caps the loss of negative-advantage tokens at
    ``-A * c``, so a very large ratio on a bad token cannot blow the update up.
    All inputs ``[B, T]`` (``adv`` broadcast). Returns ``(loss, ratio, clipped)``; ``clipped``
    (bool) marks the tokens whose gradient the clipping removed.
    """
    ratio = torch.exp(log_ratio.clamp(-20, 20))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip:
        capped = -adv * dual_clip
        dual = (adv < 0) & (loss > capped)
        loss = torch.where(dual, capped, loss)
        was_clipped = was_clipped | dual
    return loss, ratio, was_clipped


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss ``0.5 * max((V - R)^2, (V_clip - R)^2)`` per token, with
    ``V_clip = V_old + clamp(V - V_old, -clip, clip)`` (``clip <= 0``: no clipping).
    All ``[B, T]``. Returns ``(loss [B, T], clipped [B, T] bool)``.
    """
    loss = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * loss, torch.zeros_like(loss, dtype=torch.bool)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    loss_clip = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(loss, loss_clip), loss_clip > loss


def aggregate_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_tokens: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token-mean``: mean over all real tokens of the batch (DAPO; default).
    - ``seq-mean-token-mean``: mean over tokens of each sequence, then over sequences (original GRPO).
    - ``seq-mean-token-sum``: sum over tokens of each sequence, then mean over sequences.
    - ``seq-mean-token-sum-norm``: Dr.GRPO: each sequence's sum divided by a constant
      ``norm_tokens`` (the generation budget; default the width ``T``), then mean over sequences,
      so no length bias enters through the normaliser.
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum-norm":
        return masked_sum(loss, mask, dim=-1).mean() / (norm_tokens or loss.shape[-1])
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGG_MODES}")


def micro_batch_weight(micro_mask: torch.Tensor, full_mask: torch.Tensor, mode: str) -> float:
    """The factor that makes a sum of micro-batch losses equal the full batch's loss.

    ``aggregate_loss`` normalises by tokens (token-mean) or sequences (seq-mean-*);
    a micro-batch holds a share of those. ``micro_mask``: ``[b, T]``; ``full_mask``: ``[B, T]``.
    """
    if mode == "token-mean":
        return float(micro_mask.sum() / full_mask.sum().clamp(min=1))
    return micro_mask.shape[0] / full_mask.shape[0]


# ---------------------------------------------------------------------------- diagnostics
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 = perfect critic, 0 = no better than
    a constant, negative = worse. ``nan`` when the returns do not vary."""
    var_r = masked_var(returns, mask)
    if var_r <= 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask) / var_r
