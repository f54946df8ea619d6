"""A loaded reward checkpoint that scores batches of sequences on every rank of a TP x PP layout.

Rank 0 serves HTTP and calls :meth:`RewardScorer.score`; it broadcasts each batch (token ids) to the
other ranks, which wait in :meth:`RewardScorer.follow`, and every rank runs the same megatron-core forward
schedule. The credits live on the last pipeline stage; with PP > 1 its tensor-parallel rank 0 sends them
to rank 0 over the pipeline group. :meth:`RewardScorer.stop` releases the followers.

Credits are computed exactly as ``qrm eval-rm`` computes them (same checkpoint loading, same collation,
same forward step): the value head's ``Z`` per response token for a Q-RM / ORM, ``beta * (log pi - log
pi_ref)`` per response token for a DPO-RM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserError
from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import ModelConfig, ParallelConfig, check_parallel_layout
from megatron_qrm.data import load_tokenizer, pad_multiple_for
from megatron_qrm.data.preference import collate_sequences
from megatron_qrm.rewards.scoring import RewardLossConfig, token_credit_forward_step
from megatron_qrm.serving.encoding import EncodedItem, RequestEncoder
from megatron_qrm.training.engine import run_global_batch

log = logging.getLogger("megatron_qrm")


@dataclass
class ScorerConfig:
    load: str
    tokenizer: Optional[str] = None
    reference_checkpoint: Optional[str] = None
    parallel: ParallelConfig = None  # type: ignore[assignment]
    bf16: bool = False
    max_batch_tokens: int = 8192  # padded tokens (rows x padded length) of one forward micro-batch


def sequence_score(kind: str, credits: np.ndarray) -> float:
    """The checkpoint's own sequence score from its response-token credits [T]: the mean (Q-RM), the
    last token's (ORM: the EOS unless truncated), the sum (DPO-RM: beta * log-ratio of the response)."""
    if credits.size == 0:
        return float("nan")
    if kind == "orm":
        return float(credits[-1])
    if kind == "dpo":
        return float(credits.sum())
    return float(credits.mean())


def length_groups(lengths: Sequence[int], max_batch_tokens: int, pad_multiple: int) -> list[list[int]]:
    """Indices grouped for forward passes: sorted by length, each group's rows x padded length within
    ``max_batch_tokens`` (a longer single row is a group of its own). Rows of similar length share a group,
    so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        padded = math.ceil(lengths[i] / pad_multiple) * pad_multiple
        if cur and padded * (len(cur) + 1) > max_batch_tokens:  # sorted: this row is the longest so far
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


class RewardScorer:
    """A reward checkpoint loaded on this rank's share of the layout (see the module docstring)."""

    def __init__(self, cfg: ScorerConfig):
        self.cfg = cfg
        par = cfg.parallel or ParallelConfig()
        parallel.initialize(par)
        # resolve `latest` once: the config, the weights and /health all name this one directory
        self.checkpoint = checkpointing.resolve_or_fail(cfg.load, "--load")
        saved = checkpointing.read_config(self.checkpoint)
        model_cfg = ModelConfig.from_dict(saved["model"])
        world = dist.get_world_size()
        check_parallel_layout(model_cfg, par, world)
        if world != par.tensor_model_parallel_size * par.pipeline_model_parallel_size:
            raise UserError(f"qrm serve runs one model replica: the world size {world} must equal "
                            f"--tensor-model-parallel-size x --pipeline-model-parallel-size "
                            f"({par.tensor_model_parallel_size} x {par.pipeline_model_parallel_size}); "
                            "run one server per replica for data parallelism")
        if cfg.max_batch_tokens < 1:
            raise UserError(f"--max-batch-tokens must be positive, got {cfg.max_batch_tokens}")
        self.loss_cfg = RewardLossConfig(**saved.get("reward_loss", {}))
        tokenizer_path = cfg.tokenizer or saved.get("tokenizer")
        if not tokenizer_path:
            raise UserError("--tokenizer is required: the checkpoint does not record one")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self._check_tokenizer(saved, tokenizer_path)
        self.seq_length = int(saved.get("seq_length") or model_cfg.max_position_embeddings)
        self.encoder = RequestEncoder(self.tokenizer, self.seq_length, bool(saved.get("chat_template", False)))
        from megatron_qrm.evaluation.rm_eval import load_reward_models

        self.model, self.reference = load_reward_models(self.checkpoint, saved, model_cfg, self.loss_cfg, par, cfg.bf16,
                                                        cfg.reference_checkpoint)
        self.pad_multiple = pad_multiple_for(par.tensor_model_parallel_size, par.sequence_parallel)
        self._step = token_credit_forward_step(self.loss_cfg, pairwise=False)
        self.kind = self.loss_cfg.kind

    def _check_tokenizer(self, saved: dict, path: str) -> None:
        """The tokenizer must be the one the checkpoint was trained with (when the check exists)."""
        from megatron_qrm.data import tokenizer as tokenizer_module

        check = getattr(tokenizer_module, "check_tokenizer_identity", None)
        if check is not None:
            check(saved, self.tokenizer, path, checkpoint=self.checkpoint, flag="--tokenizer")

    # ---------------------------------------------------------------- rank 0
    def score(self, items: Sequence[EncodedItem]) -> list[np.ndarray]:
        """Credits of each item's response tokens: a float64 array [len(item.response_ids)] per item.
        Rank 0 only; the other ranks must be in :meth:`follow`."""
        rows = [(it.prompt_ids, it.response_ids) for it in items]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list([rows], src=0)
        return self._forward(rows)

    def stop(self) -> None:
        """Release the ranks waiting in :meth:`follow` (rank 0, after the last batch)."""
        if dist.get_world_size() > 1:
            dist.broadcast_object_list([None], src=0)

    # ---------------------------------------------------------------- other ranks
    def follow(self) -> None:
        """Run rank 0's batches until it stops (ranks other than 0)."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            self._forward(box[0])

    # ---------------------------------------------------------------- every rank
    def _forward(self, rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Forward passes over length groups of ``rows``; the credits reach rank 0 (empty list elsewhere)."""
        credits: list[Optional[np.ndarray]] = [None] * len(rows)
        last_stage = ps.is_pipeline_last_stage()
        groups = length_groups([len(p) + len(r) for p, r in rows], self.cfg.max_batch_tokens, self.pad_multiple)
        with torch.no_grad():
            for group in groups:
                batch = collate_sequences([rows[i][0] for i in group], [rows[i][1] for i in group],
                                          self.tokenizer.pad_id, self.pad_multiple)
                batch["index"] = torch.arange(len(group))  # the forward steps pass it through
                if self.kind == "dpo":
                    from megatron_qrm.evaluation.rm_eval import _reference_logps

                    batch.update(_reference_logps(self.model, self.reference, batch))
                outs = run_global_batch(self.model, self._step, [batch], forward_only=True)
                if last_stage:
                    z = outs[0]["token_credits"].double().cpu()  # [n, S]
                    mask = batch["response_mask"].bool()
                    ragged = torch.split(z[mask], mask.sum(1).tolist())  # row-major: row j's response tokens
                    for i, c in zip(group, ragged):
                        credits[i] = c.numpy()
        if ps.get_pipeline_model_parallel_world_size() > 1 and ps.get_tensor_model_parallel_rank() == 0:
            box = [credits]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            credits = box[0]
        return credits if dist.get_rank() == 0 else []
