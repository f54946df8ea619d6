"""Forward steps that turn a collated pair batch into token scores and a pairwise loss.

A forward step has megatron-core's schedule signature ``(data_iterator, model) -> (output,
loss_func)``; ``loss_func`` runs on the last pipeline stage only and returns ``(loss_sum,
num_valid_pairs, metrics)``: with ``calculate_per_token_loss`` the schedule sums ``loss_sum`` and
``num_valid_pairs`` over micro-batches and data-parallel ranks and divides the gradients once, so the
objective is the mean over every valid pair of the global batch, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserError
from megatron_qrm.data.packing import packed_seq_params, unpack
from megatron_qrm.models.logits import next_token_nll, real_vocab_size
from megatron_qrm.rewards.losses import dpo_loss, dpo_token_credits, orm_loss, qrm_loss, token_logprobs_sum
from megatron_qrm.training.engine import to_device

METRIC_NAMES = ("loss_sum", "num_valid", "correct", "chosen_score_sum", "rejected_score_sum")


@dataclass
class RewardLossConfig:
    kind: str = "qrm"  # qrm | orm | dpo
    qrm_beta: float = 0.2
    qrm_gamma: float = 2.0
    dpo_beta: float = 0.1

    @property
    def role(self) -> str:
        """Model role trained by this loss: a token head for Q-RM/ORM, an LM for DPO-RM."""
        return "policy" if self.kind == "dpo" else "reward"


def model_forward(model, batch: dict[str, torch.Tensor], with_labels: bool):
    """GPTModel forward on a collated batch: [n, S, 1] scores (reward role), or [n, S] per-token
    cross-entropy of ``labels`` over the real vocabulary (policy role, vocab-parallel, never gathered);
    hidden states on non-last pipeline stages.

    A packed batch (:mod:`megatron_qrm.data.packing`, tokens [1, T]) runs in megatron-core's THD layout
    and its output is gathered back to the [n, S] rows, so the losses see the unpacked layout."""
    out = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                packed_seq_params=packed_seq_params(batch))
    if not ps.is_pipeline_last_stage():
        return out
    if with_labels:
        out = next_token_nll(out, batch["labels"], real_vocab_size(model))
    return unpack(out, batch)


def pair_loss(cfg: RewardLossConfig, output: torch.Tensor, batch: dict[str, torch.Tensor]):
    """Loss of one micro-batch from the model output (see :func:`model_forward`)."""
    if cfg.kind == "dpo":
        logps = -output.float()
        return dpo_loss(logps, batch["ref_logps_sum"], batch["label_mask"], beta=cfg.dpo_beta)
    scores = output.squeeze(-1).float()
    if cfg.kind == "qrm":
        return qrm_loss(scores, batch["response_mask"], beta=cfg.qrm_beta, gamma=cfg.qrm_gamma)
    if cfg.kind == "orm":
        return orm_loss(scores, batch["response_mask"])
    raise UserError(f"unknown --reward-loss {cfg.kind!r}; choose from qrm, orm, dpo")


def train_forward_step(cfg: RewardLossConfig):
    """Forward step for training and for pairwise evaluation."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model_forward(model, batch, with_labels=cfg.kind == "dpo")

        def loss_func(output_tensor):
            res = pair_loss(cfg, output_tensor, batch)
            metrics = res.metrics()
            metrics.update(chosen_score=res.chosen_score, rejected_score=res.rejected_score,
                           valid=res.valid, index=batch["index"])
            return res.loss_sum, res.num_valid.to(torch.int), metrics

        return output, loss_func

    return forward_step


def token_credit_forward_step(cfg: RewardLossConfig, ref_logps: Optional[bool] = None, pairwise: bool = True):
    """Forward step that also returns per-token credits [n, S] aligned with ``response_mask``:
    Z for Q-RM/ORM; beta * (log pi - log pi_ref) for DPO-RM (needs ``batch['ref_logps']`` [n, S]).
    ``pairwise=False``: the rows are independent sequences (``qrm serve``), not chosen/rejected pairs, so
    only ``{"token_credits"}`` is returned (no pair loss or scores)."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model_forward(model, batch, with_labels=cfg.kind == "dpo")

        def loss_func(output_tensor):
            if cfg.kind == "dpo":
                credits = dpo_token_credits(-output_tensor.float(), batch["ref_logps"], batch["label_mask"],
                                            beta=cfg.dpo_beta)
            else:
                credits = output_tensor.squeeze(-1).float()
            if not pairwise:
                zero = torch.zeros((), device=credits.device)
                return zero, torch.zeros((), dtype=torch.int), {"token_credits": credits.detach()}
            res = pair_loss(cfg, output_tensor, batch)
            metrics = res.metrics()
            metrics.update(chosen_score=res.chosen_score, rejected_score=res.rejected_score, valid=res.valid,
                           index=batch["index"], token_credits=credits.detach())
            return res.loss_sum.detach(), res.num_valid.to(torch.int), metrics

        return output, loss_func

    return forward_step


def reference_logps_forward_step():
    """Forward step computing per-token reference log-probs [n, S] (policy role, forward only)."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model_forward(model, batch, with_labels=True)

        def loss_func(output_tensor):
            logps = -output_tensor.float().detach()
            sums = token_logprobs_sum(logps, batch["label_mask"])
            return torch.zeros((), device=logps.device), torch.zeros((), dtype=torch.int), {
                "ref_logps_sum": sums, "ref_logps": logps, "index": batch["index"]}

        return output, loss_func

    return forward_step
