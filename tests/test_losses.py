"""Tests for megatron_qrm.rewards.losses.

Every vectorised loss is compared with an independent per-pair Python loop (plain floats, ``math``)
on random batches that mix normal, empty, truncated and all-padding sequences.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_qrm.rewards import (
    REWARD_LOSSES,
    PairwiseLossOutput,
    dpo_loss,
    dpo_token_credits,
    last_token_values,
    masked_mean,
    orm_loss,
    qrm_loss,
    token_logprobs_sum,
)

# --------------------------------------------------------------------------------------------------
# reference helpers (plain Python, no torch reductions)
# --------------------------------------------------------------------------------------------------


def ref_neg_logsigmoid(x: float) -> float:
    """-log(sigmoid(x)) computed stably with math only."""
    if x >= 0:
        return math.log1p(math.exp(-x))
    return -x + math.log1p(math.exp(x))


def row_positions(mask_row: list[float]) -> list[int]:
    return [p for p, m in enumerate(mask_row) if m != 0]


def ref_mean(values_row: list[float], mask_row: list[float]) -> tuple[float, int]:
    pos = row_positions(mask_row)
    if not pos:
        return 0.0, 0
    total = 0.0
    for p in pos:
        total += values_row[p]
    return total / len(pos), len(pos)


def ref_last(values_row: list[float], mask_row: list[float]) -> tuple[float, int]:
    pos = row_positions(mask_row)
    if not pos:
        return 0.0, 0
    return values_row[pos[-1]], len(pos)


def ref_pairwise(scores_w, scores_l, counts_w, counts_l, logit_fn):
    """Returns (loss_sum, num_valid, correct, chosen_scores, rejected_scores, valid) via a loop."""
    loss_sum, num_valid, correct = 0.0, 0, 0
    chosen, rejected, valid = [], [], []
    for sw, sl, cw, cl in zip(scores_w, scores_l, counts_w, counts_l):
        ok = cw > 0 and cl > 0
        valid.append(ok)
        if not ok:
            chosen.append(0.0)
            rejected.append(0.0)
            continue
        num_valid += 1
        loss_sum += ref_neg_logsigmoid(logit_fn(sw, sl))
        correct += int(sw > sl)
        chosen.append(sw)
        rejected.append(sl)
    return loss_sum, num_valid, correct, chosen, rejected, valid


def make_response_mask(b: int, s: int, rng: random.Random, kinds: list[str] | None = None) -> torch.Tensor:
    """Random ``[2B, S]`` response mask; chosen and rejected of a pair share the prompt length.

    Each side gets one of: "normal" (prompt, response, EOS, padding), "truncated" (response runs to
    the last column), "empty" (no response token), "padding" (row entirely 0, prompt length 0).
    """
    mask = torch.zeros(2 * b, s)
    for i in range(b):
        prompt = rng.randint(1, s - 2)
        for row in (i, b + i):
            kind = kinds[row] if kinds is not None else rng.choices(
                ["normal", "truncated", "empty", "padding"], weights=[6, 2, 1, 1]
            )[0]
            if kind == "normal":
                length = rng.randint(1, s - prompt - 1)
                mask[row, prompt : prompt + length] = 1
            elif kind == "truncated":
                mask[row, prompt:] = 1
            elif kind in ("empty", "padding"):
                pass  # the difference (prompt tokens vs padding) is invisible to the mask
            else:  # pragma: no cover
                raise ValueError(kind)
    return mask


def label_from_response(response_mask: torch.Tensor) -> torch.Tensor:
    """label_mask[:, p] = response_mask[:, p + 1] (last column 0), built by a loop."""
    n, s = response_mask.shape
    label = torch.zeros_like(response_mask)
    for r in range(n):
        for p in range(s - 1):
            label[r, p] = response_mask[r, p + 1]
    return label


def assert_output_matches(out: PairwiseLossOutput, ref, *, tol: float = 1e-5) -> None:
    loss_sum, num_valid, correct, chosen, rejected, valid = ref
    assert out.loss_sum.dim() == 0
    assert out.loss_sum.item() == pytest.approx(loss_sum, rel=tol, abs=tol)
    assert out.num_valid.item() == num_valid
    assert out.num_valid.is_floating_point()
    assert out.correct.item() == correct
    assert out.valid.dtype == torch.bool
    assert out.valid.tolist() == valid
    torch.testing.assert_close(out.chosen_score, torch.tensor(chosen), rtol=tol, atol=tol)
    torch.testing.assert_close(out.rejected_score, torch.tensor(rejected), rtol=tol, atol=tol)
    assert not out.chosen_score.requires_grad and not out.rejected_score.requires_grad
    metrics = out.metrics()
    assert set(metrics) == {"loss_sum", "num_valid", "correct", "chosen_score_sum", "rejected_score_sum"}
    assert metrics["chosen_score_sum"].item() == pytest.approx(sum(chosen), rel=tol, abs=tol)
    assert metrics["rejected_score_sum"].item() == pytest.approx(sum(rejected), rel=tol, abs=tol)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())


def ref_qrm(scores: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float):
    b = scores.shape[0] // 2
    sv, mv = scores.tolist(), mask.tolist()
    per_row = [ref_mean(sv[r], mv[r]) for r in range(2 * b)]
    return ref_pairwise(
        [x[0] for x in per_row[:b]], [x[0] for x in per_row[b:]],
        [x[1] for x in per_row[:b]], [x[1] for x in per_row[b:]],
        lambda w, l: beta * (w - l) - gamma,
    )


def ref_orm(scores: torch.Tensor, mask: torch.Tensor):
    b = scores.shape[0] // 2
    sv, mv = scores.tolist(), mask.tolist()
    per_row = [ref_last(sv[r], mv[r]) for r in range(2 * b)]
    return ref_pairwise(
        [x[0] for x in per_row[:b]], [x[0] for x in per_row[b:]],
        [x[1] for x in per_row[:b]], [x[1] for x in per_row[b:]],
        lambda w, l: w - l,
    )


def ref_dpo(policy: torch.Tensor, ref_sum: torch.Tensor, label: torch.Tensor, beta: float):
    b = policy.shape[0] // 2
    pv, lv, rv = policy.tolist(), label.tolist(), ref_sum.tolist()
    credits, counts = [], []
    for r in range(2 * b):
        total, count = 0.0, 0
        for p in range(len(pv[r])):
            if lv[r][p] != 0:
                total += pv[r][p]
                count += 1
        credits.append(beta * (total - rv[r]))
        counts.append(count)
    return ref_pairwise(credits[:b], credits[b:], counts[:b], counts[b:], lambda w, l: w - l)


# --------------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_masked_mean_and_last_token_match_loops(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    mask = make_response_mask(5, 12, rng)
    values = torch.randn(10, 12)
    mean, count = masked_mean(values, mask)
    last = last_token_values(values, mask)
    vv, mv = values.tolist(), mask.tolist()
    for r in range(10):
        m, c = ref_mean(vv[r], mv[r])
        lt, _ = ref_last(vv[r], mv[r])
        assert mean[r].item() == pytest.approx(m, abs=1e-6)
        assert count[r].item() == c
        assert last[r].item() == pytest.approx(lt, abs=1e-6)
    assert token_logprobs_sum(values, mask).tolist() == pytest.approx(
        [sum(vv[r][p] for p in row_positions(mv[r])) for r in range(10)], abs=1e-5
    )


def test_last_token_edge_positions() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 4)
    mask = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # only position 0 (argmax over pos*mask must not confuse with "none")
            [0.0, 0.0, 0.0, 0.0],  # none -> 0
            [0.0, 1.0, 1.0, 1.0],  # runs to the last column (truncated response)
            [0.0, 1.0, 1.0, 0.0],
        ]
    )
    assert last_token_values(values, mask).tolist() == [1.0, 0.0, 4.0, 3.0]
    assert last_token_values(values, mask.bool()).tolist() == [1.0, 0.0, 4.0, 3.0]
    mean, count = masked_mean(values, mask)
    assert mean.tolist() == [1.0, 0.0, 3.0, 2.5]
    assert count.tolist() == [1.0, 0.0, 3.0, 2.0]


# --------------------------------------------------------------------------------------------------
# Q-RM and ORM vs loops
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beta,gamma", [(0.2, 2.0), (1.0, 0.0), (0.05, -1.5), (3.0, 10.0)])
def test_qrm_loss_matches_loop(seed: int, beta: float, gamma: float) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b = rng.choice([1, 2, 4, 7])
    mask = make_response_mask(b, 16, rng)
    scores = torch.randn(2 * b, 16) * 5
    out = qrm_loss(scores, mask, beta=beta, gamma=gamma)
    assert_output_matches(out, ref_qrm(scores, mask, beta, gamma))


@pytest.mark.parametrize("seed", range(6))
def test_orm_loss_matches_loop(seed: int) -> None:
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    b = rng.choice([1, 3, 8])
    mask = make_response_mask(b, 16, rng)
    scores = torch.randn(2 * b, 16) * 3
    assert_output_matches(orm_loss(scores, mask), ref_orm(scores, mask))


def test_defaults_are_paper_values() -> None:
    rng = random.Random(0)
    mask = make_response_mask(4, 10, rng, kinds=["normal"] * 8)
    scores = torch.randn(8, 10)
    out = qrm_loss(scores, mask)
    assert out.loss_sum.item() == pytest.approx(ref_qrm(scores, mask, 0.2, 2.0)[0], rel=1e-5)


def test_edge_cases_validity() -> None:
    """Empty side, padding row, truncated response and B=1 all handled."""
    # pair 0: both normal; pair 1: chosen empty; pair 2: rejected all padding; pair 3: both truncated;
    # pair 4: both all padding
    kinds_w = ["normal", "empty", "normal", "truncated", "padding"]
    kinds_l = ["normal", "normal", "padding", "truncated", "padding"]
    rng = random.Random(7)
    mask = make_response_mask(5, 9, rng, kinds=kinds_w + kinds_l)
    scores = torch.randn(10, 9)
    for out, ref in (
        (qrm_loss(scores, mask), ref_qrm(scores, mask, 0.2, 2.0)),
        (orm_loss(scores, mask), ref_orm(scores, mask)),
    ):
        assert out.valid.tolist() == [True, False, False, True, False]
        assert_output_matches(out, ref)

    # B = 1, invalid: everything zero, still a graph-connected scalar so backward() works
    scores1 = torch.randn(2, 6, requires_grad=True)
    mask1 = torch.zeros(2, 6)
    mask1[1, 2:4] = 1
    out = qrm_loss(scores1, mask1)
    assert out.num_valid.item() == 0 and out.loss_sum.item() == 0 and out.correct.item() == 0
    out.loss_sum.backward()
    assert torch.equal(scores1.grad, torch.zeros_like(scores1))

    # B = 1, valid
    mask1[0, 2:5] = 1
    out = orm_loss(scores1.detach(), mask1)
    assert_output_matches(out, ref_orm(scores1.detach(), mask1))


def test_hand_derived_numbers() -> None:
    # Q-RM: S_w = 1, S_l = 0 -> loss = -log sigmoid(0.2 * 1 - 2) = log(1 + e^{1.8})
    scores = torch.tensor([[9.0, 0.5, 1.5, 9.0], [9.0, -1.0, 1.0, 9.0]])  # 9.0 = prompt/padding junk
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    out = qrm_loss(scores, mask)
    expected = -math.log(1.0 / (1.0 + math.exp(-(0.2 - 2.0))))
    assert expected == pytest.approx(math.log1p(math.exp(1.8)))
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_score.tolist() == [1.0] and out.rejected_score.tolist() == [0.0]
    assert out.correct.item() == 1  # accuracy threshold is 0, not gamma/beta

    # ORM: last tokens 1.5 and 1.0 -> -log sigmoid(0.5)
    out = orm_loss(scores, mask)
    assert out.loss_sum.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)

    # DPO: policy sums -3 / -5, ref sums -4 / -4, beta 0.1 -> s_w = 0.1, s_l = -0.1 -> -log sigmoid(0.2)
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -2.0, -3.0, 0.0]])
    label = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    out = dpo_loss(logps, torch.tensor([-4.0, -4.0]), label, beta=0.1)
    assert out.chosen_score.item() == pytest.approx(0.1) and out.rejected_score.item() == pytest.approx(-0.1)
    assert out.loss_sum.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)


def test_extreme_margins_are_stable() -> None:
    scores = torch.tensor([[0.0, 1e4], [0.0, -1e4], [0.0, -1e4], [0.0, 1e4]])
    mask = torch.tensor([[0.0, 1.0]] * 4)
    out = qrm_loss(scores, mask, beta=1.0, gamma=0.0)
    # pair 0: margin +2e4 -> loss ~ 0; pair 1: margin -2e4 -> loss ~ 2e4
    assert torch.isfinite(out.loss_sum)
    assert out.loss_sum.item() == pytest.approx(2e4, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["qrm", "orm"])
def test_gradients_only_reach_response_positions(loss_name: str) -> None:
    rng = random.Random(3)
    torch.manual_seed(3)
    b, s = 6, 14
    kinds = ["normal", "truncated", "empty", "normal", "padding", "normal"] + ["normal"] * 6
    mask = make_response_mask(b, s, rng, kinds=kinds)
    raw = torch.randn(2 * b, s)
    # garbage on prompt/padding must neither leak into the loss nor produce NaN gradients
    raw[mask == 0] = float("nan")
    raw[0, 0] = float("inf")
    scores = raw.clone().requires_grad_(True)
    fn = qrm_loss if loss_name == "qrm" else orm_loss
    out = fn(scores, mask)
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    grad = scores.grad
    assert torch.isfinite(grad).all()
    assert torch.all(grad[mask == 0] == 0)
    valid_rows = torch.cat([out.valid, out.valid])
    # invalid pairs get no gradient at all, also on their non-empty side
    assert torch.all(grad[~valid_rows] == 0)
    if loss_name == "qrm":
        # every response token of a valid pair receives gradient dl/dS * (+-beta) / count
        assert torch.all(grad[valid_rows][mask[valid_rows] == 1] != 0)
    else:
        # ORM: exactly the last response token of each valid row
        nz = (grad != 0).sum(dim=-1)
        assert nz[valid_rows].tolist() == [1] * int(valid_rows.sum())
        for r in torch.nonzero(valid_rows).flatten().tolist():
            last = row_positions(mask[r].tolist())[-1]
            assert grad[r, last] != 0


def test_qrm_gradient_matches_analytic() -> None:
    scores = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    beta, gamma = 0.5, 1.0
    qrm_loss(scores, mask, beta=beta, gamma=gamma).loss_sum.backward()
    x = beta * (2.0 - 2.0) - gamma
    dl_dx = -(1.0 - 1.0 / (1.0 + math.exp(-x)))  # d/dx -log sigmoid(x) = sigmoid(x) - 1
    expected = [[0.0, dl_dx * beta / 2, dl_dx * beta / 2], [0.0, -dl_dx * beta, 0.0]]
    torch.testing.assert_close(scores.grad, torch.tensor(expected))


def test_bf16_inputs_give_float32_loss() -> None:
    rng = random.Random(1)
    mask = make_response_mask(3, 8, rng, kinds=["normal"] * 6)
    scores = torch.randn(6, 8).bfloat16().requires_grad_(True)
    out = qrm_loss(scores, mask)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert scores.grad.dtype == torch.bfloat16


def test_micro_batch_sums_add_up() -> None:
    """Summing metrics over micro-batches equals the metrics of the concatenated batch."""
    rng = random.Random(11)
    torch.manual_seed(11)
    m1, m2 = make_response_mask(3, 10, rng), make_response_mask(2, 10, rng)
    s1, s2 = torch.randn(6, 10), torch.randn(4, 10)
    whole = qrm_loss(
        torch.cat([s1[:3], s2[:2], s1[3:], s2[2:]]), torch.cat([m1[:3], m2[:2], m1[3:], m2[2:]])
    ).metrics()
    a, b = qrm_loss(s1, m1).metrics(), qrm_loss(s2, m2).metrics()
    for k in whole:
        assert whole[k].item() == pytest.approx((a[k] + b[k]).item(), rel=1e-5, abs=1e-6)


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        qrm_loss(torch.zeros(3, 4), torch.zeros(3, 4))  # odd number of rows
    with pytest.raises(ValueError):
        orm_loss(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_loop(seed: int, beta: float) -> None:
    rng = random.Random(200 + seed)
    torch.manual_seed(seed)
    b = rng.choice([1, 2, 5])
    response_mask = make_response_mask(b, 15, rng)
    label = label_from_response(response_mask)
    policy = -torch.rand(2 * b, 15) * 4
    ref_sum = -torch.rand(2 * b) * 20
    out = dpo_loss(policy, ref_sum, label, beta=beta)
    assert_output_matches(out, ref_dpo(policy, ref_sum, label, beta), tol=1e-5)


def test_dpo_gradients_only_on_label_positions() -> None:
    rng = random.Random(5)
    response_mask = make_response_mask(4, 12, rng, kinds=["normal", "truncated", "empty", "normal"] * 2)
    label = label_from_response(response_mask)
    raw = -torch.rand(8, 12)
    raw[label == 0] = float("-inf")  # e.g. log-probs of padding labels
    policy = raw.clone().requires_grad_(True)
    ref_sum = torch.randn(8, requires_grad=True)
    out = dpo_loss(policy, ref_sum, label)
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert torch.isfinite(policy.grad).all()
    assert torch.all(policy.grad[label == 0] == 0)
    valid_rows = torch.cat([out.valid, out.valid])
    assert torch.all(policy.grad[valid_rows][label[valid_rows] == 1] != 0)
    assert ref_sum.grad is None  # the frozen reference never receives gradient


@pytest.mark.parametrize("seed", range(4))
def test_dpo_token_credits_alignment(seed: int) -> None:
    rng = random.Random(300 + seed)
    torch.manual_seed(seed)
    n, s, beta = 8, 11, 0.1
    response_mask = make_response_mask(n // 2, s, rng)
    label = label_from_response(response_mask)
    policy, ref = -torch.rand(n, s) * 3, -torch.rand(n, s) * 3
    credits = dpo_token_credits(policy, ref, label, beta=beta)
    expected = [[0.0] * s for _ in range(n)]
    pv, rv, lv = policy.tolist(), ref.tolist(), label.tolist()
    for r in range(n):
        for p in range(s - 1):
            if lv[r][p] != 0:
                expected[r][p + 1] = beta * (pv[r][p] - rv[r][p])
    torch.testing.assert_close(credits, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # aligned with response_mask: zero wherever there is no response token (prompts here are >= 1
    # token, so every response token has a predicting position)
    assert torch.all(credits[response_mask == 0] == 0)
    # summing the credits reproduces the DPO sequence credit
    seq = beta * (token_logprobs_sum(policy, label) - token_logprobs_sum(ref, label))
    torch.testing.assert_close(credits.sum(-1), seq, rtol=1e-5, atol=1e-6)


def test_reward_losses_names() -> None:
    assert REWARD_LOSSES == ("qrm", "orm", "dpo")
