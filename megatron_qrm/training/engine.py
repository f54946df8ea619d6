"""Shared pieces of every trainer: DDP + (distributed) optimizer + LR schedule, running one global
batch through megatron-core's forward-backward schedule, and reducing metrics across ranks."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qrm.errors import NonFiniteError, UserError
from megatron_qrm.options import option

log = logging.getLogger("megatron_qrm")


@dataclass
class OptimConfig:
    """Adam and its learning-rate schedule (megatron-core's ``OptimizerConfig`` + ``OptimizerParamScheduler``)."""

    lr: float = option(1e-5, help="learning rate")
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_iters: Optional[int] = None  # default: --train-iters
    weight_decay: float = option(0.0, help="decoupled weight decay")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = option(1.0, help="gradient norm clipping (0 disables it)")
    use_distributed_optimizer: bool = True
    bf16: bool = False
    # on resume, when the schedule flags differ from the checkpoint's (Megatron's flags): the flags win
    # (override), the checkpoint wins silently (use_checkpoint), or neither: the checkpoint wins with a warning
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False

    def check(self, lr_flag: str = "--lr") -> None:
        """Raise ``ValueError`` naming the flag of the first value torch's Adam would reject or overflow on.

        Runs before any model is built. Adam's step size is ``lr / (1 - beta1)`` in fp32: a finite ``lr``
        above ~3.4e37 overflows it (``value cannot be converted to type float without overflow``).
        """
        fp32_max = 3.4028234663852886e38

        def bad(flag: str, value, why: str) -> None:
            raise UserError(f"{flag} {value}: {why}")

        for flag, value in ((lr_flag, self.lr), ("--min-lr", self.min_lr), ("--weight-decay", self.weight_decay),
                            ("--clip-grad", self.clip_grad)):
            if not math.isfinite(value) or value < 0:
                bad(flag, value, "must be a finite number >= 0")
        for flag, value in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0.0 <= value < 1.0:
                bad(flag, value, "must be in [0, 1)")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            bad("--adam-eps", self.adam_eps, "must be a finite number > 0")
        if self.lr / (1.0 - self.adam_beta1) >= fp32_max:
            bad(lr_flag, self.lr, f"Adam's step size lr / (1 - beta1) = {self.lr / (1.0 - self.adam_beta1):.3g} "
                                  "overflows float32")
        if self.min_lr > self.lr:
            bad("--min-lr", self.min_lr, f"is above {lr_flag} {self.lr}")
        if self.lr_warmup_iters < 0:
            bad("--lr-warmup-iters", self.lr_warmup_iters, "must be >= 0")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            bad("--lr-decay-iters", self.lr_decay_iters, "must be positive")


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
        override_opt_param_scheduler=opt.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not opt.override_opt_param_scheduler,
    )
    # --use-checkpoint-opt-param-scheduler given: keep the checkpoint's schedule without a warning
    # (checkpointing.report_schedule_choice)
    scheduler.qrm_use_checkpoint_flag = opt.use_checkpoint_opt_param_scheduler
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


# ----------------------------------------------------------------------------- non-finite guard
#: test hook: comma-separated optimizer-step numbers (1-based, as logged) whose gradients are replaced by
#: NaN after the backward pass, to exercise the guard without an unstable model (tests/test_reliability.py)
FAULT_NONFINITE_ENV = "QRM_FAULT_NONFINITE_STEPS"


def _fault_steps() -> set[int]:
    raw = os.environ.get(FAULT_NONFINITE_ENV, "")
    return {int(x) for x in raw.split(",") if x.strip()}


def grad_buffers(ddp) -> list[torch.Tensor]:
    """The contiguous gradient buffers of a megatron DDP model (every ``param.main_grad`` is a view)."""
    return [b.grad_data for b in list(getattr(ddp, "buffers", [])) + list(getattr(ddp, "expert_parallel_buffers", []))]


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (so every rank takes the same decision)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        moved = t.to(dev)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        t = moved.cpu()
    return bool(t.item() > 0)


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, and stops a run that keeps producing them.

    megatron-core checks ``found_inf`` only when it has a loss scaler (fp16); in fp32 and bf16 its
    optimizer applies NaN/Inf gradients, after which every weight is NaN. :meth:`allow_step` runs between
    backward and ``optimizer.step()``: with a non-finite loss (summed over the global batch) or any
    non-finite gradient on any rank, it returns False on every rank (the caller skips the update and the
    scheduler step, as megatron does on ``found_inf``) and logs the step; ``max_consecutive`` skipped
    steps in a row raise :class:`~megatron_qrm.errors.NonFiniteError` naming the first of them.
    :meth:`after_step` warns once when the gradient norm has been exactly 0 for ``collapse_steps`` steps
    (the model has collapsed: e.g. saturated scores after a learning rate far too large).
    """

    def __init__(self, max_consecutive: int = 3, collapse_steps: int = 10, what: str = "step",
                 fault_offset: int = 0) -> None:
        if max_consecutive < 1:
            raise UserError(f"--max-nonfinite-steps {max_consecutive}: must be at least 1")
        self.max_consecutive = max_consecutive
        self.collapse_steps = collapse_steps
        self.what = what
        self.consecutive = 0
        self.first_bad: Optional[int] = None
        self.skipped_total = 0
        self.last_loss_finite = True  # the model's latest forward gave a finite loss
        self.zero_norm_run = 0
        self._collapse_warned = False
        self._faults = _fault_steps()
        self._fault_offset = fault_offset

    def allow_step(self, step: int, loss: float, ddp, label: str = "") -> bool:
        """``step``: the number this optimizer step is logged under; ``loss``: the global-batch loss (any
        rank's copy: it is the same everywhere). Collective (every rank calls it)."""
        if step + self._fault_offset in self._faults:
            for g in grad_buffers(ddp):
                g.fill_(float("nan"))
        grads_ok = all(bool(torch.isfinite(g).all()) for g in grad_buffers(ddp))
        loss_ok = math.isfinite(loss)
        self.last_loss_finite = loss_ok  # the reduced loss: the same value on every rank
        if not _any_rank(not (grads_ok and loss_ok)):
            self.consecutive, self.first_bad = 0, None
            return True
        self.consecutive += 1
        self.skipped_total += 1
        self.first_bad = step if self.first_bad is None else self.first_bad
        what = f"{label} " if label else ""
        reason = f"loss {loss}" if not loss_ok else "gradients contain NaN/Inf"
        log.warning(f"{self.what} {step}: {what}{reason}: optimizer step skipped "
                    f"({self.consecutive} in a row, the run stops at {self.max_consecutive})")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.what} {step}: {what}loss or gradients not finite for {self.consecutive} optimizer steps "
                f"in a row since {self.what} {self.first_bad} ({reason}); stopping without saving (the last "
                f"checkpoint is untouched). Lower --lr, or raise --max-nonfinite-steps to tolerate more")
        return False

    def probe_outputs(self, step: int, ddp, forward_step: Callable, microbatch: dict,
                      metric_names: Iterable[str], final: bool = False) -> bool:
        """Whether the model as it is now (after ``step``'s update) may be saved: its outputs on ``microbatch``
        are finite and its weights' scale is sane. Collective (every rank calls it).

        A step's loss is computed before its update: an update to huge but finite weights (``--lr 1e20``)
        passes every other check, yet the model then scores NaN. Before a checkpoint is written the trainer
        runs one forward-only pass over a probe micro-batch (this rank's first of the last global batch) and
        requires every metric sum (loss and scores, summed over ranks) to be finite. One batch can miss it
        (a model whose weights are ~1e20 still gave finite, saturated scores on the batch it was updated on,
        and NaN on every other), so the largest weight magnitude must also stay below
        :func:`~megatron_qrm.checkpointing.weight_overflow_limit` (~2e17 at hidden size 8192): beyond it,
        products of two weights overflow float32/bfloat16 on ordinary inputs. (A collapsed but finite model, e.g. after ``--lr 1e6``, is saved:
        its outputs are finite; the collapse is warned about.) Failing either, :attr:`last_loss_finite` becomes False and nothing is saved. RNG states are restored
        after the probe, so probing changes nothing a resumed run would see. ``final``: the run ends here;
        such a model then stops it with :class:`~megatron_qrm.errors.NonFiniteError` (exit 3) rather than
        ending "successfully" without its last checkpoint."""
        from megatron_qrm import checkpointing

        rng = checkpointing._rng_state()
        with torch.no_grad():
            outs = run_global_batch(ddp, forward_step, [microbatch], forward_only=True)
        checkpointing._set_rng_state(rng)
        sums = reduce_metric_sums(outs, metric_names)
        bad = [k for k, v in sums.items() if not math.isfinite(v)]
        scale = checkpointing.weight_abs_max(ddp)
        module = ddp.module if hasattr(ddp, "module") else ddp
        limit = checkpointing.weight_overflow_limit(module.config.hidden_size)
        why = None
        if bad:
            why = f"the model's outputs on a probe batch are not finite ({', '.join(bad)})"
        elif not scale <= limit:
            why = (f"its largest weight magnitude is {scale:.3g}, above {limit:.3g}, where products of two weights "
                   "overflow float32")
        if why is None:
            return True
        self.last_loss_finite = False
        self.first_bad = step if self.first_bad is None else self.first_bad
        msg = f"{self.what} {step}: {why}: not saving; the last update diverged"
        if final:
            raise NonFiniteError(f"{msg}. The run ends without a checkpoint of it (the last one is untouched). "
                                 "Lower --lr")
        log.warning(msg)
        return False

    def after_step(self, step: int, grad_norm) -> None:
        """Track exact-zero gradient norms (a collapsed model) after an applied step."""
        if grad_norm is None:
            return
        g = float(grad_norm)
        self.zero_norm_run = self.zero_norm_run + 1 if g == 0.0 else 0
        if self.zero_norm_run >= self.collapse_steps and not self._collapse_warned:
            self._collapse_warned = True
            log.warning(f"{self.what} {step}: the gradient norm has been exactly 0 for {self.zero_norm_run} steps "
                        "in a row: the model has collapsed (saturated outputs, e.g. after a learning rate far "
                        "too large) and is no longer learning")
