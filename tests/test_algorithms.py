"""Unit tests of the algorithm plugins (grpo, rloo, reinforce_pp, reinforce_pp_baseline, ppo,
gspo) and the base class's policy loss: advantages on hand-computed cases, the loss and its
metrics, GSPO's sequence ratio, configs. ``tests/test_grpo.py`` holds the older GRPO checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from coderlplus.algorithm import Algorithm, AlgorithmConfig
from coderlplus.registry import ALGORITHMS, ConfigError
from coderlplus.types import RolloutBatch

NAMES = ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo", "gspo"]
TOL = 1e-6


def close(actual, expected, tol=TOL):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def algo_of(name: str) -> Algorithm:
    return ALGORITHMS.get(name)()


def _batch(rewards, groups, T=3, lengths=None, old_logp=None, ref_logp=None, values=None):
    B = len(rewards)
    lengths = lengths or [T] * B
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    as_t = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    return RolloutBatch(
        input_ids=torch.zeros(B, T + 2, dtype=torch.long),
        attention_mask=torch.ones(B, T + 2, dtype=torch.long),
        response_mask=mask,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(groups),
        old_logp=torch.zeros(B, T) if old_logp is None else as_t(old_logp),
        ref_logp=as_t(ref_logp),
        values=as_t(values),
    )


def whiten(vals):
    """Hand whitening of a list: (v - mean) / sqrt(unbiased var + 1e-8)."""
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return [(v - m) / math.sqrt(var + 1e-8) for v in vals]


# ============================================================================ GRPO / GSPO / RLOO
def test_group_advantages_with_ties_all_equal_group_and_padding():
    # groups of 4: [1, 0, 0, 1], [1, 1, 1, 0] and an all-equal group [0.5] * 4
    rewards = [1, 0, 0, 1, 1, 1, 1, 0, 0.5, 0.5, 0.5, 0.5]
    groups = [0] * 4 + [1] * 4 + [2] * 4
    lengths = [3, 2, 1, 3, 3, 3, 3, 2, 3, 1, 2, 3]
    b = _batch(rewards, groups, lengths=lengths)
    e = 1e-6
    # GRPO / GSPO: group 0: mean .5, unbiased std sqrt(1/3); group 1: mean .75, std .5
    s0, s1 = math.sqrt(1 / 3) + e, 0.5 + e
    grpo_seq = [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1]
    # RLOO: group 0: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3; group 1: 1 - 2/3 = 1/3, 0 - 1 = -1
    rloo_seq = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]
    for name, seq in [("grpo", grpo_seq), ("gspo", grpo_seq), ("rloo", rloo_seq)]:
        algo = algo_of(name)
        adv = algo.compute_advantages(b, algo.default_config())
        expected = torch.tensor(seq + [0.0] * 4).unsqueeze(-1) * b.response_mask
        close(adv, expected)
        assert torch.equal(adv[8:], torch.zeros(4, 3)), name  # all-equal group: exactly zero
        assert torch.equal(adv * (1 - b.response_mask), torch.zeros_like(adv)), name  # padding


def test_rloo_is_reward_minus_mean_of_the_other_three():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, generator=g).tolist()
    b = _batch(rewards, [0, 1] * 4, T=2)  # interleaved groups
    algo = algo_of("rloo")
    adv = algo.compute_advantages(b, algo.default_config())
    for i in range(8):
        others = [rewards[j] for j in range(8) if j != i and j % 2 == i % 2]
        assert len(others) == 3
        close(adv[i], [rewards[i] - sum(others) / 3] * 2, 1e-6)


def test_dr_grpo_advantages_mean_centred():
    algo = algo_of("grpo")
    b = _batch([1, 0, 0, 1, 1, 1, 1, 0], [0] * 4 + [1] * 4, T=1)
    adv = algo.compute_advantages(b, algo.Config(norm_by_std=False))
    close(adv[:, 0], [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def _kl_in_reward_batch():
    # k1 per token = old_logp - ref_logp; row 2 has length 1 (its padding holds garbage 7.0)
    # row 0: [.5, .5] -> sum 1; row 1: [1, 2] -> 3; row 2: [2] -> 2; row 3: [-1, 0] -> -1
    ref = torch.full((4, 2), -1.0)
    k1 = torch.tensor([[0.5, 0.5], [1.0, 2.0], [2.0, 7.0], [-1.0, 0.0]])
    return _batch([1, 0, 0, 1], [0] * 4, T=2, lengths=[2, 2, 1, 2], old_logp=ref + k1, ref_logp=ref)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_kl_in_reward_subtracts_summed_kl_before_the_baseline(name):
    algo = algo_of(name)
    cfg = algo.Config(kl_in_reward=True, kl_coef=0.1, kl_estimator="k1")
    b = _kl_in_reward_batch()
    # scores = reward - 0.1 * sum_t KL_t = [1 - .1, 0 - .3, 0 - .2, 1 + .1] = [.9, -.3, -.2, 1.1]
    scores = [0.9, -0.3, -0.2, 1.1]
    if name == "rloo":
        # sum 1.5: .9 - .6/3 = .7; -.3 - 1.8/3 = -.9; -.2 - 1.7/3; 1.1 - .4/3
        seq = [0.7, -0.9, -0.2 - 1.7 / 3, 1.1 - 0.4 / 3]
    else:
        # mean .375, deviations [.525, -.675, -.575, .725], unbiased var 1.5875 / 3
        std = math.sqrt(1.5875 / 3) + 1e-6
        seq = [(s - 0.375) / std for s in scores]
    adv = algo.compute_advantages(b, cfg)
    close(adv, torch.tensor(seq).unsqueeze(-1) * b.response_mask, 2e-6)
    # kl_in_reward=False: the reference does not touch the advantages
    plain = algo.compute_advantages(b, algo.Config(kl_coef=0.1))
    no_ref = algo.compute_advantages(dataclasses.replace(b, ref_logp=None), algo.Config(kl_coef=0.1))
    assert torch.equal(plain, no_ref)
    # kl_in_reward without ref_logp: a clear error
    with pytest.raises(ValueError, match="ref_logp"):
        algo.compute_advantages(dataclasses.replace(b, ref_logp=None), cfg)


# ============================================================================ REINFORCE++
def _rpp_batch(groups=(0, 0)):
    # 2 x 3, row 1 has length 2; k1 = old - ref: row 0 [.2, -.1, .4]; row 1 [.5, .3, (pad 9)]
    ref = torch.full((2, 3), -1.0)
    k1 = torch.tensor([[0.2, -0.1, 0.4], [0.5, 0.3, 9.0]])
    return _batch([1, 0], list(groups), T=3, lengths=[3, 2], old_logp=ref + k1, ref_logp=ref)


def test_reinforce_pp_hand_computed():
    algo = algo_of("reinforce_pp")
    cfg = algo.Config(kl_coef=0.1, kl_estimator="k1", gamma=1.0)
    # token rewards (-0.1 * k1, reward on the last real token):
    #   row 0: [-.02, .01, 1 - .04 = .96]; row 1: [-.05, -.03, 0]
    # returns-to-go: row 0: [.95, .97, .96]; row 1: [-.08, -.03, 0]
    # global whitening over the 5 real tokens: mean 2.77 / 5 = .554,
    #   deviations [.396, .416, .406, -.634, -.584], unbiased var 1.23772 / 4 = .30943
    sd = math.sqrt(0.30943 + 1e-8)
    expected = [[0.396 / sd, 0.416 / sd, 0.406 / sd], [-0.634 / sd, -0.584 / sd, 0.0]]
    close(algo.compute_advantages(_rpp_batch(), cfg), expected, 2e-6)
    assert cfg.kl_in_reward  # REINFORCE++'s default
    with pytest.raises(ValueError, match="ref_logp"):
        algo.compute_advantages(dataclasses.replace(_rpp_batch(), ref_logp=None), cfg)


def test_reinforce_pp_discounted_hand_computed():
    algo = algo_of("reinforce_pp")
    cfg = algo.Config(kl_coef=0.1, kl_estimator="k1", gamma=0.5)
    # returns with gamma .5: row 0: G2 = .96, G1 = .01 + .48 = .49, G0 = -.02 + .245 = .225
    #                        row 1: G1 = -.03, G0 = -.05 - .015 = -.065
    w = whiten([0.225, 0.49, 0.96, -0.065, -0.03])
    close(algo.compute_advantages(_rpp_batch(), cfg), [w[:3], [*w[3:], 0.0]], 2e-6)


def test_reinforce_pp_whitens_globally_so_all_equal_groups_are_not_zero():
    # groups [1, 1] and [0, 0], no KL: returns [1, 1, 0, 0]; mean .5, var (4 * .25) / 3 = 1/3
    b = _batch([1, 1, 0, 0], [0, 0, 1, 1], T=1)
    algo = algo_of("reinforce_pp")
    adv = algo.compute_advantages(b, algo.Config(kl_coef=0.0))
    a = 0.5 / math.sqrt(1 / 3 + 1e-8)
    close(adv[:, 0], [a, a, -a, -a])
    # with the group baseline the all-equal groups centre to zero
    algo = algo_of("reinforce_pp_baseline")
    assert torch.equal(algo.compute_advantages(b, algo.Config(kl_coef=0.0)), torch.zeros(4, 1))


def test_reinforce_pp_baseline_centres_groups_first():
    algo = algo_of("reinforce_pp_baseline")
    # no KL, T = 1: centred rewards [.5, -.5, -.5, .5, .25, .25, .25, -.75], mean 0,
    # unbiased var (4 * .25 + 3 * .0625 + .5625) / 7 = 1.75 / 7 = .25 -> std .5
    b = _batch([1, 0, 0, 1, 1, 1, 1, 0], [0] * 4 + [1] * 4, T=1)
    adv = algo.compute_advantages(b, algo.Config(kl_coef=0.0))
    s = math.sqrt(0.25 + 1e-8)
    close(adv[:, 0], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.25 / s, 0.25 / s, 0.25 / s, -0.75 / s])


def test_reinforce_pp_baseline_with_kl_hand_computed():
    algo = algo_of("reinforce_pp_baseline")
    cfg = algo.Config(kl_coef=0.1, kl_estimator="k1")
    # 4 rows, T 2, groups [0, 0, 1, 1], rewards [1, 0, 1, 1]; row 1 has length 1
    # k1 = old - ref: row 0 [.5, .5]; row 1 [1, (pad 3)]; row 2 [0, 0]; row 3 [0, -1]
    ref = torch.full((4, 2), -2.0)
    k1 = torch.tensor([[0.5, 0.5], [1.0, 3.0], [0.0, 0.0], [0.0, -1.0]])
    b = _batch([1, 0, 1, 1], [0, 0, 1, 1], T=2, lengths=[2, 1, 2, 2], old_logp=ref + k1, ref_logp=ref)
    # centred rewards: group 0 mean .5 -> [.5, -.5]; group 1 mean 1 -> [0, 0]
    # token rewards: row 0 [-.05, .5 - .05 = .45]; row 1 [-.5 - .1 = -.6]; row 2 [0, 0];
    #                row 3 [0, 0 + .1 = .1]
    # returns-to-go: row 0 [.4, .45]; row 1 [-.6]; row 2 [0, 0]; row 3 [.1, .1]
    w = whiten([0.4, 0.45, -0.6, 0.0, 0.0, 0.1, 0.1])
    expected = [[w[0], w[1]], [w[2], 0.0], [w[3], w[4]], [w[5], w[6]]]
    close(algo.compute_advantages(b, cfg), expected, 2e-6)


# ============================================================================ PPO
def _ppo_batch():
    # rewards 1 (length 3) and 2 (length 2); values at sampling time (padding: garbage 99)
    return _batch([1, 2], [0, 1], T=3, lengths=[3, 2], values=[[0.5, 0.6, 0.7], [1.0, 1.5, 99.0]])


def test_ppo_gae_hand_computed():
    algo = algo_of("ppo")
    cfg = algo.Config(kl_coef=0.0, gamma=0.9, lam=0.8, whiten_advantages=False)
    # gamma * lam = .72
    # row 0: d2 = 1 - .7 = .3; d1 = .9 * .7 - .6 = .03; d0 = .9 * .6 - .5 = .04
    #        A = [.04 + .72 * .246, .03 + .72 * .3, .3] = [.21712, .246, .3]
    # row 1: d1 = 2 - 1.5 = .5; d0 = .9 * 1.5 - 1 = .35; A = [.35 + .72 * .5, .5] = [.71, .5]
    adv = algo.compute_advantages(_ppo_batch(), cfg)
    close(adv, [[0.21712, 0.246, 0.3], [0.71, 0.5, 0.0]])
    # whitened over the 5 real tokens (the default)
    w = whiten([0.21712, 0.246, 0.3, 0.71, 0.5])
    adv = algo.compute_advantages(_ppo_batch(), algo.Config(kl_coef=0.0, gamma=0.9, lam=0.8))
    close(adv, [w[:3], [*w[3:], 0.0]], 2e-6)


def test_ppo_gae_with_kl_in_reward_hand_computed():
    algo = algo_of("ppo")
    cfg = algo.Config(kl_coef=0.1, kl_estimator="k1", gamma=0.9, lam=0.8, whiten_advantages=False)
    ref = torch.full((1, 3), -1.0)
    b = _batch(
        [1], [0], T=3, old_logp=ref + torch.tensor([[0.1, 0.2, 0.3]]), ref_logp=ref, values=[[0.5, 0.6, 0.7]]
    )
    # token rewards [-.01, -.02, 1 - .03 = .97]
    # d2 = .97 - .7 = .27; d1 = -.02 + .63 - .6 = .01; d0 = -.01 + .54 - .5 = .03
    # A2 = .27; A1 = .01 + .72 * .27 = .2044; A0 = .03 + .72 * .2044 = .177168
    close(algo.compute_advantages(b, cfg), [[0.177168, 0.2044, 0.27]])
    with pytest.raises(ValueError, match="values"):
        algo.compute_advantages(dataclasses.replace(b, values=None), cfg)


def test_ppo_critic_loss_hand_computed():
    algo = algo_of("ppo")
    cfg = algo.Config(kl_coef=0.0, gamma=0.9, lam=0.8, value_clip=0.2, vf_coef=0.5)
    b = _ppo_batch()
    # GAE returns (= A + V): row 0 [.71712, .846, 1.0]; row 1 [1.71, 2.0]
    new = torch.tensor([[1.0, 0.5, 0.8], [0.6, 1.8, 42.0]], requires_grad=True)
    # (0,0) V 1.0, old .5 -> V_clip .7; (1 - .71712)^2 = .0800210944 > (.7 - .71712)^2 -> .0400105472
    # (0,1) V .5, old .6 -> inside; (.5 - .846)^2 = .119716 -> .059858
    # (0,2) V .8, old .7 -> inside; (.8 - 1)^2 = .04 -> .02
    # (1,0) V .6, old 1 -> V_clip .8; (.6 - 1.71)^2 = 1.2321 > (.8 - 1.71)^2 = .8281 -> .61605
    # (1,1) V 1.8, old 1.5 -> V_clip 1.7; (1.8 - 2)^2 = .04 < (1.7 - 2)^2 = .09 -> .045 (clipped)
    # token-mean: .7809185472 / 5 = .15618370944; times vf_coef .5
    loss, metrics = algo.critic_loss(new, b, cfg)
    close(loss, 0.5 * 0.7809185472 / 5)
    assert metrics["critic/vf_loss"] == pytest.approx(0.7809185472 / 5, abs=1e-6)
    assert metrics["critic/vf_clipfrac"] == pytest.approx(1 / 5)
    assert metrics["critic/returns_mean"] == pytest.approx((0.71712 + 0.846 + 1.0 + 1.71 + 2.0) / 5, abs=1e-6)
    assert "critic/explained_variance" in metrics
    loss.backward()
    # gradient: vf_coef / 5 * (V - R) on unclipped tokens; 0 on the clipped token and padding
    close(
        new.grad,
        [[0.1 * (1 - 0.71712), 0.1 * (0.5 - 0.846), 0.1 * (0.8 - 1.0)], [0.1 * (0.6 - 1.71), 0.0, 0.0]],
    )


# ============================================================================ the default policy loss
def _loss_case(kl_coef=0.1, kl_in_reward=False, entropy_coef=0.01, loss_agg="token-mean"):
    # row 0: 2 tokens, row 1: 1 token (its padding holds garbage)
    r = torch.tensor([[1.5, 0.9], [0.5, 3.0]])
    old = torch.full((2, 2), -1.0)
    logp = (old + r.log()).requires_grad_(True)
    ref = torch.tensor([[-1.2, -0.8], [-1.0, -4.0]])
    b = _batch([0, 0], [0, 1], T=2, lengths=[2, 1], old_logp=old, ref_logp=ref)
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    entropy = torch.tensor([[0.5, 1.0], [2.0, 9.0]])
    cfg = AlgorithmConfig(
        clip_low=0.2,
        clip_high=0.2,
        kl_coef=kl_coef,
        kl_in_reward=kl_in_reward,
        kl_estimator="k1",
        entropy_coef=entropy_coef,
        loss_agg=loss_agg,
    )
    return logp, b, adv, entropy, cfg


# pg loss per token (clip .2/.2): r 1.5, A 1 -> -min(1.5, 1.2) = -1.2 (clipped);
# r .9, A 1 -> -.9; r .5, A -2 -> max(1.0, 2 * .8) = 1.6 (clipped)
PG = [-1.2, -0.9, 1.6]
# k1 = logp - ref = (-1 + log r) - ref: [.2 + log 1.5, -.2 + log .9, log .5]
KL = [0.2 + math.log(1.5), -0.2 + math.log(0.9), math.log(0.5)]
ENT = [0.5, 1.0, 2.0]


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "ppo"])
def test_default_policy_loss_hand_computed(name):
    algo = algo_of(name)
    assert type(algo).policy_loss is Algorithm.policy_loss  # these use the base class's loss
    logp, b, adv, entropy, cfg = _loss_case()
    loss, metrics = algo.policy_loss(logp, b, adv, cfg, entropy=entropy)
    pg, kl, ent = sum(PG) / 3, sum(KL) / 3, sum(ENT) / 3  # token-mean over 3 real tokens
    close(loss, pg + 0.1 * kl - 0.01 * ent)
    assert metrics["actor/pg_loss"] == pytest.approx(pg, abs=1e-6)
    assert metrics["actor/clipfrac"] == pytest.approx(2 / 3)
    log_r = [math.log(1.5), math.log(0.9), math.log(0.5)]
    assert metrics["actor/approx_kl"] == pytest.approx(sum(0.5 * x * x for x in log_r) / 3, abs=1e-6)
    assert metrics["actor/kl_ref"] == pytest.approx(kl, abs=1e-6)
    assert metrics["actor/kl_loss"] == pytest.approx(kl, abs=1e-6)
    assert metrics["actor/ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)
    loss.backward()
    # d/dlogp: unclipped -A r / 3 plus the k1 term .1 / 3 (d k1 / d logp = 1); padding 0
    close(logp.grad, [[0.1 / 3, (-0.9 + 0.1) / 3], [0.1 / 3, 0.0]])


def test_default_policy_loss_no_kl_term_when_kl_in_reward():
    algo = algo_of("grpo")
    logp, b, adv, entropy, cfg = _loss_case(kl_in_reward=True)
    loss, metrics = algo.policy_loss(logp, b, adv, cfg, entropy=entropy)
    close(loss, sum(PG) / 3 - 0.01 * sum(ENT) / 3)
    assert "actor/kl_loss" not in metrics
    assert metrics["actor/kl_ref"] == pytest.approx(sum(KL) / 3, abs=1e-6)  # still logged
    # no reference at all: no KL term and no kl_ref metric
    logp, b, adv, entropy, cfg = _loss_case(entropy_coef=0.0)
    loss, metrics = algo.policy_loss(logp, dataclasses.replace(b, ref_logp=None), adv, cfg, entropy=entropy)
    close(loss, sum(PG) / 3)
    assert "actor/kl_ref" not in metrics and "actor/kl_loss" not in metrics
    for key in ("actor/pg_loss", "actor/clipfrac", "actor/approx_kl"):
        assert key in metrics


def test_default_policy_loss_seq_mean_aggregation():
    algo = algo_of("rloo")
    logp, b, adv, entropy, cfg = _loss_case(loss_agg="seq-mean-token-mean")
    loss, _ = algo.policy_loss(logp, b, adv, cfg, entropy=entropy)
    # per-sequence means, then the mean over the 2 sequences
    seq = lambda v: ((v[0] + v[1]) / 2 + v[2]) / 2  # noqa: E731
    close(loss, seq(PG) + 0.1 * seq(KL) - 0.01 * seq(ENT))
    logp, b, adv, entropy, cfg = _loss_case(loss_agg="seq-mean-token-sum-norm", entropy_coef=0.0)
    loss, _ = algo.policy_loss(logp, b, adv, cfg)
    norm = lambda v: ((v[0] + v[1]) + v[2]) / 2 / 2  # noqa: E731  (sums, mean over 2 rows, / T = 2)
    close(loss, norm(PG) + 0.1 * norm(KL))


def test_default_policy_loss_dual_clip():
    algo = algo_of("grpo")
    b = _batch([0], [0], T=2)
    logp = torch.log(torch.tensor([[4.0, 2.0]])).requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0]])
    # r 4, A -1: max(4, 1.2) = 4 -> capped at 3 (dual clip); r 2: 2 < 3 -> 2
    loss, metrics = algo.policy_loss(logp, b, adv, algo.Config(kl_coef=0.0, dual_clip=3.0))
    close(loss, (3.0 + 2.0) / 2)
    assert metrics["actor/clipfrac"] == pytest.approx(0.5)
    loss.backward()
    close(logp.grad, [[0.0, 1.0]])  # d(-A r)/d log r / 2 = 2 / 2


# ============================================================================ GSPO
def _spy_finish_loss(algo):
    seen = {}
    orig = algo.finish_loss

    def spy(pg_loss, ratio, clipped, *args, **kwargs):
        seen.update(pg_loss=pg_loss, ratio=ratio, clipped=clipped)
        return orig(pg_loss, ratio, clipped, *args, **kwargs)

    algo.finish_loss = spy
    return seen


def test_gspo_sequence_ratio_and_sequence_clipping():
    algo = algo_of("gspo")
    seen = _spy_finish_loss(algo)
    cfg = algo.Config(clip_low=0.1, clip_high=0.1)
    # log ratios: row 0 [.3, .1, -.1] -> mean .1 -> s = e^.1 = 1.10517 > 1.1 (A>0: clipped)
    #             row 1 [.3, (pad 5.0)] -> s = e^.3 = 1.34986 (A<0: not clipped, r > 1 + clip)
    #             row 2 [-.2, -.4, -.3] -> mean -.3 -> s = .74082 (A<0: clipped, r < .9)
    #             row 3 [.05, -.05] -> s = 1 (inside)
    lr = torch.tensor([[0.3, 0.1, -0.1], [0.3, 5.0, 0.0], [-0.2, -0.4, -0.3], [0.05, -0.05, 0.0]])
    old = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    b = _batch([0, 0, 0, 0], [0, 1, 2, 3], T=3, lengths=[3, 1, 3, 2], old_logp=old)
    logp = (old + lr).requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0], [-1.0], [2.0]]) * b.response_mask
    loss, _ = algo.policy_loss(logp, b, adv, cfg)
    s = torch.tensor([math.exp(0.1), math.exp(0.3), math.exp(-0.3), 1.0])
    mask = b.response_mask.bool()
    close(seen["ratio"][mask], s.unsqueeze(-1).expand(4, 3)[mask], 1e-5)
    # whole sequences are clipped together (rows 0 and 2)
    assert seen["clipped"][mask].tolist() == [True] * 3 + [False] + [True] * 3 + [False] * 2
    loss.backward()
    assert torch.equal(logp.grad[0], torch.zeros(3)) and torch.equal(logp.grad[2], torch.zeros(3))
    assert (logp.grad[1, :1] != 0).all() and (logp.grad[3, :2] != 0).all()
    assert torch.equal(logp.grad[~mask], torch.zeros_like(logp.grad[~mask]))  # padding


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_gradient_equals_sequence_level_objective(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 5
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    rewards = torch.rand(B, generator=g).tolist()
    old = -torch.rand(B, T, generator=g) * 3
    b = _batch(rewards, [0, 0, 0, 1, 1, 1], T=T, lengths=lengths, old_logp=old)
    init = old + 0.05 * torch.randn(B, T, generator=g)
    algo = algo_of("gspo")
    cfg = algo.Config(clip_low=0.5, clip_high=0.5)  # nothing clipped
    adv = algo.compute_advantages(b, cfg)  # [B, T], one value per sequence
    logp = init.clone().requires_grad_(True)
    loss, metrics = algo.policy_loss(logp, b, adv, cfg)
    loss.backward()
    assert metrics["actor/clipfrac"] == 0.0
    # sequence level: J = mean_i(-A_i * s_i), s_i = exp(mean over real tokens of logp - old)
    logp2 = init.clone().requires_grad_(True)
    objective = 0
    for i, n in enumerate(lengths):
        s_i = torch.exp((logp2[i, :n] - old[i, :n]).mean())
        objective = objective - adv[i, 0] * s_i
    objective = objective / B
    objective.backward()
    close(loss.detach(), objective.detach(), 1e-6)
    close(logp.grad, logp2.grad, 1e-6)


# ============================================================================ every algorithm
def _random_batch(seed, B=8, T=5, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[-1] = T
    old = (-torch.rand(B, T, generator=g) * 3).requires_grad_(requires_grad)
    ref = (-torch.rand(B, T, generator=g) * 3).requires_grad_(requires_grad)
    values = torch.randn(B, T, generator=g).requires_grad_(requires_grad)
    b = _batch(torch.rand(B, generator=g).round().tolist(), [0, 0, 0, 1, 1, 1, 2, 3][:B], T, lengths)
    return dataclasses.replace(b, old_logp=old, ref_logp=ref, values=values)


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_advantages_shape_finite_no_grad(name):
    algo = algo_of(name)
    cfg = algo.default_config()
    assert isinstance(cfg, algo.Config)
    for seed in range(3):
        b = _random_batch(seed, requires_grad=True)
        for c in (cfg, dataclasses.replace(cfg, kl_coef=0.05, kl_in_reward=True)):
            adv = algo.compute_advantages(b, c)
            assert adv.shape == b.response_mask.shape
            assert torch.isfinite(adv).all()
            assert not adv.requires_grad and adv.grad_fn is None
            assert torch.equal(adv * (1 - b.response_mask), torch.zeros_like(adv))  # padding


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_policy_loss_runs_and_has_metrics(name):
    algo = algo_of(name)
    cfg = dataclasses.replace(algo.default_config(), kl_coef=0.05, entropy_coef=0.01)
    b = _random_batch(0)
    adv = algo.compute_advantages(b, cfg)
    logp = (b.old_logp + 0.01).requires_grad_(True)
    loss, metrics = algo.policy_loss(logp, b, adv, cfg, entropy=torch.rand(b.old_logp.shape))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    for key in ("actor/pg_loss", "actor/clipfrac", "actor/approx_kl", "actor/kl_ref"):
        assert key in metrics and math.isfinite(metrics[key])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        {"dual_clip": 0.5},
        {"loss_agg": "bogus"},
        {"kl_estimator": "k9"},
        {"clip_low": 1.0},
        {"clip_high": -0.1},
        {"kl_coef": -1.0},
        {"entropy_coef": -0.1},
        {"loss_norm_tokens": -1},
        {"epochs": 0},
        {"mini_batches": 0},
    ],
)
def test_every_config_rejects_bad_values(name, bad):
    cls = ALGORITHMS.get(name).Config
    with pytest.raises(ConfigError):
        cls(**bad)
    with pytest.raises(ConfigError, match=f"algorithm={name}"):
        ALGORITHMS.make_config(name, bad)


@pytest.mark.parametrize(
    "bad", [{"lam": 2.0}, {"gamma": -0.1}, {"critic_lr": 0.0}, {"vf_coef": -1.0}, {"value_clip": -0.1}]
)
def test_ppo_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        ALGORITHMS.get("ppo").Config(**bad)


def test_configs_accept_good_values():
    assert ALGORITHMS.get("grpo").Config(dual_clip=3.0, loss_agg="seq-mean-token-sum-norm").dual_clip == 3.0
    assert ALGORITHMS.get("ppo").Config(lam=1.0, gamma=0.0).lam == 1.0
    with pytest.raises(ConfigError, match="Did you mean 'clip_low'"):
        ALGORITHMS.make_config("rloo", {"clip_lo": 0.1})
