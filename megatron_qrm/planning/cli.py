"""`qrm plan`: will this job fit, and what is the smallest layout that does?

``add_plan_parser(sub)`` adds the subcommand to the ``qrm`` parser; ``python -m megatron_qrm.planning``
runs the same parser standalone. Exit status: 0 when the plan fits, 3 when it does not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from megatron_qrm.config import MODEL_PRESETS, ModelConfig, preset
from megatron_qrm.errors import UserError
from megatron_qrm.planning.memory import GPUS, GiB, ROLES, PlanInput, format_plan, make_plan

EXIT_FITS = 0
EXIT_DOES_NOT_FIT = 3


def resolve_model(spec: str) -> tuple[ModelConfig, str]:
    """A preset name, or a checkpoint (save dir or iter_* dir) whose qrm_config.json records the model."""
    if spec in MODEL_PRESETS:
        return preset(spec), spec
    if os.path.isdir(spec):
        from megatron_qrm.checkpointing import read_config

        cfg = read_config(spec)
        return ModelConfig.from_dict(cfg["model"]), os.path.basename(os.path.normpath(spec))
    raise UserError(f"{spec!r} is neither a model preset ({', '.join(MODEL_PRESETS)}) nor a checkpoint directory")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and role")
    g.add_argument("--model", required=True,
                   help="preset (e.g. llama3-70b, llama3.2-3b, qwen2.5-7b) or a checkpoint directory; the actor for "
                        "--role ppo/reinforce")
    g.add_argument("--role", choices=ROLES, default="reward",
                   help="policy: SFT / full LM; reward: qrm train-rm (micro-batch = pairs); critic; ppo: actor + "
                        "critic + frozen reference + frozen reward model; reinforce: actor + reward model")
    g.add_argument("--lora-rank", type=int, default=0, help="policy/reward/critic: LoRA rank (0 = full fine-tune)")
    g = p.add_argument_group("layout and hardware")
    g.add_argument("--tensor-model-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--data-parallel-size", type=int, help="default: --num-gpus / (TP x PP)")
    g.add_argument("--num-gpus", type=int, help="default: TP x PP x DP")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--gpu", choices=tuple(GPUS), default="a100-80gb")
    g.add_argument("--gpu-memory-gb", type=float, help="override the GPU's memory (GiB)")
    g.add_argument("--reserve-gb", type=float, default=3.0,
                   help="GiB per GPU kept for the CUDA context, NCCL buffers and allocator slack")
    g = p.add_argument_group("batch and model execution")
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--micro-batch-size", type=int, default=1,
                   help="the trainer's unit: preference pairs for --role reward, sequences otherwise")
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--recompute-granularity", choices=("none", "selective", "full"), default="none")
    g.add_argument("--transformer-impl", choices=("te", "local"), default="te",
                   help="te: Transformer Engine spec (NGC containers); local: megatron-core local spec")
    g.add_argument("--attention", choices=("auto", "flash", "unfused"), default="auto",
                   help="local spec: flash = SDPA (the default on a GPU), unfused = DotProductAttention")
    g.add_argument("--fp32", action="store_true", help="fp32 parameters and activations (default bf16)")
    g.add_argument("--no-distributed-optimizer", action="store_true")
    g.add_argument("--no-fused-activation", action="store_true", help="SwiGLU unfused (the CPU path)")
    g = p.add_argument_group("RL (--role ppo / reinforce)")
    g.add_argument("--reward-model", help="reward model preset or checkpoint (default: the actor's architecture)")
    g.add_argument("--reward-lora-rank", type=int, default=0, help="the reward model's (unmerged) LoRA rank")
    g.add_argument("--critic-model", help="critic preset or checkpoint (default: the reward model)")
    g.add_argument("--critic-lora-rank", type=int, default=0)
    g.add_argument("--no-reference", action="store_true", help="no frozen reference (KL coefficient 0)")
    g.add_argument("--offload", action="store_true", help="frozen models off the GPU between the phases using them")
    g.add_argument("--generation-batch-size", type=int, default=64)
    g.add_argument("--forward-micro-batch-size", type=int, default=8)
    g.add_argument("--prompt-length", type=int, help="prompt tokens prefilled at once (default seq-length / 2)")
    g.add_argument("--rollout-batch-size", type=int, default=3072)
    g.add_argument("--samples-per-prompt", type=int, default=1)
    g.add_argument("--ppo-epochs", type=int, default=1)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object (fits, per_gpu_bytes, memory, ...)")
    g.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time estimate")
    g.add_argument("--no-search", action="store_true", help="do not search for the smallest fitting layout")


def plan_input_from_args(args) -> PlanInput:
    model, name = resolve_model(args.model)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    num_gpus = args.num_gpus
    if args.data_parallel_size is not None:
        if num_gpus is not None and num_gpus != tp * pp * args.data_parallel_size:
            raise UserError(f"--num-gpus {num_gpus} != TP {tp} x PP {pp} x DP {args.data_parallel_size}")
        num_gpus = tp * pp * args.data_parallel_size
    rl = args.role in ("ppo", "reinforce")
    rm = rm_name = critic = None
    if rl and args.reward_model:
        rm, rm_name = resolve_model(args.reward_model)
    if rl and args.critic_model:
        critic, _ = resolve_model(args.critic_model)
    return PlanInput(
        model=model, model_name=name, role=args.role, lora_rank=0 if rl else args.lora_rank,
        tensor_parallel=tp, pipeline_parallel=pp, num_gpus=num_gpus,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, recompute=args.recompute_granularity, sequence_parallel=args.sequence_parallel,
        transformer_impl=args.transformer_impl, attention=args.attention, bf16=not args.fp32,
        distributed_optimizer=not args.no_distributed_optimizer, fused_activation=not args.no_fused_activation,
        gpu=args.gpu, gpu_memory_bytes=int(args.gpu_memory_gb * GiB) if args.gpu_memory_gb else None,
        reserve_bytes=int(args.reserve_gb * GiB), mfu=args.mfu,
        reward_model=rm, reward_model_name=rm_name or (name if rl else None), reward_lora_rank=args.reward_lora_rank,
        critic_model=critic, critic_lora_rank=args.critic_lora_rank, reference=not args.no_reference,
        offload=args.offload, generation_batch_size=args.generation_batch_size,
        forward_micro_batch_size=args.forward_micro_batch_size, prompt_length=args.prompt_length,
        rollout_batch_size=args.rollout_batch_size, samples_per_prompt=args.samples_per_prompt,
        ppo_epochs=args.ppo_epochs)


def run_plan(args) -> int:
    try:
        plan = make_plan(plan_input_from_args(args), search=not args.no_search)
    except (ValueError, FileNotFoundError) as e:
        from megatron_qrm.errors import print_error_line

        print_error_line(f"qrm plan: error: {e}")
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), sort_keys=True))
    else:
        print(format_plan(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


def add_plan_parser(sub) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``qrm`` subcommands (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("plan", help="per-GPU memory and FLOPs of a job; does it fit, and the smallest layout that does",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Exit status 0 when the plan fits, 3 when it does not.")
    _add_arguments(p)
    p.set_defaults(func=run_plan)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (``python -m megatron_qrm.planning``), the same flags as ``qrm plan``."""
    parser = argparse.ArgumentParser(prog="qrm plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description="Per-GPU memory and FLOPs of a job. Exit status 0 when the plan "
                                                 "fits, 3 when it does not.")
    _add_arguments(parser)
    parser.set_defaults(func=run_plan)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
