"""The start-up memory check of the trainers, and the flags that go with it.

A trainer calls :func:`check_fits` with its model config and layout before building the model. On a GPU a
plan that cannot fit raises :class:`PlanDoesNotFit` (a ``ValueError``: ``qrm`` prints one line and exits 2)
unless ``skip=True`` (``--skip-memory-check``), which only logs a warning. On CPU the plan is only logged.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from megatron_qrm.errors import UserError
from megatron_qrm.config import ModelConfig
from megatron_qrm.planning.memory import GPUS, GiB, Plan, PlanInput, format_plan, make_plan

log = logging.getLogger("megatron_qrm")

SKIP_FLAG = "--skip-memory-check"


class PlanDoesNotFit(UserError):
    """The memory plan of this run exceeds the GPU's memory (override: ``--skip-memory-check``)."""


def add_memory_check_args(p: argparse.ArgumentParser) -> None:
    """``--skip-memory-check`` (for train-rm / train-sft / train-ppo / train-reinforce)."""
    p.add_argument(SKIP_FLAG, action="store_true",
                   help="start even when the memory plan (qrm plan) says the job does not fit the GPU")


def add_recompute_args(p: argparse.ArgumentParser) -> None:
    """``--recompute-granularity`` / ``--recompute-num-layers`` (activation recomputation)."""
    p.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="selective: recompute the attention core in backward (saves the s^2 softmax of the unfused "
                        "attention; nothing with flash/TE attention); full: keep only each layer's input")
    p.add_argument("--recompute-num-layers", type=int, default=1,
                   help="with full recomputation: layers per checkpointed chunk")


def detect_gpu() -> tuple[Optional[str], Optional[int]]:
    """(key of GPUS or None, total memory in bytes) of the current CUDA device; (None, None) without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    name = props.name.lower()
    total = int(props.total_memory)
    key = None
    if "a100" in name:
        key = "a100-80gb" if total > 60 * GiB else "a100-40gb"
    elif "h200" in name:
        key = "h200-141gb"
    elif "h100" in name:
        key = "h100-80gb"
    return key, total


def _resolve_impl(transformer_impl: str) -> str:
    if transformer_impl in ("te", "local"):
        return transformer_impl
    from megatron_qrm.models.builder import transformer_impl_available

    return "te" if transformer_impl_available()[0] else "local"


_cpu_note_logged: list[bool] = []


def check_fits(model: ModelConfig, role: str, *, tensor_parallel: int, pipeline_parallel: int, world_size: int,
               micro_batch_size: int, seq_length: int, global_batch_size: Optional[int] = None, lora_rank: int = 0,
               bf16: bool = True, sequence_parallel: bool = False, recompute_granularity: Optional[str] = None,
               transformer_impl: str = "auto", distributed_optimizer: bool = True, skip: bool = False,
               **rl: Any) -> Plan:
    """Estimate this run's per-GPU memory; refuse to start (raise :class:`PlanDoesNotFit`) when it cannot fit
    the GPU, unless ``skip``. ``role``: policy (train-sft), reward (train-rm; ``micro_batch_size`` in pairs),
    critic, ppo or reinforce (``model`` = the actor; pass ``reward_model=``, ``critic_model=`` ModelConfigs,
    ``reward_lora_rank=``, ``critic_lora_rank=``, ``reference=``, ``offload=``, ``generation_batch_size=``,
    ``forward_micro_batch_size=``, ``rollout_batch_size=``, ``samples_per_prompt=`` as in :class:`PlanInput`).
    On CPU the plan is logged, never enforced. Returns the plan.

    A DPO-RM trains an LM on pairs: pass ``role="policy"`` with ``micro_batch_size`` and
    ``global_batch_size`` doubled (sequences, not pairs).
    """
    if not model.vocab_size:
        raise ValueError("check_fits: the model's vocab_size is 0; fill it from the tokenizer first")
    gpu_key, total = detect_gpu()
    on_gpu = total is not None
    impl = _resolve_impl(transformer_impl) if on_gpu else "local"
    inp = PlanInput(
        model=model, role=role, lora_rank=lora_rank, tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel, num_gpus=world_size, micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size, seq_length=seq_length,
        recompute=recompute_granularity or "none", sequence_parallel=sequence_parallel, transformer_impl=impl,
        attention="auto", bf16=bf16, distributed_optimizer=distributed_optimizer,
        fused_activation=on_gpu, gpu=gpu_key or "a100-80gb", gpu_memory_bytes=total, **rl)
    plan = make_plan(inp, search=on_gpu)
    m = plan.memory
    summary = (f"memory plan: {m.total / GiB:.1f} GiB per GPU (weights {m.weights / GiB:.1f}, grads "
               f"{m.grads / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, activations {m.activations / GiB:.1f}, "
               f"kv cache {m.kv_cache / GiB:.1f}, logits {m.logits / GiB:.1f}, workspace {m.workspace / GiB:.1f}, "
               f"reserve {m.reserve / GiB:.1f})")
    if not on_gpu:
        # one clearly labelled line per process: the numbers are a GPU estimate, nothing is checked on CPU
        if not _cpu_note_logged:
            _cpu_note_logged.append(True)
            log.info("memory check: skipped on CPU (for reference, this run would need %.1f GiB per GPU on an %s; "
                     "`qrm plan` gives the breakdown)", m.total / GiB, GPUS[inp.gpu].name)
        return plan
    log.info("%s of %.1f GiB", summary, total / GiB)
    if plan.fits:
        return plan
    message = (f"this run does not fit the GPU ({total / GiB:.1f} GiB): the memory plan needs "
               f"{m.total / GiB:.1f} GiB per GPU")
    if plan.proposal:
        p = plan.proposal
        message += (f"; smallest layout that fits: TP={p['tensor_model_parallel_size']} "
                    f"PP={p['pipeline_model_parallel_size']} on {p['num_gpus']} GPUs ({p['how']})")
    message += f". Check with `qrm plan`, or pass {SKIP_FLAG} to start anyway"
    if skip:
        log.warning("%s (%s given: starting anyway)", message, SKIP_FLAG)
        log.warning("%s", format_plan(plan))
        return plan
    raise PlanDoesNotFit(message)
