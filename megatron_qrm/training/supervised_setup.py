"""What the supervised trainers (`qrm train-rm`, `qrm train-sft`) do alike before their loops.

:func:`resolve_model_and_tokenizer`: the model size and tokenizer from the flags, else from the checkpoint
being resumed (``--load``) or started from (``--pretrained-checkpoint``), size flags that contradict it refused.
:func:`load_run_tokenizer`: the tokenizer, checked against the model's vocabulary and the checkpoint's
tokenizer, and the chat template it implies. :func:`build_supervised_model`: the memory plan runs first (on a GPU it refuses a layout that cannot fit, before any weight is allocated);
then this rank's model, the packing check (a model whose attention cannot take packed sequences turns
packing off, with a log line), megatron-core's DDP wrapper and optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.distributed as dist

from megatron_qrm.errors import UserError
from megatron_qrm import checkpointing
from megatron_qrm.config import ModelConfig
from megatron_qrm.data import load_tokenizer
from megatron_qrm.data.chat import resolve_chat_template
from megatron_qrm.models.packing_support import unsupported_reason
from megatron_qrm.data.tokenizer import check_tokenizer_identity
from megatron_qrm.models import PrecisionConfig, build_model, count_parameters
from megatron_qrm.planning import check_fits
from megatron_qrm.training.engine import build_optimizer, wrap_ddp
from megatron_qrm.training.run_config import SupervisedRunConfig


def resolve_model_and_tokenizer(cfg: SupervisedRunConfig) -> tuple[ModelConfig, str, Optional[dict], Optional[str]]:
    """(model config, tokenizer path, the checkpoint's recorded config or None, that checkpoint's path)."""
    saved = saved_from = None
    for flag, path in (("--load", cfg.load), ("--pretrained-checkpoint", cfg.pretrained_checkpoint)):
        if path and checkpointing.resolve_checkpoint(path):
            saved, saved_from = checkpointing.read_config(path), path
            if cfg.model is not None:  # size flags that contradict the checkpoint: fail before any model
                checkpointing.check_size_flags(cfg.model, saved, f"{flag} {path}")
                if not cfg.model.vocab_size:  # the checkpoint's embedding rows, whatever the tokenizer
                    cfg.model.vocab_size = int(saved["model"].get("vocab_size") or 0)
            break
    model_cfg = cfg.model or (ModelConfig.from_dict(saved["model"]) if saved else None)
    if model_cfg is None:
        raise UserError("no model size given: pass --model PRESET or --num-layers/--hidden-size/... , "
                        "or --load / --pretrained-checkpoint a checkpoint that records it")
    tokenizer = cfg.tokenizer or (saved or {}).get("tokenizer")
    if not tokenizer:
        raise UserError("--tokenizer is required (HF tokenizer directory or SentencePiece .model)")
    return model_cfg, tokenizer, saved, saved_from


def load_run_tokenizer(cfg: SupervisedRunConfig, model_cfg: ModelConfig, tokenizer_path: str,
                       saved: Optional[dict], saved_from: Optional[str]):
    """(tokenizer, the recorded tokenizer change or None). Sets ``model_cfg.vocab_size`` when unknown and
    ``cfg.data.chat_template`` to the template in use (the flag's, else the tokenizer's / checkpoint's)."""
    tokenizer = load_tokenizer(tokenizer_path)
    if model_cfg.vocab_size == 0:
        model_cfg.vocab_size = tokenizer.vocab_size
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but the model's "
                        f"vocabulary is {model_cfg.vocab_size} (--vocab-size)")
    tokenizer_change = None
    if saved:
        tokenizer_change = check_tokenizer_identity(saved, tokenizer, tokenizer_path, checkpoint=saved_from,
                                                    model_vocab_size=model_cfg.vocab_size,
                                                    allow_change=cfg.allow_tokenizer_change)
    cfg.data = dataclasses.replace(cfg.data, chat_template=resolve_chat_template(cfg.data.chat_template, tokenizer,
                                                                                 saved))
    return tokenizer, tokenizer_change


@dataclasses.dataclass
class SupervisedModel:
    cfg: SupervisedRunConfig  # the run config, with pack_sequences off when the model cannot pack
    model: Any  # this rank's GPTModel stage
    ddp: Any  # megatron-core DistributedDataParallel around it
    optimizer: Any
    scheduler: Any


def build_supervised_model(cfg: SupervisedRunConfig, model_cfg, role: str, logger, *,
                           sequences_per_sample: int = 1) -> SupervisedModel:
    """``role``: 'reward' (token head) or 'policy' (LM head). ``sequences_per_sample``: sequences the model
    runs per sample of ``--micro-batch-size`` (2 for DPO-RM's pairs), for the memory plan."""
    p = cfg.parallel
    check_fits(model_cfg, role, tensor_parallel=p.tensor_model_parallel_size,
               pipeline_parallel=p.pipeline_model_parallel_size, world_size=dist.get_world_size(),
               micro_batch_size=cfg.micro_batch_size * sequences_per_sample,
               global_batch_size=cfg.global_batch_size * sequences_per_sample, seq_length=cfg.data.seq_length,
               lora_rank=cfg.lora.rank, bf16=cfg.optim.bf16, sequence_parallel=p.sequence_parallel,
               recompute_granularity=cfg.recompute_granularity, transformer_impl=cfg.transformer_impl,
               distributed_optimizer=cfg.optim.use_distributed_optimizer, skip=cfg.skip_memory_check)
    model = build_model(model_cfg, role, precision=PrecisionConfig(bf16=cfg.optim.bf16), lora=cfg.lora,
                        sequence_parallel=p.sequence_parallel, transformer_impl=cfg.transformer_impl, seed=p.seed,
                        recompute_granularity=cfg.recompute_granularity,
                        recompute_num_layers=cfg.recompute_num_layers, local_attention=cfg.local_attention)
    if cfg.pack_sequences and unsupported_reason(model):
        logger.message(f"sequence packing off: {unsupported_reason(model)}")
        cfg = dataclasses.replace(cfg, pack_sequences=False)
    total, trainable = count_parameters(model)
    logger.message(f"model: role={role} layer spec={model.transformer_impl} params (this rank)={total:,} "
                   f"trainable={trainable:,} lora_rank={cfg.lora.rank}")
    ddp = wrap_ddp(model, cfg.optim)
    optimizer, scheduler = build_optimizer(ddp, cfg.optim, cfg.train_iters)
    return SupervisedModel(cfg, model, ddp, optimizer, scheduler)
