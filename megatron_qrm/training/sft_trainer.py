"""`qrm train-sft`: supervised fine-tuning of a policy on (instruction, response) pairs, next-token
loss on response tokens only (EOS included). From scratch (size flags + --tokenizer), from a base
model (--pretrained-checkpoint), or resumed (--load).

What differs from the other supervised command (:class:`SFTTask` for
:func:`~megatron_qrm.training.runner.run_supervised`, which does the rest): examples as samples, the LM
head, and the per-token cross-entropy of :func:`sft_forward_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_qrm.data.packing import check_pack_capacity, packed_seq_params, unpack
from megatron_qrm.data.sft import SFTDataConfig, SFTDataset, example_microbatch
from megatron_qrm.models.logits import next_token_nll, real_vocab_size
from megatron_qrm.training.checkpoint_record import checkpoint_record
from megatron_qrm.training.engine import to_device
from megatron_qrm.training.run_config import SupervisedRunConfig
from megatron_qrm.training.runner import RunTokenizer, SupervisedTask, run_supervised

METRICS = ("loss_sum", "tokens", "confident")


@dataclass(kw_only=True)
class SFTTrainConfig(SupervisedRunConfig):
    data: SFTDataConfig
    micro_batch_size: int = 4
    global_batch_size: int = 16


def sft_forward_step(data_iterator, model):
    """Per-token cross-entropy of the next token (vocab-parallel), summed over response positions."""
    batch = to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                   packed_seq_params=packed_seq_params(batch))
    vocab = real_vocab_size(model)

    def loss_func(logits):
        ce = unpack(next_token_nll(logits, batch["labels"], vocab), batch)  # [N, S] (a packed batch: gathered)
        mask = batch["label_mask"]
        loss_sum = (ce.float() * mask).sum()
        count = mask.sum()
        return loss_sum, count.to(torch.int), {"loss_sum": loss_sum.detach(), "tokens": count.detach(),
                                               "confident": ((ce.detach() < 0.6931) * mask).sum()}  # p(next) > 1/2

    return output, loss_func


class SFTTask(SupervisedTask):
    """train-sft's dataset (instruction/response examples), head (the LM head) and loss (next-token CE)."""

    command = "train-sft"
    role = "policy"
    metric_names = METRICS
    count_name = "tokens"  # a global batch without a response token takes no optimizer step

    def __init__(self) -> None:
        self.dataset: Optional[SFTDataset] = None

    def build_dataset(self, cfg, tokenizer, logger) -> SFTDataset:
        self.dataset = SFTDataset(cfg.data, tokenizer)
        logger.message(f"data {cfg.data.path}: {self.dataset.stats}")
        return self.dataset

    def sample_tokens(self) -> np.ndarray:
        return self.dataset.sequence_lengths()  # [N]

    def check_capacity(self, cfg) -> None:
        check_pack_capacity(cfg.pack_capacity(), int(self.dataset.sequence_lengths().max()),
                            "example of --train-data ({longest} tokens)")

    def microbatch(self, indices, pad_id, pad_multiple, pack) -> dict:
        return example_microbatch(self.dataset, indices, pad_id, pad_multiple, pack=pack)

    def forward_step(self, cfg):
        return sft_forward_step

    def summarize(self, s: dict[str, float]) -> dict[str, float]:
        n = max(s["tokens"], 1.0)
        return {"loss": s["loss_sum"] / n, "frac_p_above_half": s["confident"] / n, "response_tokens": s["tokens"]}

    def checkpoint_record(self, cfg, model_cfg, tok: RunTokenizer) -> dict:
        return checkpoint_record("policy", "policy", model_cfg, tokenizer=tok.tokenizer, tokenizer_path=tok.path,
                                 inherited=tok.saved, tokenizer_change=tok.change, lora=cfg.lora,
                                 chat_template=cfg.data.chat_template, seq_length=cfg.data.seq_length)


def train_sft(cfg: SFTTrainConfig) -> dict[str, float]:
    """``qrm train-sft``: the last logged values (loss, frac_p_above_half, response_tokens, ...)."""
    return run_supervised(cfg, SFTTask())
