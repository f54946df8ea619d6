"""One optimizer step over a global batch: the function every trainer shares (reward models, SFT, the RL
actor and critic).

Zero the gradient buffers, run the micro-batches through megatron-core's forward-backward schedule, sum
the metrics over micro-batches and data-parallel ranks, then step the optimizer and the LR schedule unless
the :class:`~megatron_qrm.training.engine.NonFiniteGuard` refuses (a non-finite loss or gradient on any
rank: megatron-core checks ``found_inf`` only with an fp16 loss scaler, so in fp32/bf16 it would apply
NaNs) or the batch holds nothing to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_qrm.training.engine import NonFiniteGuard, reduce_metric_sums, run_global_batch


@dataclass(frozen=True)
class StepResult:
    """What one :func:`optimizer_step` did."""

    sums: dict[str, float]
    """Each metric summed over the micro-batches and data-parallel ranks."""
    grad_norm: float
    """The gradient norm of the applied step (0.0 when no step was taken)."""
    stepped: bool
    """Whether the optimizer and the schedule stepped."""


def optimizer_step(model, optimizer, scheduler, *, forward_step: Callable, microbatches: list,
                   metric_names: tuple[str, ...], guard: NonFiniteGuard, step: int, loss_name: str,
                   count_name: Optional[str] = None, label: str = "") -> StepResult:
    """One global batch of ``microbatches`` (this rank's) through ``model`` (DDP) and, if allowed, one
    optimizer + scheduler step. ``step``: the number the step is logged under; ``loss_name``: the metric
    whose finiteness (with the gradients') decides; ``count_name``: a metric whose sum 0 means nothing to
    learn from (no step, not counted as non-finite). Collective over every rank."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    sums = reduce_metric_sums(run_global_batch(model, forward_step, microbatches, forward_only=False), metric_names)
    if count_name is not None and sums[count_name] <= 0:
        return StepResult(sums, 0.0, False)
    if not guard.allow_step(step, sums[loss_name], model, label=label):
        return StepResult(sums, 0.0, False)
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    guard.after_step(step, grad_norm)
    return StepResult(sums, float(grad_norm or 0.0), True)
