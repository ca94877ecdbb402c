"""The clipped policy loss with its KL term, in one autograd function.

Equal to ``clipped_policy_objective`` + ``kl_penalty`` + ``aggregate_loss`` of
``coderlplus.ops`` (tested), but computed in one vectorised pass that also forms the
gradient w.r.t. ``logp`` analytically, so autograd keeps no graph of the ~15 intermediate
``[B, T]`` tensors; the backward is one multiply. With ``r = exp(logp - old_logp)``:

- surrogate ``max(-A r, -A clip(r))`` (capped at ``-A c`` for ``A < 0`` with dual clip):
  gradient ``-A r`` where no clip binds, 0 where one does;
- KL(policy || reference) per token, ``x = ref_logp - logp``: k1 = ``-x`` (gradient 1),
  k2 = ``x^2 / 2`` (gradient ``-x``), k3 = ``e^x - 1 - x`` (gradient ``1 - e^x``);
- aggregation: each token's weight, e.g. ``mask / sum(mask)`` for token-mean.
"""

from __future__ import annotations

import torch

from coderlplus.ops.core import KL_ESTIMATORS, LOSS_AGG_MODES, clipped_policy_objective, kl_penalty


def token_weights(mask: torch.Tensor, mode: str, norm_tokens: float | None = None) -> torch.Tensor:
    """``[B, T]`` weights ``w`` with ``aggregate_loss(x, mask, mode) == (w * x).sum()``."""
    mask = mask.to(torch.promote_types(mask.dtype, torch.float32))
    B, T = mask.shape
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * B)
    if mode == "seq-mean-token-sum":
        return mask / B
    if mode == "seq-mean-token-sum-norm":
        return mask / (B * (norm_tokens or T))
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {LOSS_AGG_MODES}")


def _kl_grad(logp, ref_logp, estimator):
    """d KL_t / d logp_t of ``ops.kl_penalty`` (0 where its clamps bind)."""
    x = ref_logp - logp
    if estimator == "k1":
        return torch.ones_like(x)
    if estimator == "k2":
        return -x
    if estimator == "k3":
        kl = torch.expm1(x.clamp(-20, 20)) - x.clamp(-20, 20)
        live = (x >= -20) & (x <= 20) & (kl <= 10)
        return torch.where(live, -torch.expm1(x.clamp(-20, 20)), torch.zeros_like(x))
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logp, old_logp, adv, weights, ref_logp, clip_low, clip_high, dual_clip, kl_coef, estimator
    ):
        log_ratio = logp - old_logp
        pg, ratio, was_clipped = clipped_policy_objective(log_ratio, adv, clip_low, clip_high, dual_clip)
        unclipped = -adv * ratio  # its derivative w.r.t. logp, where no clip binds
        in_range = (log_ratio >= -20) & (log_ratio <= 20)
        grad = torch.where(was_clipped | ~in_range, torch.zeros_like(pg), unclipped)  # d pg / d logp
        pg_loss = (weights * pg).sum()
        loss = pg_loss
        kl_loss = None
        if ref_logp is not None:
            kl_loss = (weights * kl_penalty(logp, ref_logp, estimator)).sum()
            if kl_coef:
                loss = loss + kl_coef * kl_loss
                grad = grad + kl_coef * _kl_grad(logp, ref_logp, estimator)
        ctx.save_for_backward(weights * grad)
        ctx.mark_non_differentiable(ratio, was_clipped)
        return (
            loss,
            pg_loss.detach(),
            (kl_loss.detach() if kl_loss is not None else loss.new_zeros(())),
            ratio,
            was_clipped,
        )

    @staticmethod
    def backward(ctx, g_loss, *_):
        (grad,) = ctx.saved_tensors
        return g_loss * grad, None, None, None, None, None, None, None, None, None


def fused_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    norm_tokens: float | None = None,
):
    """Scalar ``agg(pg_loss) + kl_coef * agg(KL)`` and its parts, differentiable w.r.t. ``logp``.

    All tensors ``[B, T]``. Returns ``(loss, pg_loss, kl_loss, ratio, clipped)``; ``kl_loss`` is
    0 without ``ref_logp`` (it is computed, for logging, whenever ``ref_logp`` is given).
    """
    weights = token_weights(mask, loss_agg, norm_tokens)
    return _FusedPolicyLoss.apply(
        logp, old_logp, adv, weights, ref_logp, clip_low, clip_high, dual_clip, kl_coef, kl_estimator
    )
