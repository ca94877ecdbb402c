import math

import pytest
import torch

from coderlplus.ops import (
    aggregate_loss,
    clipped_policy_objective,
    group_normalize,
    kl_penalty,
    micro_batch_weight,
)
from coderlplus.registry import ALGORITHMS
from coderlplus.types import RolloutBatch


def _batch(rewards, groups, T=3, lengths=None):
    B = len(rewards)
    lengths = lengths or [T] * B
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    return RolloutBatch(
        input_ids=torch.zeros(B, T + 2, dtype=torch.long),
        attention_mask=torch.ones(B, T + 2, dtype=torch.long),
        response_mask=mask,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(groups),
        old_logp=torch.zeros(B, T),
    )


def test_grpo_advantages_hand_computed():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) -> adv +-0.8660
    # group 1: rewards 1, 1, 1, 0 -> mean 0.75, std 0.5 -> adv 0.5, 0.5, 0.5, -1.5
    algo = ALGORITHMS.get("grpo")()
    cfg = algo.default_config()
    b = _batch([1, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1], lengths=[3, 2, 1, 3, 3, 3, 3, 3])
    adv = algo.compute_advantages(b, cfg)
    s = 1 / math.sqrt(1 / 3)
    expected_seq = torch.tensor([0.5 * s, -0.5 * s, -0.5 * s, 0.5 * s, 0.5, 0.5, 0.5, -1.5])
    assert torch.allclose(adv[:, 0], expected_seq, atol=1e-5)
    assert adv[1, 2] == 0 and adv[2, 1] == 0  # padding gets no advantage
    assert torch.allclose(adv[0], adv[0, 0].expand(3))


def test_dr_grpo_no_std_and_singleton_groups():
    assert torch.allclose(
        group_normalize(torch.tensor([1.0, 0.0, 0.0, 5.0]), torch.tensor([0, 0, 0, 1]), norm_by_std=False),
        torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0]),
    )
    # all-equal group: zero advantage, no NaN
    adv = group_normalize(torch.tensor([1.0, 1.0]), torch.tensor([3, 3]))
    assert torch.equal(adv, torch.zeros(2))


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log_ratio = ref - logp = -0.5
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.125]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-0.5) - 1 + 0.5]))
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k9")


def test_clipped_objective_hand_computed():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, _ratio, clipped = clipped_policy_objective(logp - old, adv, 0.2, 0.28)
    # A>0, r=1.5 -> min(1.5, 1.28) = 1.28 -> loss -1.28 (clipped); A>0, r=0.5 -> min(0.5, 0.8)=0.5 -> -0.5
    # A<0, r=1.1 -> loss = max(1.1, 1.1) = 1.1 (inside the range)
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5, 1.1]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False]]


def test_loss_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_sum_to_full_batch(mode):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    full = aggregate_loss(loss, mask, mode)
    parts = sum(
        aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode)
        * micro_batch_weight(mask[i : i + 2], mask, mode)
        for i in range(0, 6, 2)
    )
    assert torch.allclose(full, parts, atol=1e-6)


def test_grpo_loss_gradient_direction():
    algo = ALGORITHMS.get("grpo")()
    cfg = algo.Config(kl_coef=0.0)
    b = _batch([1, 0], [0, 0], T=2)
    logp = torch.zeros(2, 2, requires_grad=True)
    adv = algo.compute_advantages(b, cfg)
    loss, metrics = algo.policy_loss(logp, b, adv, cfg)
    loss.backward()
    # the rewarded rollout's log-probs go up (negative gradient), the other's go down
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()
    assert metrics["actor/clipfrac"] == 0.0
