"""Reward-model objectives (Q-RM, last-token ORM, DPO-RM) and their masked reductions."""

from megatron_qrm.rewards.losses import (
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

__all__ = [
    "REWARD_LOSSES",
    "PairwiseLossOutput",
    "dpo_loss",
    "dpo_token_credits",
    "last_token_values",
    "masked_mean",
    "orm_loss",
    "qrm_loss",
    "token_logprobs_sum",
]
