"""Model, DDP and optimizer of a supervised trainer (`qrm train-rm`, `qrm train-sft`), built the same way.

The memory plan runs first (on a GPU it refuses a layout that cannot fit, before any weight is allocated);
then this rank's model, the packing check (a model whose attention cannot take packed sequences turns
packing off, with a log line), megatron-core's DDP wrapper and optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

from megatron_qrm.data.packing import unsupported_reason
from megatron_qrm.models import PrecisionConfig, build_model, count_parameters
from megatron_qrm.planning import check_fits
from megatron_qrm.training.engine import build_optimizer, wrap_ddp
from megatron_qrm.training.run_config import SupervisedRunConfig


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
