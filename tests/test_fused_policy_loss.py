"""The fused policy loss (one autograd function) equals the ops-built loss: values, metrics, gradients."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from coderlplus.kernels.policy_loss import fused_policy_loss, token_weights
from coderlplus.ops import LOSS_AGG_MODES, aggregate_loss
from coderlplus.registry import ALGORITHMS
from coderlplus.types import RolloutBatch


def _batch(g: torch.Generator, B=6, T=7):
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T) < lengths.unsqueeze(-1)).float()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    batch = RolloutBatch(
        input_ids=torch.zeros(B, T + 2, dtype=torch.long),
        attention_mask=torch.ones(B, T + 2, dtype=torch.long),
        response_mask=mask.double(),
        rewards=torch.rand(B, generator=g, dtype=torch.float64),
        group_ids=torch.arange(B) // 2,
        old_logp=old,
        ref_logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
    )
    # ratios spread over [e^-0.6, e^0.6]: some inside the clip range, some clipped, some past dual clip
    logp = (old + 0.6 * (2 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    return batch, logp, adv


def test_token_weights_reproduce_every_aggregation():
    g = torch.Generator().manual_seed(0)
    batch, _, _ = _batch(g)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    for mode in LOSS_AGG_MODES:
        for norm in (None, 11):
            w = token_weights(batch.response_mask, mode, norm)
            ref = aggregate_loss(x, batch.response_mask, mode, norm)
            assert torch.allclose((w * x).sum(), ref, rtol=1e-12, atol=1e-12), mode


CASES = list(itertools.product(LOSS_AGG_MODES, ("k1", "k2", "k3"), (0.0, 1.2), (False, True), (0.0, 0.05)))


@pytest.mark.parametrize(("agg", "est", "dual", "kl_in_reward", "kl_coef"), CASES)
def test_fused_loss_equals_the_ops_loss(agg, est, dual, kl_in_reward, kl_coef):
    g = torch.Generator().manual_seed(hash((agg, est, dual, kl_in_reward, kl_coef)) % 2**31)
    batch, logp, adv = _batch(g)
    algo = ALGORITHMS.get("grpo")()
    cfg = algo.Config(
        clip_low=0.2, clip_high=0.28, dual_clip=dual, kl_coef=kl_coef, kl_estimator=est,
        kl_in_reward=kl_in_reward, loss_agg=agg, loss_norm_tokens=9,
    )  # fmt: skip
    fused_cfg = dataclasses.replace(cfg, fused_loss=True)
    loss_ref, m_ref = algo.policy_loss(logp, batch, adv, cfg)
    (grad_ref,) = torch.autograd.grad(loss_ref, logp)
    loss, m = algo.policy_loss(logp, batch, adv, fused_cfg)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad, grad_ref, rtol=1e-10, atol=1e-12)
    assert m.keys() == m_ref.keys()
    for k in m:
        assert m[k] == pytest.approx(m_ref[k], rel=1e-9, abs=1e-12), k
    assert 0 < m["actor/clipfrac"] < 1  # the data exercises both clipped and unclipped tokens


def test_fused_loss_without_reference_and_backward_scales():
    g = torch.Generator().manual_seed(3)
    batch, logp, adv = _batch(g)
    loss, pg_loss, kl_loss, _ratio, _clipped = fused_policy_loss(
        logp, batch.old_logp, adv, batch.response_mask, 0.2, 0.2
    )
    assert kl_loss == 0 and torch.equal(loss.detach(), pg_loss)
    (g1,) = torch.autograd.grad(loss, logp)
    (g3,) = torch.autograd.grad(
        3 * fused_policy_loss(logp, batch.old_logp, adv, batch.response_mask, 0.2, 0.2)[0], logp
    )
    assert torch.allclose(3 * g1, g3)
    assert torch.equal(g1[batch.response_mask == 0], torch.zeros_like(g1[batch.response_mask == 0]))
