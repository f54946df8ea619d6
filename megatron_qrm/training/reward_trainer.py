"""`qrm train-rm`: train a Q-RM (or an ORM / DPO-RM baseline) on preference pairs.

What differs from the other supervised command (:class:`RewardModelTask` for
:func:`~megatron_qrm.training.runner.run_supervised`, which does the rest): preference pairs as samples (a
pair is never split; packed pairs may compute their prompt once), a token head (DPO-RM: the LM head), the
pairwise losses of :mod:`megatron_qrm.rewards.scoring`, and DPO-RM's reference log-probs, computed once
before the first update and saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset
from megatron_qrm.data.packing import check_pack_capacity, plan_microbatches
from megatron_qrm.data.preference import pair_microbatch
from megatron_qrm.errors import UserError
from megatron_qrm.models.packing_support import resolve_shared_prompts
from megatron_qrm.rewards.scoring import (
    METRIC_NAMES,
    RewardLossConfig,
    reference_logps_forward_step,
    train_forward_step,
)
from megatron_qrm.training.checkpoint_record import checkpoint_record
from megatron_qrm.training.engine import run_global_batch
from megatron_qrm.training.metrics_log import MetricsLogger
from megatron_qrm.training.run_config import SupervisedRunConfig
from megatron_qrm.training.runner import RunTokenizer, SupervisedTask, run_supervised

log = logging.getLogger("megatron_qrm")
DPO_REFERENCE_FILE = "dpo_reference_logps.pt"


@dataclass(kw_only=True)
class RewardTrainConfig(SupervisedRunConfig):
    data: PreferenceDataConfig
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    micro_batch_size: int = 2  # pairs
    global_batch_size: int = 2  # pairs
    # packed pairs compute their prompt once (a prefix tree); None: when packing is on and the attention can
    pack_shared_prompts: Optional[bool] = None

    sequences_per_sample: ClassVar[int] = 2


def _dp_info() -> tuple[int, int]:
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def compute_reference_logps(model, dataset: PreferenceDataset, micro_batch_size: int, pad_id: int,
                            pad_multiple: int, logger: MetricsLogger, pack_capacity: Optional[int] = None,
                            share_prompts: bool = False) -> Optional[torch.Tensor]:
    """Sum of reference log-probs over each response, [N, 2] (chosen, rejected), on the last stage.

    The reference is the model as it is now (before any update): DPO-RM starts from it. Pairs are
    split across data-parallel ranks and summed back.
    """
    dp_rank, dp_size = _dp_info()
    n = len(dataset)
    sums = torch.zeros(n, 2, dtype=torch.float64)
    mine = list(range(dp_rank, n, dp_size))
    if pack_capacity:  # packed micro-batches of this rank's pairs
        sizes = dataset.pair_tokens(share_prompts)[mine]
        chunks = [[mine[j] for j in mb] for mb in plan_microbatches(sizes.tolist(), pack_capacity)]
    else:
        chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    # every DP rank must run the same number of schedule passes (collectives inside)
    steps = torch.tensor([len(chunks)])
    parallel.all_reduce_host(steps, op=dist.ReduceOp.MAX)
    model.eval()
    logger.message(f"DPO-RM: computing reference log-probs for {n} pairs")
    with torch.no_grad():
        for s in range(int(steps)):
            idx = chunks[s] if s < len(chunks) else chunks[0][:1] if chunks else [0]
            mb = pair_microbatch(dataset, idx, pad_id, pad_multiple, pack=bool(pack_capacity),
                                 share_prompts=share_prompts)
            outs = run_global_batch(model, reference_logps_forward_step(), [mb], forward_only=True)
            if s < len(chunks):
                for out in outs:
                    b = out["index"].numel()
                    r = out["ref_logps_sum"].double().cpu()
                    sums[out["index"].cpu(), 0] = r[:b]
                    sums[out["index"].cpu(), 1] = r[b:]
    model.train()
    if ps.is_pipeline_last_stage():
        parallel.all_reduce_host(sums, group=ps.get_data_parallel_group())
        return sums.float()
    return None


class RewardModelTask(SupervisedTask):
    """train-rm's dataset (preference pairs), head (a token head; DPO-RM: the LM head) and loss."""

    command = "train-rm"
    metric_names = METRIC_NAMES
    count_name = "num_valid"  # a global batch without a valid pair takes no optimizer step (as the reference)

    def __init__(self, cfg: RewardTrainConfig) -> None:
        self.loss = cfg.loss
        self.role = cfg.loss.role
        self.memory_plan_sequences = 2 if self.role == "policy" else 1  # DPO-RM: the LM over both sequences
        self.dataset: Optional[PreferenceDataset] = None
        self.share_prompts = False  # pack each pair's prompt once (decided with the model, `configure`)
        self.ref_sums: Optional[torch.Tensor] = None  # DPO-RM: [N, 2] reference log-prob sums

    def describe(self) -> str:
        return f"train-rm ({self.loss.kind})"

    def run_config(self, cfg, model_cfg) -> dict[str, Any]:
        return {"model": model_cfg.to_dict(), "loss": dataclasses.asdict(self.loss)}

    def check_resume(self, cfg, saved) -> None:
        if saved and cfg.load and saved.get("reward_loss", {}).get("kind", self.loss.kind) != self.loss.kind:
            raise UserError(f"--load {cfg.load} was trained with --reward-loss {saved['reward_loss']['kind']}, "
                             f"not {self.loss.kind}")

    def build_dataset(self, cfg, tokenizer, logger) -> PreferenceDataset:
        self.dataset = PreferenceDataset(cfg.data, tokenizer)
        logger.message(f"data {cfg.data.path}: {self.dataset.stats}")
        if len(self.dataset) == 0:
            raise UserError(f"--train-data {cfg.data.path}: no usable preference pairs ({self.dataset.stats})")
        return self.dataset

    def sample_tokens(self) -> np.ndarray:
        return self.dataset.pair_tokens(self.share_prompts)  # [N] tokens each pair costs in a packed micro-batch

    def check_capacity(self, cfg) -> None:
        resolve_shared_prompts(cfg.pack_shared_prompts, cfg.pack_capacity() is not None)  # contradicting flags
        # shared prompts (unless turned off) make pairs shorter; if they turn out unsupported, checked again
        check_pack_capacity(cfg.pack_capacity(), int(self.dataset.pair_tokens(cfg.pack_shared_prompts is not False)
                                                      .max()),
                            "pair of --train-data ({longest} tokens, chosen + rejected"
                            f"{'' if cfg.pack_shared_prompts is False else ' less the shared prompt'})")

    def configure(self, cfg, model, logger) -> None:
        self.share_prompts, no_tree = resolve_shared_prompts(cfg.pack_shared_prompts, cfg.pack_capacity() is not None,
                                                             [model])
        if no_tree:
            logger.message(f"shared-prompt packing off: {no_tree}")
            check_pack_capacity(cfg.pack_capacity(), int(self.dataset.pair_tokens().max()),
                                "pair of --train-data ({longest} tokens, chosen + rejected)")

    def prepare(self, cfg, ddp, resume_dir, pad_id, pad_multiple, logger) -> None:
        if resume_dir:
            self.ref_sums = checkpointing.load_extra_file(resume_dir, DPO_REFERENCE_FILE)
        # DPO-RM's reference is the model before any update; a resumed run reads it back (last stage only)
        if self.loss.kind == "dpo" and self.ref_sums is None and not (resume_dir and not ps.is_pipeline_last_stage()):
            self.ref_sums = compute_reference_logps(ddp, self.dataset, cfg.micro_batch_size, pad_id, pad_multiple,
                                                    logger, pack_capacity=cfg.pack_capacity(),
                                                    share_prompts=self.share_prompts)

    def extra_files(self) -> Optional[dict[str, Any]]:
        return {DPO_REFERENCE_FILE: self.ref_sums} if self.ref_sums is not None else None

    def batching_note(self) -> str:
        return ", each prompt once" if self.share_prompts else ""

    def microbatch(self, indices, pad_id, pad_multiple, pack) -> dict:
        return pair_microbatch(self.dataset, indices, pad_id, pad_multiple, pack=pack,
                               share_prompts=self.share_prompts, ref_sums=self.ref_sums)

    def forward_step(self, cfg):
        return train_forward_step(self.loss)

    def summarize(self, s: dict[str, float]) -> dict[str, float]:
        n = max(s["num_valid"], 1.0)
        return {"loss": s["loss_sum"] / n, "accuracy": s["correct"] / n, "chosen_score": s["chosen_score_sum"] / n,
                "rejected_score": s["rejected_score_sum"] / n,
                "margin": (s["chosen_score_sum"] - s["rejected_score_sum"]) / n, "valid_pairs": s["num_valid"]}

    def checkpoint_record(self, cfg, model_cfg, tok: RunTokenizer) -> dict:
        return checkpoint_record(
            "reward_model", self.role, model_cfg, tokenizer=tok.tokenizer, tokenizer_path=tok.path,
            inherited=tok.saved, tokenizer_change=tok.change, lora=cfg.lora, chat_template=cfg.data.chat_template,
            seq_length=cfg.data.seq_length, reward_loss=cfg.loss,
            data={k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "path"},
            # a full fine-tuned DPO-RM's reference policy (eval-rm's default --reference-checkpoint)
            pretrained_checkpoint=os.path.abspath(cfg.pretrained_checkpoint) if cfg.pretrained_checkpoint else None)


def train_reward_model(cfg: RewardTrainConfig) -> dict[str, float]:
    """``qrm train-rm``: the last logged values (loss, accuracy, scores, margin, ...)."""
    return run_supervised(cfg, RewardModelTask(cfg))
