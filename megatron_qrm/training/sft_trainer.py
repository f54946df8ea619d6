"""`qrm train-sft`: supervised fine-tuning of a policy on (instruction, response) pairs, next-token
loss on response tokens only (EOS included). From scratch (size flags + --tokenizer), from a base
model (--pretrained-checkpoint), or resumed (--load)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserFileNotFoundError
from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import check_parallel_layout
from megatron_qrm.data import pad_multiple_for
from megatron_qrm.data.packing import check_pack_capacity, pack_collated, packed_seq_params, rank_microbatches, unpack
from megatron_qrm.data.preference import collate_sequences
from megatron_qrm.data.sampler import GlobalBatchSampler
from megatron_qrm.data.sft import SFTDataConfig, SFTDataset
from megatron_qrm.models.logits import next_token_nll, real_vocab_size
from megatron_qrm.models.lora import is_lora_param
from megatron_qrm.training.engine import to_device
from megatron_qrm.training.run_config import SupervisedRunConfig
from megatron_qrm.training.supervised_setup import (
    build_supervised_model,
    load_run_tokenizer,
    resolve_model_and_tokenizer,
)
from megatron_qrm.training.loop import LoopConfig, fit
from megatron_qrm.training.metrics_log import MetricsLogger

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


def train_sft(cfg: SFTTrainConfig) -> dict[str, float]:
    cfg.optim.check()
    parallel.initialize(cfg.parallel)
    model_cfg, tokenizer_path, saved, saved_from = resolve_model_and_tokenizer(cfg)
    tokenizer, tokenizer_change = load_run_tokenizer(cfg, model_cfg, tokenizer_path, saved, saved_from)
    check_parallel_layout(model_cfg, cfg.parallel, dist.get_world_size())
    logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=parallel.is_rank0(), tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                           total_steps=cfg.train_iters, desc="train-sft", run_config={"model": model_cfg.to_dict()},
                           supersede_after_start=True)
    dataset = SFTDataset(cfg.data, tokenizer)
    logger.message(f"data {cfg.data.path}: {dataset.stats}")
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    sampler = GlobalBatchSampler(len(dataset), cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp_size,
                                 seed=cfg.parallel.seed, shuffle=cfg.shuffle)
    check_pack_capacity(cfg.pack_capacity(), int(dataset.sequence_lengths().max()),
                        "example of --train-data ({longest} tokens)")
    pad_multiple = pad_multiple_for(cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel)

    # pre-flight: --save / --log-dir writable, room for one checkpoint (before any model is built)
    checkpointing.preflight_save_dir(cfg.save, "--save", checkpointing.estimate_checkpoint_bytes(
        model_cfg, "policy", lora_rank=cfg.lora.rank, bf16=cfg.optim.bf16))
    checkpointing.preflight_save_dir(cfg.log_dir, "--log-dir")
    built = build_supervised_model(cfg, model_cfg, "policy", logger)
    cfg, ddp, optimizer, scheduler = built.cfg, built.ddp, built.optimizer, built.scheduler

    state = checkpointing.TrainState()
    resume_dir = checkpointing.resolve_checkpoint(cfg.load) if cfg.load else None
    if cfg.load and resume_dir is None and not cfg.pretrained_checkpoint and cfg.load != cfg.save:
        raise UserFileNotFoundError(f"--load {cfg.load}: no complete checkpoint there")
    if resume_dir:
        _, loaded = checkpointing.load_checkpoint(resume_dir, ddp, optimizer=optimizer, scheduler=scheduler)
        state = loaded or state
        logger.message(f"resumed from {resume_dir} at iteration {state.iteration}")
    elif cfg.pretrained_checkpoint:
        checkpointing.load_checkpoint(cfg.pretrained_checkpoint, ddp, load_rng=False,
                                      model_key_filter=lambda k: not is_lora_param(k))
    ckpt_config = {"kind": "policy", "role": "policy", "model": model_cfg.to_dict(),
                   "tokenizer": os.path.abspath(tokenizer_path) if os.path.exists(tokenizer_path) else tokenizer_path,
                   "lora": dataclasses.asdict(cfg.lora), "chat_template": cfg.data.chat_template,
                   "seq_length": cfg.data.seq_length,
                   **checkpointing.tokenizer_record(tokenizer, tokenizer_path, saved, tokenizer_change)}

    def save() -> None:
        if cfg.save:
            path = checkpointing.save_checkpoint(cfg.save, state.iteration, ddp, ckpt_config, optimizer=optimizer,
                                                 scheduler=scheduler, train_state=state, keep_last=cfg.keep_last)
            logger.message(f"saved checkpoint {path}")

    example_tokens = dataset.sequence_lengths()  # [N]
    capacity = cfg.pack_capacity()

    def microbatches(consumed: int) -> list[dict]:
        # packed, length-grouped or (neither) the rank's contiguous slice, as GlobalBatchSampler.microbatches
        batch = sampler.global_batch(consumed)
        groups = rank_microbatches(batch, example_tokens[batch], micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,
                                   dp_size=dp_size, pack_capacity=capacity, group_by_length_=cfg.group_by_length)
        out = []
        for idx in groups:
            prompts, responses = zip(*(dataset.example(i) for i in idx))
            if capacity is None:
                out.append(collate_sequences(prompts, responses, tokenizer.pad_id, pad_multiple))
            else:
                out.append(pack_collated(collate_sequences(prompts, responses, tokenizer.pad_id, 1),
                                         tokenizer.pad_id, pad_multiple))
        return out

    def summarize(s: dict[str, float]) -> dict[str, float]:
        n = max(s["tokens"], 1.0)
        return {"loss": s["loss_sum"] / n, "frac_p_above_half": s["confident"] / n, "response_tokens": s["tokens"]}

    logger.start_step = state.iteration
    last = fit(ddp, optimizer, scheduler, cfg=LoopConfig(cfg.train_iters, cfg.global_batch_size, cfg.log_interval,
                                                          cfg.save_interval, cfg.exit_interval,
                                                          max_nonfinite_steps=cfg.max_nonfinite_steps),
               state=state, microbatches=microbatches, forward_step=sft_forward_step, metric_names=METRICS,
               count_name="tokens", summarize=summarize, save=save, logger=logger, epoch_of=sampler.epoch_of)
    logger.close()
    return last
