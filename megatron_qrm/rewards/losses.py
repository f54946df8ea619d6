"""Pairwise reward-model losses: Q-RM (mean-score), last-token ORM and DPO-RM.

See ``docs/method.md`` §4 (the Q-RM loss and its baselines) for the definitions these functions implement.

Batch convention (shared by every loss here)
--------------------------------------------
A micro-batch of ``B`` preference pairs is a tensor of ``2B`` sequences of length ``S``:
rows ``0..B-1`` are the chosen responses and rows ``B..2B-1`` the rejected ones (row ``i`` and row
``B + i`` share the prompt).

* ``response_mask`` ``[2B, S]`` is 1 exactly at the response tokens (including the appended EOS) and 0 on
  prompt and padding. Q-RM and ORM scores ``Z`` live on these positions: ``Z[:, p]`` is the value head
  applied to the hidden state of the token at position ``p`` itself.
* ``label_mask`` ``[2B, S]`` is ``response_mask`` shifted left by one (``label_mask[:, p] ==
  response_mask[:, p + 1]``): the positions whose logits *predict* a response token. Causal-LM token
  log-probs (DPO) live on these positions.

A pair is *valid* iff both of its sides contain at least one response token. Invalid pairs contribute 0
to every sum and are not counted, in every loss here. The reference differs per loss
(docs/method.md §4): its mean-score Q-RM skips a pair whose chosen response is empty (then
the rejected one is empty too), its last-token ORM skips a pair with an empty side, but its DPO-RM (standard
DPO) skips nothing: a side without response tokens enters with a log-prob sum of 0. Here that DPO pair is
skipped as well, since an empty side carries no preference. (The data loader already drops pairs with an
empty response text; an empty side only arises when truncation leaves no response token.)

All functions are vectorised over the batch; there is no Python loop over pairs. Losses are computed in
float32 (inputs are up-cast) because bf16 scores would make ``logsigmoid`` of small margins too coarse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PairwiseLossOutput",
    "REWARD_LOSSES",
    "dpo_loss",
    "dpo_token_credits",
    "last_token_values",
    "masked_mean",
    "orm_loss",
    "qrm_loss",
    "token_logprobs_sum",
]

#: Names of the reward-model training objectives implemented in this module.
REWARD_LOSSES: tuple[str, ...] = ("qrm", "orm", "dpo")


@dataclass
class PairwiseLossOutput:
    """Result of a pairwise (Bradley-Terry style) loss over one micro-batch of ``B`` pairs.

    Everything is a *sum* (not a mean) so that micro-batches and data-parallel ranks can be reduced
    exactly: the final loss is ``sum(loss_sum) / max(sum(num_valid), 1)`` after the reduction.

    Attributes:
        loss_sum: scalar, sum of per-pair losses over valid pairs. Differentiable.
        num_valid: scalar float, number of valid pairs.
        correct: scalar float, number of valid pairs with ``chosen_score > rejected_score``.
        chosen_score: ``[B]`` sequence score of the chosen side (0 for invalid pairs), detached.
        rejected_score: ``[B]`` sequence score of the rejected side (0 for invalid pairs), detached.
        valid: ``[B]`` bool, which pairs are valid.
    """

    loss_sum: torch.Tensor
    num_valid: torch.Tensor
    correct: torch.Tensor
    chosen_score: torch.Tensor
    rejected_score: torch.Tensor
    valid: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached scalar sums suitable for summing across micro-batches and ranks.

        Returns:
            ``{"loss_sum", "num_valid", "correct", "chosen_score_sum", "rejected_score_sum"}``, each a
            0-dim float tensor. Mean margin is ``(chosen_score_sum - rejected_score_sum) / num_valid``.
        """
        return {
            "loss_sum": self.loss_sum.detach().float(),
            "num_valid": self.num_valid.detach().float(),
            "correct": self.correct.detach().float(),
            # invalid pairs already carry a 0 score, so a plain sum is the sum over valid pairs
            "chosen_score_sum": self.chosen_score.detach().float().sum(),
            "rejected_score_sum": self.rejected_score.detach().float().sum(),
        }


# --------------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------------


def _check_same_shape(values: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(
            f"{what}: expected values and mask of the same 2-D shape [N, S], "
            f"got {tuple(values.shape)} and {tuple(mask.shape)}"
        )


def _masked_zero(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` (up-cast to float32) with every position where ``mask == 0`` set to exactly 0.

    ``torch.where`` rather than ``values * mask`` so that non-finite garbage on padding positions
    (e.g. ``-inf`` log-probs) can neither leak into sums nor turn gradients into NaN.

    Args:
        values: ``[N, S]``.
        mask: ``[N, S]`` float or bool.

    Returns:
        ``[N, S]`` float32 (or float64 if ``values`` is float64).
    """
    v = values if values.dtype == torch.float64 else values.float()
    return torch.where(mask.bool(), v, torch.zeros((), dtype=v.dtype, device=v.device))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean of ``values`` over positions where ``mask`` is non-zero.

    Args:
        values: ``[N, S]`` per-token values.
        mask: ``[N, S]`` 0/1 mask (float or bool).

    Returns:
        ``(mean, count)``: ``mean`` ``[N]`` float (0 for rows with no masked position) and ``count``
        ``[N]`` float, the number of masked positions in each row.
    """
    _check_same_shape(values, mask, "masked_mean")
    masked = _masked_zero(values, mask)
    count = mask.bool().sum(dim=-1).to(masked.dtype)
    # clamp so empty rows give 0 / 1 = 0 instead of 0 / 0 = NaN
    mean = masked.sum(dim=-1) / count.clamp_min(1.0)
    return mean, count


def last_token_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row value at the last position where ``mask`` is non-zero.

    Args:
        values: ``[N, S]`` per-token values.
        mask: ``[N, S]`` 0/1 mask (float or bool).

    Returns:
        ``[N]`` float; 0 for rows with no masked position. Differentiable w.r.t. ``values`` at the
        selected positions only.
    """
    _check_same_shape(values, mask, "last_token_values")
    m = mask.bool()
    seq_len = values.shape[-1]
    # (position + 1) on masked entries, 0 elsewhere: the argmax is the last masked position, and a
    # row without any masked position yields index 0, which is zeroed out below.
    positions = torch.arange(1, seq_len + 1, device=values.device).expand_as(m)
    last_idx = torch.where(m, positions, torch.zeros_like(positions)).argmax(dim=-1)  # [N]
    picked = _masked_zero(values, m).gather(-1, last_idx.unsqueeze(-1)).squeeze(-1)
    return picked  # already 0 for empty rows because the masked copy is 0 there


def token_logprobs_sum(logps: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over the label positions of each row.

    Args:
        logps: ``[N, S]`` with ``logps[:, p] = log pi(labels[:, p] | tokens[:, :p+1])``.
        label_mask: ``[N, S]`` 0/1 mask of positions predicting a response token.

    Returns:
        ``[N]`` float, ``sum_p label_mask[:, p] * logps[:, p]`` (0 for rows with no label position).
    """
    _check_same_shape(logps, label_mask, "token_logprobs_sum")
    return _masked_zero(logps, label_mask).sum(dim=-1)


# --------------------------------------------------------------------------------------------------
# pairwise losses
# --------------------------------------------------------------------------------------------------


def _split_pairs(n_rows: int, what: str) -> int:
    """Number of pairs ``B`` for a ``[2B, ...]`` batch; raises on an odd row count."""
    if n_rows % 2 != 0 or n_rows == 0:
        raise ValueError(f"{what}: expected 2B rows (B chosen then B rejected), got {n_rows}")
    return n_rows // 2


def _pairwise_output(
    seq_score: torch.Tensor, side_count: torch.Tensor, logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> PairwiseLossOutput:
    """Assemble a :class:`PairwiseLossOutput` from per-sequence scores.

    Args:
        seq_score: ``[2B]`` per-sequence score (differentiable).
        side_count: ``[2B]`` number of response (or label) tokens of each sequence.
        logits_fn: maps ``(chosen [B], rejected [B])`` to the Bradley-Terry logit ``[B]``; the per-pair
            loss is ``-logsigmoid(logit)``.
    """
    b = _split_pairs(seq_score.shape[0], "pairwise loss")
    chosen, rejected = seq_score[:b], seq_score[b:]
    valid = (side_count[:b] > 0) & (side_count[b:] > 0)  # [B] bool
    per_pair = -F.logsigmoid(logits_fn(chosen, rejected))  # [B]
    zero = torch.zeros((), dtype=per_pair.dtype, device=per_pair.device)
    # where (not multiply) so an inf/NaN on an invalid pair cannot poison the sum or its gradient
    loss_sum = torch.where(valid, per_pair, zero).sum()
    chosen_d = torch.where(valid, chosen.detach(), zero)
    rejected_d = torch.where(valid, rejected.detach(), zero)
    correct = (valid & (chosen_d > rejected_d)).sum().to(per_pair.dtype)
    return PairwiseLossOutput(
        loss_sum=loss_sum,
        num_valid=valid.sum().to(per_pair.dtype),
        correct=correct,
        chosen_score=chosen_d,
        rejected_score=rejected_d,
        valid=valid,
    )


def qrm_loss(
    scores: torch.Tensor, response_mask: torch.Tensor, beta: float = 0.2, gamma: float = 2.0
) -> PairwiseLossOutput:
    """Q-RM "mean-score" loss (docs/method.md §4).

    Sequence score ``S = mean of Z over response tokens``; per-pair loss
    ``l = -log sigmoid(beta * (S_w - S_l) - gamma)``.

    Args:
        scores: ``[2B, S]`` token scores ``Z`` (value head at each position), chosen rows first.
        response_mask: ``[2B, S]`` 1 on response tokens (incl. EOS), 0 on prompt/padding.
        beta: scale of the score margin (paper and scripts: 0.2).
        gamma: margin offset (paper and scripts: 2.0).

    Returns:
        :class:`PairwiseLossOutput` with ``chosen_score``/``rejected_score`` = ``S_w``/``S_l``.
    """
    _check_same_shape(scores, response_mask, "qrm_loss")
    seq_score, count = masked_mean(scores, response_mask)  # [2B], [2B]
    return _pairwise_output(seq_score, count, lambda w, l: beta * (w - l) - gamma)


def orm_loss(scores: torch.Tensor, response_mask: torch.Tensor) -> PairwiseLossOutput:
    """Pairwise last-token ORM loss (docs/method.md §4, baseline ``orm``).

    Sequence score = ``Z`` at the last response token (the EOS unless the response was truncated);
    per-pair loss ``l = -log sigmoid(Z_w_last - Z_l_last)``.

    Args:
        scores: ``[2B, S]`` token scores ``Z``, chosen rows first.
        response_mask: ``[2B, S]`` 1 on response tokens, 0 on prompt/padding.

    Returns:
        :class:`PairwiseLossOutput` with ``chosen_score``/``rejected_score`` = last-token scores.
    """
    _check_same_shape(scores, response_mask, "orm_loss")
    seq_score = last_token_values(scores, response_mask)  # [2B]
    count = response_mask.bool().sum(dim=-1)
    return _pairwise_output(seq_score, count, lambda w, l: w - l)


def dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps_sum: torch.Tensor,
    label_mask: torch.Tensor,
    beta: float = 0.1,
) -> PairwiseLossOutput:
    """DPO-RM loss (docs/method.md §4, baseline ``dpo``; sums over tokens, no label smoothing).

    Sequence credit ``s = beta * (sum_p label_mask * policy_logps - ref_logps_sum)``; per-pair loss
    ``l = -log sigmoid(s_w - s_l)``. A pair with an empty side is skipped (not counted); the reference's
    DPO keeps it, with that side's log-prob sum 0 (see the module docstring).

    Args:
        policy_logps: ``[2B, S]`` with ``policy_logps[:, p] = log pi(labels[:, p] | tokens[:, :p+1])``.
        ref_logps_sum: ``[2B]`` frozen reference model's summed response log-probs (precomputed,
            treated as a constant).
        label_mask: ``[2B, S]`` 1 at positions predicting a response token.
        beta: DPO temperature (scripts: 0.1).

    Returns:
        :class:`PairwiseLossOutput` with ``chosen_score``/``rejected_score`` = ``s_w``/``s_l``.
    """
    _check_same_shape(policy_logps, label_mask, "dpo_loss")
    if ref_logps_sum.shape != policy_logps.shape[:1]:
        raise ValueError(
            f"dpo_loss: ref_logps_sum must be [2B]={tuple(policy_logps.shape[:1])}, "
            f"got {tuple(ref_logps_sum.shape)}"
        )
    policy_sum = token_logprobs_sum(policy_logps, label_mask)  # [2B]
    # the reference is frozen: never let gradient reach it even if the caller forgot to detach
    seq_credit = beta * (policy_sum - ref_logps_sum.detach().to(policy_sum.dtype))
    count = label_mask.bool().sum(dim=-1)
    return _pairwise_output(seq_credit, count, lambda w, l: w - l)


def dpo_token_credits(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    label_mask: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Per-token DPO-RM credit ``beta * (log pi - log pi_ref)``, aligned with ``response_mask``.

    The log-prob of response token ``a`` at position ``p + 1`` is stored at its predicting position ``p``
    (``label_mask[:, p] == 1``). The credit is moved right by one so that it sits on the token itself,
    like the Q-RM scores: ``credit[:, p + 1] = beta * (policy_logps[:, p] - ref_logps[:, p])`` where
    ``label_mask[:, p] == 1``, and 0 everywhere else. ``credit[:, 0]`` is always 0, and a label at the
    last column (which would have to predict a token beyond ``S``) is dropped.

    Gradient flows to ``policy_logps`` (call under ``torch.no_grad()`` for rewards).

    Args:
        policy_logps: ``[N, S]`` policy token log-probs at predicting positions.
        ref_logps: ``[N, S]`` reference token log-probs at predicting positions.
        label_mask: ``[N, S]`` 0/1 mask of predicting positions.
        beta: DPO temperature.

    Returns:
        ``[N, S]`` float credits, non-zero only where ``response_mask`` (= label_mask shifted right) is 1.
    """
    _check_same_shape(policy_logps, label_mask, "dpo_token_credits")
    _check_same_shape(ref_logps, label_mask, "dpo_token_credits")
    diff = _masked_zero(policy_logps, label_mask) - _masked_zero(ref_logps, label_mask)  # [N, S]
    # shift right by one: column 0 gets 0, column p+1 gets diff[:, p]
    return beta * F.pad(diff[:, :-1], (1, 0))
