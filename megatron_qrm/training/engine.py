"""Shared pieces of every trainer: DDP + (distributed) optimizer + LR schedule, running one global
batch through megatron-core's forward-backward schedule, and reducing metrics across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_iters: Optional[int] = None  # default: --train-iters
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    use_distributed_optimizer: bool = True
    bf16: bool = False


def wrap_ddp(model: torch.nn.Module, opt: OptimConfig) -> DistributedDataParallel:
    """Megatron DDP: contiguous grad buffers, grads reduced across data-parallel ranks."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=opt.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    # the schedule needs these to sync grads and to sum per-pair losses across micro-batches/ranks
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build_optimizer(ddp_model, opt: OptimConfig, train_iters: int):
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=opt.bf16,
        params_dtype=torch.bfloat16 if opt.bf16 else torch.float32,
        use_distributed_optimizer=opt.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    ddp_model.config.grad_scale_func = optimizer.scale_loss
    decay_iters = opt.lr_decay_iters or max(train_iters, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_iters > 0 else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, opt.lr_warmup_iters + 1),
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def run_global_batch(model, forward_step: Callable, microbatches: list, *, forward_only: bool) -> list:
    """One pass of megatron-core's schedule (1F1B under PP) over ``microbatches`` (each a dict of
    tensors with a ``tokens`` [n, S] entry). Returns the per-micro-batch outputs of the loss function
    (last pipeline stage; empty elsewhere)."""
    seq_len = max(mb["tokens"].shape[1] for mb in microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def reduce_metric_sums(outputs: list, names: Iterable[str]) -> dict[str, float]:
    """Sum per-micro-batch metric tensors over micro-batches, data-parallel ranks and hand them from
    the last pipeline stage to every rank (so rank 0 can log). Keys missing -> 0."""
    names = list(names)
    total = torch.zeros(len(names), dtype=torch.float64)
    for out in outputs:
        total += torch.stack([out[n].detach().double().cpu().reshape(()) if n in out else torch.zeros((), dtype=torch.float64) for n in names])
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = total.to(dev)
    if ps.is_pipeline_last_stage():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(total, src=last, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, total.cpu().tolist()))


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
