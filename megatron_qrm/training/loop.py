"""The training loop every supervised trainer shares (reward models, SFT): global batches through
megatron-core's schedule, one optimizer step each, metrics, checkpoints, exit interval.

A step whose loss or gradients are not finite is skipped (no optimizer or scheduler step; logged with
``skipped: 1``); ``max_nonfinite_steps`` of them in a row stop the run with
:class:`~megatron_qrm.errors.NonFiniteError` before anything is saved (see
:class:`~megatron_qrm.training.engine.NonFiniteGuard`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.training.engine import NonFiniteGuard
from megatron_qrm.training.metrics_log import MetricsLogger
from megatron_qrm.training.step import optimizer_step


@dataclass
class LoopConfig:
    train_iters: int
    global_batch_size: int  # samples per optimizer step (pairs for RMs, examples for SFT)
    log_interval: int = 1
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    max_nonfinite_steps: int = 3  # skipped non-finite steps in a row before the run stops
    loss_name: str = "loss_sum"  # the metric sum whose finiteness decides (with the gradients) a step


def fit(ddp, optimizer, scheduler, *, cfg: LoopConfig, state: checkpointing.TrainState,
        microbatches: Callable[[int], list[dict]], forward_step, metric_names: tuple[str, ...],
        count_name: str, summarize: Callable[[dict[str, float]], dict[str, float]],
        save: Callable[[], None], logger: MetricsLogger, epoch_of: Callable[[int], float]) -> dict[str, float]:
    """Train until ``cfg.train_iters``. ``microbatches(consumed_samples)`` gives this rank's micro-batches
    of the next global batch; ``summarize(sums)`` turns the metric sums (over micro-batches and ranks)
    into logged values. A global batch whose ``count_name`` sum is 0 (nothing to learn from) takes no
    optimizer step. Saves at ``save_interval``, at ``exit_interval`` (then returns) and at the end."""
    last: dict[str, float] = {}
    saved_at = state.iteration
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, what="iteration")
    ddp.train()
    while state.iteration < cfg.train_iters:
        t0 = time.time()
        micro = microbatches(state.consumed_samples)
        step = optimizer_step(ddp, optimizer, scheduler, forward_step=forward_step, microbatches=micro,
                              metric_names=metric_names, guard=guard, step=state.iteration + 1,
                              loss_name=cfg.loss_name, count_name=count_name)
        sums = step.sums
        skipped = float(not step.stepped and sums[count_name] > 0)
        state.iteration += 1
        state.consumed_samples += cfg.global_batch_size
        elapsed = time.time() - t0
        tokens = torch.tensor(float(sum(mb["tokens"].numel() for mb in micro)))
        parallel.all_reduce_host(tokens, group=ps.get_data_parallel_group())
        last = dict(summarize(sums), grad_norm=step.grad_norm,
                    lr=float(optimizer.param_groups[0]["lr"]), tokens_per_s=float(tokens) / max(elapsed, 1e-9),
                    step_time_s=elapsed, epoch=epoch_of(state.consumed_samples), skipped=skipped)
        if state.iteration % cfg.log_interval == 0 or state.iteration == cfg.train_iters:
            logger.log(state.iteration, last)
        stop = bool(cfg.exit_interval) and state.iteration % cfg.exit_interval == 0
        if (cfg.save_interval and state.iteration % cfg.save_interval == 0) or stop:
            guard.probe_outputs(state.iteration, ddp, forward_step, micro[0], metric_names)
            saved_at = _save_unless_diverging(save, guard, state.iteration, saved_at, logger)
        if stop and state.iteration < cfg.train_iters:
            logger.message(f"exit interval reached at iteration {state.iteration}")
            return last
    if saved_at != state.iteration:
        guard.probe_outputs(state.iteration, ddp, forward_step, micro[0], metric_names, final=True)
        _save_unless_diverging(save, guard, state.iteration, saved_at, logger)
    return last


def _save_unless_diverging(save: Callable[[], None], guard: NonFiniteGuard, iteration: int, saved_at: int,
                           logger: MetricsLogger) -> int:
    """Save, unless the model's latest loss was not finite: weights can be finite yet give NaN losses (after
    a huge update), and such a model never becomes ``latest``. (A step skipped for NaN gradients under a
    finite loss left the weights as they were: they are saved.) Returns the newest checkpoint's iteration."""
    if not guard.last_loss_finite:
        logger.message(f"iteration {iteration}: not saving: the model's loss is not finite (since iteration "
                       f"{guard.first_bad}); `latest` keeps the previous checkpoint")
        return saved_at
    save()
    return iteration
