"""Tests for megatron_qrm.rl.{kl,advantages,losses} against hand-derived numbers and plain-Python loops.

Expected values are either written out by hand (the arithmetic is in the comments) or computed by
explicit per-token Python loops with ``math``; the function under test is never used to produce its own
expectation. Padding positions are filled with NaN / inf wherever the API allows it, to prove they never
contribute. The vocab-parallel KL / entropy run in 2 processes (``torch.multiprocessing.spawn`` + gloo on
localhost), each rank holding half of the vocabulary.
"""

from __future__ import annotations

import math
import os
import random
import statistics

import pytest
import torch
import torch.multiprocessing as mp

from megatron_qrm.rl.advantages import (
    AdvantageOutput,
    add_kl_penalty,
    dpo_token_rewards,
    gae_advantages,
    last_action_mask,
    masked_mean_std,
    normalize_by_std,
    orm_token_rewards,
    qrm_advantages,
    qrm_reference_advantages,
    reinforce_returns_orm,
    reinforce_returns_qrm,
)
from megatron_qrm.rl.kl import (
    entropy_from_logits,
    full_kl,
    kl_abs,
    kl_k1,
    kl_k3,
    kl_penalty,
    vocab_parallel_entropy,
    vocab_parallel_full_kl,
)
from megatron_qrm.rl.losses import (
    entropy_bonus,
    masked_sum_count,
    ppo_policy_loss,
    reinforce_loss,
    value_loss,
)

NAN = float("nan")
INF = float("inf")
D = torch.float64  # hand numbers are compared in float64 where the API keeps float64


def t(rows, dtype=D) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    exp = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, exp.to(actual.dtype), atol=atol, rtol=0)


# The running example: 8 response tokens {2,4,4,4,5,5,7,9} (mean 5, population std exactly 2),
# split over two right-padded rows; padding is NaN / inf.
#   row 0: actions at columns 0..2,   Z = 2 4 4       (row mean 10/3 — per-row standardisation would differ)
#   row 1: actions at columns 0..4,   Z = 4 5 5 7 9
MASK = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
Z = t([[2, 4, 4, NAN, INF], [4, 5, 5, 7, 9]])
Z_STD = [[-1.5, -0.5, -0.5, 0, 0], [-0.5, 0, 0, 1, 2]]  # (Z - 5) / 2


# --------------------------------------------------------------------------------------------------
# plain-Python references
# --------------------------------------------------------------------------------------------------


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def ref_masked_values(x, mask) -> list[float]:
    return [v for xr, mr in zip(rows(x), rows(mask)) for v, m in zip(xr, mr) if m]


def ref_gae(r, v, mask, gamma, lam):
    """Textbook GAE per row with explicit next-state lookup; terminal when the next column is no action."""
    adv, ret = [], []
    for rr, vr, mr in zip(rows(r), rows(v), rows(mask)):
        n = len(rr)
        a_row = [0.0] * n
        for i in reversed(range(n)):
            if not mr[i]:
                continue
            nxt = i + 1 < n and mr[i + 1]
            next_v = vr[i + 1] if nxt else 0.0
            next_a = a_row[i + 1] if nxt else 0.0
            a_row[i] = rr[i] + gamma * next_v - vr[i] + gamma * lam * next_a
        adv.append(a_row)
        ret.append([a + vv if m else 0.0 for a, vv, m in zip(a_row, vr, mr)])
    return adv, ret


def ref_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """sum_v p log(p/q) with explicit softmaxes."""
    zp = sum(math.exp(x) for x in p_logits)
    zq = sum(math.exp(x) for x in q_logits)
    total = 0.0
    for a, b in zip(p_logits, q_logits):
        p, q = math.exp(a) / zp, math.exp(b) / zq
        if p > 0:
            total += p * math.log(p / q)
    return total


def ref_entropy(logits: list[float]) -> float:
    z = sum(math.exp(x) for x in logits)
    return -sum((math.exp(x) / z) * math.log(math.exp(x) / z) for x in logits)


def random_batch(n: int, t_: int, seed: int):
    """Random right-padded batch with a prompt region, a full-window row and an empty row."""
    rng = random.Random(seed)
    mask = torch.zeros(n, t_, dtype=D)
    for i in range(n):
        kind = i % 4
        if kind == 0:  # response fills the window to the last column
            start, end = rng.randrange(0, t_ // 2), t_
        elif kind == 1:  # empty row (prompt filled the window)
            continue
        else:
            start = rng.randrange(0, t_ // 2)
            end = rng.randrange(start + 1, t_)
        mask[i, start:end] = 1
    g = torch.Generator().manual_seed(seed)
    def rnd():
        x = torch.randn(n, t_, generator=g, dtype=D)
        return torch.where(mask.bool(), x, torch.full_like(x, NAN))  # garbage on padding
    return mask, rnd


# --------------------------------------------------------------------------------------------------
# statistics and normalisation
# --------------------------------------------------------------------------------------------------


def test_masked_mean_std_is_batch_level_population_std_and_ignores_padding():
    mean, std = masked_mean_std(Z, MASK)
    close(mean, 5.0)
    close(std, 2.0)  # population: sqrt(32 / 8); the sample std would be sqrt(32 / 7)
    # random: against statistics.pstdev over all masked tokens of all rows
    mask, rnd = random_batch(7, 9, seed=1)
    x = rnd()
    vals = ref_masked_values(x, mask)
    m, s = masked_mean_std(x, mask)
    close(m, statistics.fmean(vals), atol=1e-12)
    close(s, statistics.pstdev(vals), atol=1e-12)
    # empty mask: zeros, not NaN
    m0, s0 = masked_mean_std(x, torch.zeros_like(mask))
    assert m0.item() == 0.0 and s0.item() == 0.0


def test_masked_mean_std_large_offset_float32():
    # two-pass variance: E[x^2]-E[x]^2 in float32 would return ~0 or garbage here
    x = torch.tensor([[1e4 + 1.0, 1e4 - 1.0, 1e4 + 1.0, 1e4 - 1.0]], dtype=torch.float32)
    _, s = masked_mean_std(x, torch.ones_like(x))
    assert abs(s.item() - 1.0) < 1e-4


def test_normalize_by_std_and_zero_std_guard():
    out = normalize_by_std(Z, MASK)  # Z / 2, no centring
    close(out, [[1, 2, 2, 0, 0], [2, 2.5, 2.5, 3.5, 4.5]])
    close(normalize_by_std(Z, MASK, center=True), Z_STD)
    const = t([[3, 3, NAN], [3, 3, 3]])
    cmask = t([[1, 1, 0], [1, 1, 1]])
    for center in (False, True):
        o = normalize_by_std(const, cmask, center=center)
        assert torch.isfinite(o).all()
        close(o, torch.zeros(2, 3, dtype=D))


def test_last_action_mask():
    mask = t([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(last_action_mask(mask), expected)


# --------------------------------------------------------------------------------------------------
# PPO with Q-RM: the paper's Algorithm 1 and the reference variant
# --------------------------------------------------------------------------------------------------


def test_qrm_advantages_hand_numbers():
    values = t([[0.5, -1.0, 2.0, NAN, NAN], [0.0, 1.0, 0.0, -0.5, 3.0]])
    kl = t([[10.0, 0.0, 5.0, INF, NAN], [0.0, 100.0, 0.0, 0.0, 1.0]])
    out = qrm_advantages(Z, values, kl, MASK, kl_coef=0.01)
    assert isinstance(out, AdvantageOutput)
    # A = Z_std - 0.01 * KL - V
    expected_adv = [
        [-1.5 - 0.1 - 0.5, -0.5 - 0.0 + 1.0, -0.5 - 0.05 - 2.0, 0, 0],
        [-0.5 - 0.0 - 0.0, 0.0 - 1.0 - 1.0, 0.0, 1.0 + 0.5, 2.0 - 0.01 - 3.0],
    ]
    close(out.advantages, expected_adv)
    close(out.returns, Z_STD)  # critic target Z_std, without the KL term
    close(out.reward_mean, 5.0)
    close(out.reward_std, 2.0)
    # per-sequence standardisation would give row 0 = (Z - 10/3) / std(row 0) != Z_STD
    per_row0 = [(z - 10 / 3) / statistics.pstdev([2, 4, 4]) for z in (2, 4, 4)]
    assert max(abs(a - b) for a, b in zip(per_row0, Z_STD[0][:3])) > 1.0  # e.g. 0.707 vs -0.5


def test_qrm_advantages_random_vs_loop():
    mask, rnd = random_batch(9, 11, seed=2)
    z, v, kl = rnd(), rnd(), rnd().abs()
    out = qrm_advantages(z, v, kl, mask, kl_coef=0.3)
    vals = ref_masked_values(z, mask)
    mu, sd = statistics.fmean(vals), statistics.pstdev(vals)
    for i, (zr, vr, kr, mr) in enumerate(zip(rows(z), rows(v), rows(kl), rows(mask))):
        for j, m in enumerate(mr):
            zs = (zr[j] - mu) / sd if m else 0.0
            a = zs - 0.3 * kr[j] - vr[j] if m else 0.0
            assert abs(out.advantages[i, j].item() - a) < 1e-10
            assert abs(out.returns[i, j].item() - zs) < 1e-10


def test_qrm_reference_advantages_hand_numbers():
    # sigma_Z = 2 (running example); values: tokens {1,3,1,3,1,3,1,3} -> mean 2, population std 1
    values = t([[1, 3, 1, NAN, NAN], [3, 1, 3, 1, 3]])
    logp_old = t([[-1.0, -2.0, -0.5, NAN, 0], [-1.0, -1.0, -1.0, -1.0, -3.0]])
    logp_ref = t([[-2.0, -1.0, -0.5, -INF, 0], [-1.0, -1.5, -1.0, -1.0, -1.0]])
    out = qrm_reference_advantages(Z, values, logp_old, logp_ref, MASK, kl_coef=0.1, value_coef=0.01)
    # r = Z / 2 - 0.1 * |logp_old - logp_ref|
    r = [[1 - 0.1, 2 - 0.1, 2 - 0.0, 0, 0], [2 - 0.0, 2.5 - 0.05, 2.5, 3.5, 4.5 - 0.2]]
    # A = r - 0.01 * V / 1   (values are divided by their std, not centred)
    vv = [[1, 3, 1, 0, 0], [3, 1, 3, 1, 3]]
    expected = [[r[i][j] - 0.01 * vv[i][j] for j in range(5)] for i in range(2)]
    close(out.advantages, expected)
    close(out.returns, r)  # critic target includes the KL penalty (D4)
    close(out.reward_std, 2.0)
    close(out.value_std, 1.0)
    close(out.reward_mean, 0.0)


def test_zero_std_guard_everywhere():
    z = t([[0.7, 0.7, NAN], [0.7, 0.7, 0.7]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    v = t([[4.0, 4.0, NAN], [4.0, 4.0, 4.0]])  # constant values too: sigma_V = 0
    kl = t([[1.0, 0.0, NAN], [0.0, 0.0, 2.0]])
    out = qrm_advantages(z, v, kl, mask, kl_coef=0.5)
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.returns).all()
    close(out.returns, torch.zeros(2, 3, dtype=D))
    close(out.advantages, [[-0.5 - 4.0, -4.0, 0], [-4.0, -4.0, -1.0 - 4.0]])
    ref = qrm_reference_advantages(z, v, kl, torch.zeros_like(kl), mask, kl_coef=0.5, value_coef=0.01)
    assert torch.isfinite(ref.advantages).all()
    # Z / sigma -> 0 and V / sigma_V -> 0, leaving only the |dlogp| penalty
    close(ref.returns, [[-0.5, 0.0, 0], [0.0, 0.0, -1.0]])
    close(ref.advantages, [[-0.5, 0.0, 0], [0.0, 0.0, -1.0]])
    for center in (True, False):
        rr = reinforce_returns_qrm(z, mask, center=center, eos_rescore=True)
        close(rr, torch.zeros(2, 3, dtype=D))
    ro = reinforce_returns_orm(t([2.0, 2.0]), mask)
    close(ro, torch.zeros(2, 3, dtype=D))


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


def test_gae_hand_numbers():
    # row 0: prompt in column 0, actions at 1..2, padding at 3 (NaN).  row 1: actions fill the window.
    mask = t([[0, 1, 1, 0], [1, 1, 1, 1]])
    r = t([[NAN, 0.0, 1.0, NAN], [0.0, 0.0, 0.0, 2.0]])
    v = t([[INF, 0.5, 0.2, NAN], [0.1, 0.2, 0.3, 0.4]])
    out = gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    # row 0, column 2 is terminal: A = 1 - 0.2 = 0.8
    # column 1: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32, A = -0.32 + 0.72 * 0.8 = 0.256
    # row 1, column 3 (last window column, an action here): A = 2 - 0.4 = 1.6 (the reference would give 0)
    # column 2: delta = 0.9 * 0.4 - 0.3 = 0.06,  A = 0.06 + 0.72 * 1.6 = 1.212
    # column 1: delta = 0.9 * 0.3 - 0.2 = 0.07,  A = 0.07 + 0.72 * 1.212 = 0.94264
    # column 0: delta = 0.9 * 0.2 - 0.1 = 0.08,  A = 0.08 + 0.72 * 0.94264 = 0.7587008
    close(out.advantages, [[0, 0.256, 0.8, 0], [0.7587008, 0.94264, 1.212, 1.6]], atol=1e-12)
    close(out.returns, [[0, 0.756, 1.0, 0], [0.8587008, 1.14264, 1.512, 2.0]], atol=1e-12)
    assert out.reward_std is None


def test_gae_random_vs_loop_and_gamma_one_is_reward_to_go():
    mask, rnd = random_batch(8, 13, seed=3)
    r, v = rnd(), rnd()
    for gamma, lam in ((0.9, 0.8), (1.0, 1.0), (0.5, 0.0)):
        out = gae_advantages(r, v, mask, gamma=gamma, lam=lam)
        ea, er = ref_gae(r, v, mask, gamma, lam)
        close(out.advantages, ea, atol=1e-10)
        close(out.returns, er, atol=1e-10)
    # gamma = lam = 1: the return is the undiscounted reward-to-go inside the response
    out = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    for i, (rr, mr) in enumerate(zip(rows(r), rows(mask))):
        for j, m in enumerate(mr):
            if m:
                togo = sum(rr[k] for k in range(j, len(rr)) if mr[k])
                assert abs(out.returns[i, j].item() - togo) < 1e-10


def test_gae_hole_in_mask_splits_episodes():
    # two responses packed in one row, separated by a non-action column: nothing flows across the gap
    mask = t([[1, 1, 0, 1]])
    r = t([[0.0, 1.0, 5.0, 1.0]])
    v = t([[0.0, 0.0, 7.0, 0.0]])
    out = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    close(out.advantages, [[1.0, 1.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------------------
# reward shaping for baselines
# --------------------------------------------------------------------------------------------------


def test_orm_token_rewards():
    mask = t([[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    seq = t([1.0, 3.0, 9.0])
    close(orm_token_rewards(seq, mask), [[0, 0, 0, 1.0], [3.0, 0, 0, 0], [0, 0, 0, 0]])
    close(orm_token_rewards(seq, mask, last_token_only=False), [[0, 1, 1, 1], [3, 0, 0, 0], [0, 0, 0, 0]])
    # reference scaling: sigma over the broadcast values {1,1,1,3}: mean 1.5, var (3*0.25 + 2.25)/4 = 0.75
    s = math.sqrt(0.75)
    close(orm_token_rewards(seq, mask, normalize=True), [[0, 0, 0, 1 / s], [3 / s, 0, 0, 0], [0, 0, 0, 0]])


def test_dpo_token_rewards_alignment():
    # column t holds log pi(a_t|s_t): every action gets its own log-ratio, the first one included,
    # the EOS (last action) gets the EOS's ratio, padding (NaN) gets nothing.
    mask = t([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    logp = t([[NAN, -1.0, -2.0, -0.5, NAN], [-3.0, -0.25, NAN, INF, -INF]])
    logp_ref = t([[NAN, -1.5, -1.0, -2.5, -INF], [-1.0, -0.75, NAN, NAN, 0.0]])
    out = dpo_token_rewards(logp, logp_ref, mask, beta=0.1)
    close(out, [[0, 0.05, -0.1, 0.2, 0], [-0.2, 0.05, 0, 0, 0]], atol=1e-12)


def test_add_kl_penalty():
    mask = t([[1, 1, 0]])
    close(add_kl_penalty(t([[1.0, 2.0, NAN]]), t([[0.5, 3.0, INF]]), mask, kl_coef=0.1), [[0.95, 1.7, 0.0]])


# --------------------------------------------------------------------------------------------------
# REINFORCE returns
# --------------------------------------------------------------------------------------------------


def test_reinforce_returns_qrm_and_eos_rescoring():
    close(reinforce_returns_qrm(Z, MASK), Z_STD)
    # eos_rescore, centred: row 0 mean (-1.5 - 0.5 - 0.5)/3 = -5/6 replaces -0.5;
    # row 1 mean (-0.5 + 0 + 0 + 1 + 2)/5 = 0.5 replaces 2
    close(reinforce_returns_qrm(Z, MASK, eos_rescore=True), [[-1.5, -0.5, -5 / 6, 0, 0], [-0.5, 0, 0, 1, 0.5]])
    # reference (divide by sigma only): row 0 = 1 2 2 -> mean 5/3; row 1 = 2 2.5 2.5 3.5 4.5 -> mean 3
    close(
        reinforce_returns_qrm(Z, MASK, center=False, eos_rescore=True),
        [[1, 2, 5 / 3, 0, 0], [2, 2.5, 2.5, 3.5, 3.0]],
    )
    # last action = last kept token of a truncated response in the middle of the row, prompt before it
    mask = t([[0, 1, 1, 1]])
    z = t([[NAN, 1.0, 2.0, 6.0]])  # sigma = sqrt(14/3); r = z / sigma
    s = statistics.pstdev([1.0, 2.0, 6.0])
    close(reinforce_returns_qrm(z, mask, center=False, eos_rescore=True), [[0, 1 / s, 2 / s, 3 / s]])


def test_reinforce_returns_orm():
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    seq = t([1.0, 3.0, 100.0])  # the empty row must not enter the statistics
    # standardised over the two sequences with actions: mean 2, population std 1
    close(reinforce_returns_orm(seq, mask), [[-1, -1, 0], [1, 0, 0], [0, 0, 0]])
    close(reinforce_returns_orm(seq, mask, normalize=False), [[1, 1, 0], [3, 0, 0], [0, 0, 0]])


# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------


def test_sampled_kl_estimators_hand_numbers():
    logp = t([[math.log(0.5), math.log(0.1)]])
    logp_ref = t([[math.log(0.25), math.log(0.4)]])
    # k1 = log(p / p_ref): log 2, log 0.25
    close(kl_k1(logp, logp_ref), [[math.log(2), math.log(0.25)]])
    # k3 = r - log r - 1 with r = p_ref / p: r = 0.5 -> 0.5 + log 2 - 1;  r = 4 -> 4 - log 4 - 1
    close(kl_k3(logp, logp_ref), [[0.5 + math.log(2) - 1, 3 - math.log(4)]], atol=1e-12)
    close(kl_abs(logp, logp_ref), [[math.log(2), math.log(4)]])
    for kind, fn in (("k1", kl_k1), ("k3", kl_k3), ("abs", kl_abs)):
        close(kl_penalty(kind, logp=logp, logp_ref=logp_ref), fn(logp, logp_ref))
    with pytest.raises(ValueError):
        kl_penalty("k2", logp=logp, logp_ref=logp_ref)
    with pytest.raises(ValueError):
        kl_penalty("full", logp=logp, logp_ref=logp_ref)


def test_full_kl_and_entropy_vs_loops():
    g = torch.Generator().manual_seed(0)
    la = torch.randn(3, 4, 7, generator=g, dtype=D) * 2
    lr = torch.randn(3, 4, 7, generator=g, dtype=D) * 2
    kl = full_kl(la, lr)
    ent = entropy_from_logits(la)
    assert kl.shape == (3, 4) and ent.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert abs(kl[i, j].item() - ref_kl(la[i, j].tolist(), lr[i, j].tolist())) < 1e-12
            assert abs(ent[i, j].item() - ref_entropy(la[i, j].tolist())) < 1e-12
    close(kl_penalty("full", logits=la, logits_ref=lr), kl)
    close(full_kl(la, la), torch.zeros(3, 4, dtype=D), atol=1e-12)
    # shift invariance and huge logits (stability of the max shift)
    close(full_kl(la + 1000.0, lr - 1000.0), kl, atol=1e-9)
    # hand case: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    p = torch.log(t([[[0.5, 0.5]]]))
    q = torch.log(t([[[0.25, 0.75]]]))
    close(full_kl(p, q), [[0.5 * math.log(2) + 0.5 * math.log(2 / 3)]], atol=1e-12)
    close(entropy_from_logits(p), [[math.log(2)]], atol=1e-12)
    # bf16 logits are up-cast: result float32 close to the float64 value
    kb = full_kl(la.to(torch.bfloat16), lr.to(torch.bfloat16))
    assert kb.dtype == torch.float32
    close(kb.double(), full_kl(la.to(torch.bfloat16).double(), lr.to(torch.bfloat16).double()), atol=1e-5)


def test_full_kl_inf_logits():
    # actor forbids token 2 (-inf): its term is 0, result finite, gradient finite
    la = t([[[0.0, 0.0, -INF]]]).requires_grad_(True)
    lr = t([[[0.0, math.log(3.0), 0.0]]])
    kl = full_kl(la, lr)
    # p = (1/2, 1/2, 0), q = (1/5, 3/5, 1/5): KL = 1/2 log(5/2) + 1/2 log(5/6)
    close(kl.detach(), [[0.5 * math.log(2.5) + 0.5 * math.log(5 / 6)]], atol=1e-12)
    kl.sum().backward()
    assert torch.isfinite(la.grad).all()
    # reference forbids a token the actor can emit: KL = +inf (not NaN)
    kl2 = full_kl(t([[[0.0, 0.0]]]), t([[[0.0, -INF]]]))
    assert math.isinf(kl2.item()) and kl2.item() > 0
    h = entropy_from_logits(t([[[0.0, 0.0, -INF]]]))
    close(h, [[math.log(2)]], atol=1e-12)


# --------------------------------------------------------------------------------------------------
# vocab-parallel KL / entropy and DP statistics in 2 processes
# --------------------------------------------------------------------------------------------------


def _vp_inputs():
    g = torch.Generator().manual_seed(1234)
    la = torch.randn(2, 3, 10, generator=g, dtype=D) * 3
    lr = torch.randn(2, 3, 10, generator=g, dtype=D) * 3
    la[0, 0, 7] = -INF  # a -inf logit on rank 1's half
    w = torch.randn(2, 3, generator=g, dtype=D)
    return la, lr, w


def _vp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group([0, 1])
        la, lr, w = _vp_inputs()
        half = la.shape[-1] // world
        sl = slice(rank * half, (rank + 1) * half)
        a = la[..., sl].clone().requires_grad_(True)
        r = lr[..., sl].clone().requires_grad_(True)
        kl = vocab_parallel_full_kl(a, r, group)
        ent = vocab_parallel_entropy(a, group)
        kl_dispatch = kl_penalty("full", logits=a.detach(), logits_ref=r.detach(), group=group)
        # a replicated loss, as in tensor-parallel training
        ((w * kl).sum() + (w * ent).sum() * 0.5).backward()
        # data-parallel statistics: each rank holds one row of the running example
        mean, std = masked_mean_std(Z[rank : rank + 1], MASK[rank : rank + 1], group=group)
        torch.save(
            {"kl": kl.detach(), "ent": ent.detach(), "kl_dispatch": kl_dispatch, "grad_a": a.grad,
             # the unsharded functions in a distributed process: no collective (they once summed over the world)
             "ent_unsharded": entropy_from_logits(la), "kl_unsharded": full_kl(la, lr),
             "grad_r": r.grad, "mean": mean, "std": std},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_kl_entropy_and_dp_stats_two_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork where available: the children reuse the already imported torch instead of re-importing it
    # (spawn costs seconds per child on a loaded CI machine); the tensors here are too small for OpenMP
    # (a forked child would also inherit a process group initialised in this process: spawn then)
    import torch.distributed as dist

    parent_has_pg = dist.is_available() and dist.is_initialized()
    method = "fork" if "fork" in mp.get_all_start_methods() and not parent_has_pg else "spawn"
    mp.start_processes(_vp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method=method)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    la, lr, w = _vp_inputs()
    a = la.clone().requires_grad_(True)
    r = lr.clone().requires_grad_(True)
    kl = full_kl(a, r)
    ent = entropy_from_logits(a)
    ((w * kl).sum() + (w * ent).sum() * 0.5).backward()
    for i in range(2):
        for j in range(3):  # and against the explicit loop, for the -inf entry too
            assert abs(res[0]["kl"][i, j].item() - ref_kl(la[i, j].tolist(), lr[i, j].tolist())) < 1e-12
    for rank, out in enumerate(res):
        close(out["kl"], kl.detach(), atol=1e-12)
        close(out["ent"], ent.detach(), atol=1e-12)
        close(out["kl_dispatch"], kl.detach(), atol=1e-12)
        close(out["ent_unsharded"], ent.detach(), atol=1e-12)
        close(out["kl_unsharded"], kl.detach(), atol=1e-12)
        sl = slice(rank * 5, (rank + 1) * 5)
        # identity-backward all-reduce: local grads are exactly the slices of the unsharded grads
        close(out["grad_a"], a.grad[..., sl], atol=1e-12)
        close(out["grad_r"], r.grad[..., sl], atol=1e-12)
        close(out["mean"], 5.0)
        close(out["std"], 2.0)  # whole-batch stats, not the rank's own row (row 0 alone: std 0.943)


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def test_ppo_clipping_cases():
    # five tokens (eps = 0.2) plus one padding column with garbage:
    #   rho 1.5, A +1 : min(1.5, 1.2)  = 1.2   clipped   (no gradient)
    #   rho 1.5, A -1 : min(-1.5, -1.2) = -1.5 unclipped (pessimistic side)
    #   rho 0.5, A +1 : min(0.5, 0.8)  = 0.5   unclipped
    #   rho 0.5, A -1 : min(-0.5, -0.8) = -0.8 clipped   (no gradient)
    #   rho 1.1, A +2 : inside the range       = 2.2
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    advs = [1.0, -1.0, 1.0, -1.0, 2.0]
    logp_old = t([[-1.0, -2.0, -0.5, -3.0, -1.0, NAN]])
    logp = (logp_old[:, :5] + torch.log(t([ratios]))).clone()
    logp = torch.cat([logp, t([[INF]])], dim=1).requires_grad_(True)
    adv = t([advs + [NAN]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    out = ppo_policy_loss(logp, logp_old, adv, mask, clip_eps=0.2)
    objectives = [1.2, -1.5, 0.5, -0.8, 2.2]
    close(out.loss.detach(), -sum(objectives) / 5, atol=1e-12)
    close(out.loss_sum.detach(), -sum(objectives), atol=1e-12)
    close(out.num_tokens, 5.0)
    out.loss.backward()
    # d(-rho A)/d logp = -rho A on unclipped tokens, 0 on clipped ones and on padding; mean over 5 tokens
    expected_grad = [0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.2 / 5, 0.0]
    close(logp.grad, [expected_grad], atol=1e-12)
    st = out.stats
    close(st["clip_frac"], 2 / 5, atol=1e-12)
    close(st["ratio_outside_frac"], 4 / 5, atol=1e-12)
    close(st["ratio_mean"], sum(ratios) / 5, atol=1e-12)
    close(st["ratio_max"], 1.5, atol=1e-12)
    close(st["ratio_min"], 0.5, atol=1e-12)
    d = [math.log(x) for x in ratios]
    close(st["approx_kl"], sum(0.5 * x * x for x in d) / 5, atol=1e-12)
    close(st["approx_kl_k3"], sum(math.exp(x) - 1 - x for x in d) / 5, atol=1e-12)


def test_ppo_asymmetric_clip_and_sum_count_aggregation():
    logp_old = t([[0.0, 0.0]])
    logp = torch.log(t([[1.25, 1.25]]))
    adv = t([[1.0, 1.0]])
    mask = t([[1, 1]])
    # upper clip 0.3: rho 1.25 lies inside -> objective 1.25 each
    close(ppo_policy_loss(logp, logp_old, adv, mask, clip_eps=0.2, clip_eps_high=0.3).loss, -1.25)
    close(ppo_policy_loss(logp, logp_old, adv, mask, clip_eps=0.2).loss, -1.2)
    # two micro-batches: sum of loss_sum / total tokens == token mean over the concatenation
    mask_a, rnd = random_batch(5, 6, seed=4)
    la, lo, ad = rnd(), rnd(), rnd()
    full = ppo_policy_loss(la, lo, ad, mask_a)
    p1 = ppo_policy_loss(la[:2], lo[:2], ad[:2], mask_a[:2])
    p2 = ppo_policy_loss(la[2:], lo[2:], ad[2:], mask_a[2:])
    close((p1.loss_sum + p2.loss_sum) / (p1.num_tokens + p2.num_tokens), full.loss, atol=1e-12)
    assert torch.isfinite(full.loss)


def test_value_loss():
    v = t([[1.0, 2.0, NAN], [0.0, 0.0, 0.0]]).requires_grad_(True)
    g = t([[0.0, 4.0, NAN], [1.0, INF, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    out = value_loss(v, g, mask)
    # (1 + 4 + 1) / 3
    close(out.loss.detach(), 2.0)
    out.loss.backward()
    close(v.grad, [[2 * 1 / 3, 2 * -2 / 3, 0], [2 * -1 / 3, 0, 0]])
    # clipping: v_old = 0, eps = 0.5: token 0: v 1 -> clipped 0.5, errors (1-0)^2=1 vs (0.5-0)^2 -> max 1
    # token 1: v 2 -> clipped 0.5, errors (2-4)^2=4 vs (0.5-4)^2=12.25 -> max 12.25 (clipped)
    # token 2 (row 1): v 0 -> clipped 0, error 1 either way
    v_old = torch.zeros(2, 3, dtype=D)
    out_c = value_loss(v.detach(), g, mask, clip_eps=0.5, values_old=v_old)
    close(out_c.loss, (1 + 12.25 + 1) / 3)
    close(out_c.stats["value_clip_frac"], 1 / 3)
    with pytest.raises(ValueError):
        value_loss(v, g, mask, clip_eps=0.5)


def test_entropy_bonus_and_reinforce_loss():
    # entropies: uniform over 2 -> log 2, uniform over 4 -> log 4; padding row has NaN logits
    logits = torch.zeros(1, 3, 4, dtype=D)
    logits[0, 0, 2:] = -INF
    logits[0, 2] = NAN
    ent = entropy_from_logits(logits)
    close(ent[:, :2], [[math.log(2), math.log(4)]], atol=1e-12)
    mask = t([[1, 1, 0]])
    out = entropy_bonus(ent, mask, coef=0.1)
    close(out.loss, -0.1 * (math.log(2) + math.log(4)) / 2, atol=1e-12)
    close(out.stats["entropy_mean"], (math.log(2) + math.log(4)) / 2, atol=1e-12)

    logp = t([[-1.0, -2.0, NAN], [-0.5, -INF, -INF]]).requires_grad_(True)
    ret = t([[2.0, -1.0, 5.0], [4.0, NAN, 1.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    rl = reinforce_loss(logp, ret, m)
    # -(2 * -1 + -1 * -2 + 4 * -0.5) / 3 = -(-2 + 2 - 2) / 3 = 2/3
    close(rl.loss.detach(), 2 / 3)
    rl.loss.backward()
    close(logp.grad, [[-2 / 3, 1 / 3, 0], [-4 / 3, 0, 0]])
    s, c = masked_sum_count(ret, m)
    close(s, 5.0)
    close(c, 3.0)
    # empty micro-batch: loss 0, not NaN
    e = reinforce_loss(logp.detach(), ret, torch.zeros_like(m))
    assert e.loss.item() == 0.0 and e.num_tokens.item() == 0.0
