"""Unit tests of the shared tensor ops (``coderlplus.ops.core``).

Three kinds of check for each op: small cases worked out by hand (in the comments), a
comparison with a slow, obviously-correct pure-Python loop on random inputs (random
right-padding, rows of length 0..T, random group ids with singletons), and properties
(gradients of the clipped surrogate, unbiasedness of the KL estimators, GAE identities,
micro-batch weights).
"""

from __future__ import annotations

import math

import pytest
import torch

from coderlplus.ops import (
    LOSS_AGG_MODES,
    aggregate_loss,
    clipped_policy_objective,
    clipped_value_loss,
    discounted_returns,
    explained_variance,
    gae,
    group_normalize,
    kl_penalty,
    leave_one_out,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    micro_batch_weight,
    token_level_rewards,
)

SEEDS = [0, 1, 2, 3]
TOL = 1e-6  # hand-computed cases
LOOP_TOL = 1e-5  # comparisons with the loop versions


def close(actual, expected, tol=TOL):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- random inputs
def rand_lengths(B, T, g):
    """Row lengths in 0..T, making sure 0 and T both occur."""
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[-1] = 0, T
    return lengths


def right_pad_mask(lengths, T, dtype=torch.float64):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=dtype)


def rand_inputs(seed, B=7, T=6, dtype=torch.float64):
    """(x [B, T] with garbage on padding, mask [B, T], lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = rand_lengths(B, T, g)
    mask = right_pad_mask(lengths, T, dtype)
    x = torch.randn(B, T, generator=g, dtype=dtype) * 2 + 0.5
    return x, mask, lengths


def rand_groups(B, g):
    """Group ids in random order, with at least one singleton group."""
    ids = torch.randint(0, max(1, B // 3), (B,), generator=g)
    ids[-1] = 1000  # a singleton
    return ids


def real(x, lengths):
    """The real (unpadded) entries of ``x`` as a list of Python lists, one per row."""
    return [[float(v) for v in x[i, :n]] for i, n in enumerate(lengths)]


# ---------------------------------------------------------------------------- loop references
def loop_mean(vals):
    return sum(vals) / len(vals) if vals else 0.0


def loop_var(vals):
    if len(vals) < 2:
        return 0.0
    m = loop_mean(vals)
    return sum((v - m) ** 2 for v in vals) / (len(vals) - 1)


def loop_group_normalize(scores, groups, norm_by_std=True, eps=1e-6):
    out = []
    for s, gid in zip(scores, groups):
        members = [r for r, h in zip(scores, groups) if h == gid]
        if len(members) == 1:
            out.append(0.0)
            continue
        m = loop_mean(members)
        out.append((s - m) / (math.sqrt(loop_var(members)) + eps) if norm_by_std else s - m)
    return out


def loop_leave_one_out(scores, groups):
    out = []
    for i, (s, gid) in enumerate(zip(scores, groups)):
        others = [r for j, (r, h) in enumerate(zip(scores, groups)) if h == gid and j != i]
        out.append(s - loop_mean(others) if others else 0.0)
    return out


def loop_token_rewards(scores, lengths, T, kl=None, kl_coef=0.0):
    out = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        for t in range(n):
            if kl is not None:
                out[i][t] -= kl_coef * kl[i][t]
        if n > 0:
            out[i][n - 1] += scores[i]
    return out


def loop_returns(rewards, lengths, T, gamma):
    out = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        for t in range(n):
            out[i][t] = sum(gamma ** (s - t) * rewards[i][s] for s in range(t, n))
    return out


def loop_gae(rewards, values, lengths, T, gamma, lam):
    adv = [[0.0] * T for _ in lengths]
    ret = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        v = [*values[i][:n], 0.0]  # V after the last real token is 0
        deltas = [rewards[i][t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[i][t] = sum((gamma * lam) ** (s - t) * deltas[s] for s in range(t, n))
            ret[i][t] = adv[i][t] + v[t]
    return adv, ret


def loop_clipped_objective(log_ratio, adv, clip_low, clip_high, dual_clip=0.0):
    r = math.exp(log_ratio)
    surr1 = -adv * r
    surr2 = -adv * min(max(r, 1 - clip_low), 1 + clip_high)
    loss = max(surr1, surr2)
    clipped = surr2 > surr1
    if dual_clip and adv < 0 and loss > -adv * dual_clip:
        loss, clipped = -adv * dual_clip, True
    return loss, r, clipped


def loop_aggregate(loss_rows, T, mode, norm_tokens=None):
    """``loss_rows``: the real entries of each row."""
    if mode == "token-mean":
        flat = [v for row in loss_rows for v in row]
        return loop_mean(flat)
    if mode == "seq-mean-token-mean":
        return loop_mean([loop_mean(row) for row in loss_rows])
    if mode == "seq-mean-token-sum":
        return loop_mean([sum(row) for row in loss_rows])
    if mode == "seq-mean-token-sum-norm":
        return loop_mean([sum(row) for row in loss_rows]) / (norm_tokens or T)
    raise AssertionError(mode)


# ============================================================================ masked reductions
def test_masked_reductions_hand_computed():
    # real entries 1, 2 (row 0) and 4 (row 1); the padding holds garbage, even inf
    x = torch.tensor([[1.0, 2.0, math.inf], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    close(masked_sum(x, mask), 7.0)  # 1 + 2 + 4
    close(masked_sum(x, mask, dim=-1), [3.0, 4.0])
    close(masked_sum(x, mask, dim=0), [5.0, 2.0, 0.0])
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=-1), [1.5, 4.0])
    close(masked_mean(x, mask, dim=0), [2.5, 2.0, 0.0])  # an all-padding column: 0
    # mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (3 - 1) -> 7/3
    close(masked_var(x, mask), 7 / 3)
    # whiten: (x - 7/3) / sqrt(7/3 + 1e-8); padding -> 0
    s = math.sqrt(7 / 3 + 1e-8)
    close(
        masked_whiten(x, mask),
        [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]],
    )


def test_masked_reductions_degenerate_masks():
    x = torch.tensor([[3.0, 5.0], [7.0, 9.0]], dtype=torch.float64)
    none = torch.zeros(2, 2, dtype=torch.float64)
    one = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    close(masked_sum(x, none), 0.0)
    close(masked_mean(x, none), 0.0)  # no entries: 0, not nan
    close(masked_mean(x, none, dim=-1), [0.0, 0.0])
    close(masked_var(x, none), 0.0)
    close(masked_var(x, one), 0.0)  # a single entry: 0
    close(masked_whiten(x, none), torch.zeros(2, 2))
    close(masked_whiten(x, one), torch.zeros(2, 2))  # (5 - 5) * rsqrt(eps) = 0
    assert torch.isfinite(masked_whiten(x, one)).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_reductions_match_loop(seed):
    x, mask, lengths = rand_inputs(seed)
    rows = real(x, lengths)
    flat = [v for row in rows for v in row]
    close(masked_sum(x, mask), sum(flat), LOOP_TOL)
    close(masked_sum(x, mask, dim=-1), [sum(r) for r in rows], LOOP_TOL)
    close(masked_mean(x, mask), loop_mean(flat), LOOP_TOL)
    close(masked_mean(x, mask, dim=-1), [loop_mean(r) for r in rows], LOOP_TOL)
    close(masked_var(x, mask), loop_var(flat), LOOP_TOL)
    m, sd = loop_mean(flat), math.sqrt(loop_var(flat) + 1e-8)
    expected = [[(v - m) / sd for v in r] + [0.0] * (x.shape[1] - len(r)) for r in rows]
    w = masked_whiten(x, mask)
    close(w, expected, LOOP_TOL)
    # whitened: mean 0, unbiased variance 1 over the real tokens
    close(masked_mean(w, mask), 0.0, LOOP_TOL)
    close(masked_var(w, mask), 1.0, LOOP_TOL)


# ============================================================================ group baselines
def test_group_normalize_hand_computed():
    # ids in random order: group 10 = {3, 1, 2}, group 4 = {5, 7}, group 9 = {9} (singleton)
    scores = torch.tensor([3.0, 5.0, 1.0, 9.0, 2.0, 7.0])
    groups = torch.tensor([10, 4, 10, 9, 10, 4])
    # group 10: mean 2, deviations 1, -1, 0, unbiased var (1 + 1 + 0) / 2 = 1 -> std 1
    # group 4: mean 6, deviations -1, 1, unbiased var 2 / 1 = 2 -> std sqrt(2)
    e = 1e-6
    a, b = 1 / (1 + e), 1 / (math.sqrt(2) + e)
    close(group_normalize(scores, groups), [a, -b, -a, 0.0, 0.0, b])
    close(group_normalize(scores, groups, norm_by_std=False), [1.0, -1.0, -1.0, 0.0, 0.0, 1.0])
    a, b = 1 / (1 + 0.5), 1 / (math.sqrt(2) + 0.5)  # eps = 0.5
    close(group_normalize(scores, groups, eps=0.5), [a, -b, -a, 0.0, 0.0, b])


def test_group_normalize_all_equal_group_is_exactly_zero():
    adv = group_normalize(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0]), torch.tensor([2, 2, 2, 3, 3]))
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.isfinite(adv).all()


def test_leave_one_out_hand_computed():
    scores = torch.tensor([3.0, 5.0, 1.0, 9.0, 2.0, 7.0])
    groups = torch.tensor([10, 4, 10, 9, 10, 4])
    # group 10: 3 - (1 + 2)/2 = 1.5; 1 - (3 + 2)/2 = -1.5; 2 - (3 + 1)/2 = 0
    # group 4: 5 - 7 = -2; 7 - 5 = 2; singleton group 9: 0
    close(leave_one_out(scores, groups), [1.5, -2.0, -1.5, 0.0, 0.0, 2.0])
    # all-equal group: exactly zero
    assert torch.equal(leave_one_out(torch.tensor([0.5] * 4), torch.zeros(4)), torch.zeros(4))


@pytest.mark.parametrize("seed", SEEDS)
def test_group_baselines_match_loop(seed):
    g = torch.Generator().manual_seed(seed)
    B = 11
    scores = torch.randn(B, generator=g)
    groups = rand_groups(B, g)
    s, gl = scores.tolist(), groups.tolist()
    close(group_normalize(scores, groups), loop_group_normalize(s, gl), LOOP_TOL)
    close(
        group_normalize(scores, groups, norm_by_std=False),
        loop_group_normalize(s, gl, norm_by_std=False),
        LOOP_TOL,
    )
    loo = leave_one_out(scores, groups)
    close(loo, loop_leave_one_out(s, gl), LOOP_TOL)
    # identity: leave-one-out = G / (G - 1) * (r - mean_g) (0 for singletons)
    sizes = torch.tensor([gl.count(i) for i in gl], dtype=torch.float32)
    centred = group_normalize(scores, groups, norm_by_std=False)
    close(loo, centred * sizes / (sizes - 1).clamp(min=1), LOOP_TOL)


# ============================================================================ KL estimators
def test_kl_estimators_hand_values():
    logp = torch.tensor([-0.5, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    # log_ratio = ref - logp = [-0.5, 1.0]
    close(kl_penalty(logp, ref, "k1"), [0.5, -1.0])  # -log_ratio
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.5])  # log_ratio^2 / 2
    # exp(lr) - 1 - lr: e^-0.5 - 1 + 0.5 = 0.10653066; e - 1 - 1 = 0.71828183
    close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2])
    # k3 is clamped to [-10, 10]
    big = kl_penalty(torch.tensor([0.0, 0.0]), torch.tensor([30.0, -30.0]), "k3")
    close(big, [10.0, 10.0])


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5000, generator=g, dtype=torch.float64) * 8
    ref = -torch.rand(5000, generator=g, dtype=torch.float64) * 8
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    near = logp + 1e-3 * torch.randn(5000, generator=g, dtype=torch.float64)
    assert (kl_penalty(logp, near, "k3") >= 0).all()
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp, est), torch.zeros_like(logp))


def test_k3_nonnegative_float32_near_reference():
    """The docstring promises a non-negative k3. In float32, ``exp(x) - 1 - x`` cancels
    catastrophically for small ``x`` (the policy close to the reference, the usual case) and
    can come out at about -6e-8; ``expm1(x) - x`` would not."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(20000, generator=g) * 5
    ref = logp + 1e-3 * torch.randn(20000, generator=g)
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all(), f"{int((k3 < 0).sum())} negative k3 values, min {k3.min().item():.3g}"


def test_kl_estimators_unbiased_on_categorical():
    """Mean of k1 and k3 over tokens sampled from p approximates KL(p || q)."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64)
    exact = float((p * (p.log() - q.log())).sum())
    g = torch.Generator().manual_seed(1234)
    n = 200_000
    tokens = torch.multinomial(p, n, replacement=True, generator=g)
    logp, ref = p.log()[tokens], q.log()[tokens]
    for est in ("k1", "k3"):
        samples = kl_penalty(logp, ref, est)
        se = float(samples.std()) / math.sqrt(n)
        err = abs(float(samples.mean()) - exact)
        assert err < 5 * se and err < 0.01, (est, float(samples.mean()), exact, se)
    # k3's variance is lower than k1's here (close distributions), and k3 >= 0 per sample
    assert kl_penalty(logp, ref, "k3").var() < kl_penalty(logp, ref, "k1").var()
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "kl")


# ============================================================================ token rewards, returns
def test_token_level_rewards_hand_computed():
    scores = torch.tensor([2.0, -1.0, 5.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # the score on the last real token; an empty row gets nothing
    close(token_level_rewards(scores, mask), [[0, 0, 2.0], [-1.0, 0, 0], [0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    # minus 0.5 * kl on real tokens: row 0: -0.05, -0.1, 2 - 0.15; row 1: -1 - 0.2
    close(
        token_level_rewards(scores, mask, kl, 0.5),
        [[-0.05, -0.1, 1.85], [-1.2, 0, 0], [0, 0, 0]],
    )
    close(token_level_rewards(scores, mask, kl, 0.0), token_level_rewards(scores, mask))


def test_discounted_returns_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    # gamma 0.5: row 0: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75
    #            row 1 (the 6 is padding): G1 = 5, G0 = 4 + 2.5 = 6.5, G2 = 0
    close(discounted_returns(rewards, mask, 0.5), [[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])
    close(discounted_returns(rewards, mask, 1.0), [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_token_rewards_and_returns_match_loop(seed):
    x, mask, lengths = rand_inputs(seed)
    B, T = x.shape
    g = torch.Generator().manual_seed(seed + 100)
    scores = torch.randn(B, generator=g)
    kl = torch.rand(B, T, generator=g)
    expected = loop_token_rewards(scores.tolist(), lengths, T, kl.tolist(), 0.3)
    close(token_level_rewards(scores, mask.float(), kl, 0.3), expected, LOOP_TOL)
    close(
        token_level_rewards(scores, mask.float()), loop_token_rewards(scores.tolist(), lengths, T), LOOP_TOL
    )
    for gamma in (1.0, 0.9, 0.0):
        close(discounted_returns(x, mask, gamma), loop_returns(x.tolist(), lengths, T, gamma), LOOP_TOL)


# ============================================================================ GAE
def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.5, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72)
    # row 0: d2 = 1 - 0.7 = 0.3; d1 = 0.9 * 0.7 - 0.6 = 0.03; d0 = 0.9 * 0.6 - 0.5 = 0.04
    #        A2 = 0.3; A1 = 0.03 + 0.72 * 0.3 = 0.246; A0 = 0.04 + 0.72 * 0.246 = 0.21712
    # row 1: d1 = 2 - 1.5 = 0.5; d0 = 0.9 * 1.5 - 1 = 0.35
    #        A1 = 0.5; A0 = 0.35 + 0.72 * 0.5 = 0.71; padding 0
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.21712, 0.246, 0.3], [0.71, 0.5, 0.0]])
    # returns = A + V on real tokens
    close(ret, [[0.71712, 0.846, 1.0], [1.71, 2.0, 0.0]])


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop_and_identities(seed):
    rewards, mask, lengths = rand_inputs(seed)
    B, T = rewards.shape
    g = torch.Generator().manual_seed(seed + 7)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage on padding too
    rl, vl = rewards.tolist(), values.tolist()
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        e_adv, e_ret = loop_gae(rl, vl, lengths, T, gamma, lam)
        close(adv, e_adv, LOOP_TOL)
        close(ret, e_ret, LOOP_TOL)
        # returns == adv + values on real tokens; padding zeros in both
        close(ret, (adv + values) * mask, LOOP_TOL)
        assert torch.equal(adv * (1 - mask), torch.zeros_like(adv))
        assert torch.equal(ret * (1 - mask), torch.zeros_like(ret))
    # lam = 1: Monte-Carlo returns-to-go minus values
    for gamma in (1.0, 0.9):
        adv, _ = gae(rewards, values, mask, gamma, 1.0)
        close(adv, (discounted_returns(rewards, mask, gamma) - values) * mask, LOOP_TOL)
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t (V after the last real token = 0)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    v = values * mask
    v_next = torch.cat([v[:, 1:], torch.zeros(B, 1, dtype=v.dtype)], dim=1) * mask
    close(adv, (rewards + 0.9 * v_next - v) * mask, LOOP_TOL)


# ============================================================================ clipped surrogate
def test_clipped_policy_objective_hand_computed_dual_clip():
    r = torch.tensor([[3.5, 1.5, 0.5, 0.7, 1.1, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -2.0, -1.0, 2.0, 0.5, 1.0]], dtype=torch.float64)
    # clip_low 0.2 (r >= 0.8), clip_high 0.28 (r <= 1.28):
    # r=3.5, A=-1: max(3.5, 1.28) = 3.5        (not clipped by the ratio clip)
    # r=1.5, A=-2: max(3.0, 2.56) = 3.0        (not clipped)
    # r=0.5, A=-1: max(0.5, 0.8) = 0.8         (clipped)
    # r=0.7, A=2:  max(-1.4, -1.6) = -1.4      (not clipped)
    # r=1.1, A=.5: max(-0.55, -0.55) = -0.55   (inside the range)
    # r=2.0, A=1:  max(-2.0, -1.28) = -1.28    (clipped)
    loss, ratio, clipped = clipped_policy_objective(r.log(), adv, 0.2, 0.28)
    close(loss, [[3.5, 3.0, 0.8, -1.4, -0.55, -1.28]])
    close(ratio, r)
    assert clipped.tolist() == [[False, False, True, False, False, True]]
    # dual clip c = 3 caps negative-advantage losses at -A * c:
    # r=3.5, A=-1: min(3.5, 3) = 3 (clipped); r=1.5, A=-2: 3.0 < cap 6 -> unchanged
    loss, _, clipped = clipped_policy_objective(r.log(), adv, 0.2, 0.28, dual_clip=3.0)
    close(loss, [[3.0, 3.0, 0.8, -1.4, -0.55, -1.28]])
    assert clipped.tolist() == [[True, False, True, False, False, True]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dual_clip", [0.0, 2.5])
def test_clipped_policy_objective_matches_loop(seed, dual_clip):
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(6, 8, generator=g, dtype=torch.float64)
    loss, ratio, clipped = clipped_policy_objective(log_ratio, adv, 0.2, 0.28, dual_clip)
    ref = [
        [loop_clipped_objective(lr, a, 0.2, 0.28, dual_clip) for lr, a in zip(lrow, arow)]
        for lrow, arow in zip(log_ratio.tolist(), adv.tolist())
    ]
    close(loss, [[x[0] for x in row] for row in ref], LOOP_TOL)
    close(ratio, [[x[1] for x in row] for row in ref], LOOP_TOL)
    assert clipped.tolist() == [[x[2] for x in row] for row in ref]


# ratios well away from the boundaries 0.8, 1.28 and the dual-clip constant 3
GRID_RATIOS = [0.3, 0.6, 0.9, 1.0, 1.1, 1.5, 2.0, 3.5, 5.0]
GRID_ADVS = [-2.0, -0.5, 0.5, 1.5]


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_clipped_policy_objective_gradient_zero_exactly_where_clipped(dual_clip):
    clip_low, clip_high = 0.2, 0.28
    pairs = [(r, a) for r in GRID_RATIOS for a in GRID_ADVS]
    r = torch.tensor([[p[0] for p in pairs]], dtype=torch.float64)
    adv = torch.tensor([[p[1] for p in pairs]], dtype=torch.float64)
    log_ratio = r.log().requires_grad_(True)
    loss, _, clipped = clipped_policy_objective(log_ratio, adv, clip_low, clip_high, dual_clip)
    loss.sum().backward()
    expected_clipped = ((adv > 0) & (r > 1 + clip_high)) | ((adv < 0) & (r < 1 - clip_low))
    if dual_clip:
        expected_clipped |= (adv < 0) & (r > dual_clip)
    assert torch.equal(clipped, expected_clipped)
    grad = log_ratio.grad
    assert torch.equal(grad[expected_clipped], torch.zeros_like(grad[expected_clipped]))
    assert (grad[~expected_clipped] != 0).all()
    # unclipped: d(-A r)/d log r = -A r
    close(grad[~expected_clipped], (-adv * r)[~expected_clipped])


@pytest.mark.parametrize("seed", SEEDS)
def test_clipped_policy_objective_gradient_random(seed):
    g = torch.Generator().manual_seed(seed)
    clip_low, clip_high, c = 0.2, 0.28, 3.0
    r = torch.rand(5, 40, generator=g, dtype=torch.float64) * 4.5 + 0.2
    # move ratios within 0.02 of a boundary out of the way
    for b in (1 - clip_low, 1 + clip_high, c):
        r = torch.where((r - b).abs() < 0.02, r + 0.05, r)
    adv = torch.randn(5, 40, generator=g, dtype=torch.float64)
    log_ratio = r.log().requires_grad_(True)
    loss, _, clipped = clipped_policy_objective(log_ratio, adv, clip_low, clip_high, c)
    loss.sum().backward()
    expected = ((adv > 0) & (r > 1 + clip_high)) | ((adv < 0) & ((r < 1 - clip_low) | (r > c)))
    assert expected.any() and (~expected).any()
    assert torch.equal(clipped, expected)
    assert (log_ratio.grad[expected] == 0).all()
    assert (log_ratio.grad[~expected] != 0).all()


# ============================================================================ value loss
def test_clipped_value_loss_hand_computed():
    values = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.9, 0.5]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    # clip 0.2:
    # V=1, old .5: V_clip = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 0.5 * 1.69 = 0.845, clipped
    # V=1, old .9: V_clip = 1.0 (inside); 0.5 * 1 = 0.5, not clipped
    # V=0, old .5: V_clip = 0.3; (0-1)^2 = 1, (0.3-1)^2 = 0.49 -> 0.5, not clipped
    loss, clipped = clipped_value_loss(values, old, returns, 0.2)
    close(loss, [[0.845, 0.5, 0.5]])
    assert clipped.tolist() == [[True, False, False]]
    # clip 0: plain 0.5 * (V - R)^2
    loss, clipped = clipped_value_loss(values, old, returns, 0.0)
    close(loss, [[0.5, 0.5, 0.5]])
    assert not clipped.any()


@pytest.mark.parametrize("seed", SEEDS)
def test_clipped_value_loss_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    v, old, ret = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    loss, clipped = clipped_value_loss(v, old, ret, 0.3)
    exp_loss, exp_clip = [], []
    for vi, oi, ri in zip(v.flatten().tolist(), old.flatten().tolist(), ret.flatten().tolist()):
        vc = oi + min(max(vi - oi, -0.3), 0.3)
        a, b = (vi - ri) ** 2, (vc - ri) ** 2
        exp_loss.append(0.5 * max(a, b))
        exp_clip.append(b > a)
    close(loss.flatten(), exp_loss, LOOP_TOL)
    assert clipped.flatten().tolist() == exp_clip


# ============================================================================ loss aggregation
def test_aggregate_loss_hand_computed():
    loss = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1.0, 1.0, 0, 0], [1.0, 1.0, 1.0, 1.0], [1.0, 0, 0, 0]], dtype=torch.float64)
    # real: row 0 = 1, 2; row 1 = 5, 6, 7, 8; row 2 = 9 -> 7 tokens summing to 38
    close(aggregate_loss(loss, mask, "token-mean"), 38 / 7)
    close(aggregate_loss(loss, mask), 38 / 7)  # the default
    # per-row means 1.5, 6.5, 9 -> 17 / 3
    close(aggregate_loss(loss, mask, "seq-mean-token-mean"), 17 / 3)
    # per-row sums 3, 26, 9 -> 38 / 3
    close(aggregate_loss(loss, mask, "seq-mean-token-sum"), 38 / 3)
    # Dr.GRPO: (38 / 3) / T with T = 4; with norm_tokens = 8: (38 / 3) / 8
    close(aggregate_loss(loss, mask, "seq-mean-token-sum-norm"), 38 / 12)
    close(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_tokens=8), 38 / 24)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(loss, mask, "bogus")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("mode", "norm_tokens"), [*((m, None) for m in LOSS_AGG_MODES), ("seq-mean-token-sum-norm", 11)]
)
def test_aggregate_loss_matches_loop(seed, mode, norm_tokens):
    x, mask, lengths = rand_inputs(seed)
    expected = loop_aggregate(real(x, lengths), x.shape[1], mode, norm_tokens)
    close(aggregate_loss(x, mask, mode, norm_tokens), expected, LOOP_TOL)


# ============================================================================ micro-batches
def test_micro_batch_weight_hand_computed():
    full = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    micro = full[:2]  # 4 of the batch's 6 tokens, 2 of its 4 sequences
    assert micro_batch_weight(micro, full, "token-mean") == pytest.approx(4 / 6)
    for mode in LOSS_AGG_MODES[1:]:
        assert micro_batch_weight(micro, full, mode) == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("mode", "norm_tokens"), [*((m, None) for m in LOSS_AGG_MODES), ("seq-mean-token-sum-norm", 16)]
)
def test_micro_batches_sum_to_full_batch_all_modes(seed, mode, norm_tokens):
    x, mask, _ = rand_inputs(seed, B=8, T=6)
    full = aggregate_loss(x, mask, mode, norm_tokens)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(8, generator=g)
    total = torch.zeros((), dtype=x.dtype)
    for idx in order.split([1, 3, 2, 2]):  # uneven micro-batches, full width T each
        w = micro_batch_weight(mask[idx], mask, mode)
        total = total + w * aggregate_loss(x[idx], mask[idx], mode, norm_tokens)
    close(total, full, LOOP_TOL)


# ============================================================================ explained variance
def test_explained_variance_hand_computed():
    ret = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # R = 1, 2, 3, 4
    close(explained_variance(ret, ret, mask), 1.0)  # perfect critic
    # a constant critic: Var(R - c) = Var(R) -> 0
    close(explained_variance(torch.full_like(ret, 2.5), ret, mask), 0.0)
    # V = 1, 2, 3, 5: R - V = 0, 0, 0, -1: mean -0.25, var (3 * 0.0625 + 0.5625) / 3 = 0.25;
    # Var(R) = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3 -> 1 - 0.25 / (5 / 3) = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, -7.0, 8.0]], dtype=torch.float64)
    close(explained_variance(values, ret, mask), 0.85)
    # a critic worse than a constant: negative
    assert explained_variance(-ret, ret, mask) < 0
    # returns that do not vary: nan
    assert torch.isnan(explained_variance(ret, torch.ones_like(ret), mask))


@pytest.mark.parametrize("seed", SEEDS)
def test_explained_variance_matches_loop(seed):
    ret, mask, lengths = rand_inputs(seed)
    values = ret + 0.5 * torch.randn(
        ret.shape, generator=torch.Generator().manual_seed(seed), dtype=ret.dtype
    )
    r = [v for row in real(ret, lengths) for v in row]
    v = [v for row in real(values, lengths) for v in row]
    expected = 1 - loop_var([a - b for a, b in zip(r, v)]) / loop_var(r)
    close(explained_variance(values, ret, mask), expected, LOOP_TOL)
