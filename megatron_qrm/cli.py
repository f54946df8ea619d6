"""`qrm`: the command-line entry point. Megatron-style flags, one subcommand per job.

Run a single process with ``qrm SUBCOMMAND ...`` or several with
``torchrun --nproc_per_node N -m megatron_qrm SUBCOMMAND ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from megatron_qrm.config import ModelConfig, ParallelConfig, preset

log = logging.getLogger("megatron_qrm")


# ----------------------------------------------------------------------------- argument groups
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (omit when loading a checkpoint: it records its config)")
    g.add_argument("--model", help="architecture preset, e.g. llama3-8b, llama3.2-1b, qwen2.5-0.5b")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, help="GQA key/value groups (default: = heads)")
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--vocab-size", type=int, help="default: the tokenizer's size")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--rope-scaling-factor", type=float, help="Llama-3.1-style RoPE scaling factor")
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--qkv-bias", action="store_true", default=None, help="biases on Q/K/V (Qwen2)")
    g.add_argument("--tie-word-embeddings", action="store_true", default=None)
    g.add_argument("--transformer-impl", choices=("auto", "te", "local"), default="auto",
                   help="Transformer Engine spec (te), megatron-core local spec, or te when available")


_SIZE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
_MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "vocab_size", "max_position_embeddings", "rotary_base", "rope_scaling_factor", "norm_epsilon",
                 "qkv_bias", "tie_word_embeddings")


def model_config_from_args(args) -> Optional[ModelConfig]:
    """The model config named by flags, or None when none were given (then a checkpoint provides it)."""
    given = {k: getattr(args, k) for k in _MODEL_FIELDS if getattr(args, k, None) is not None}
    if args.model:
        return preset(args.model, **given)
    if not given:
        return None
    missing = [f"--{k.replace('_', '-')}" for k in _SIZE_FLAGS if k not in given]
    if missing:
        raise SystemExit(f"error: without --model, the model size needs {', '.join(missing)}")
    if "max_position_embeddings" not in given:
        given["max_position_embeddings"] = max(getattr(args, "seq_length", 0) or 0, 4096)
    return ModelConfig(**given)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 params/compute (GPU). Default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--fp32", action="store_true", help="force fp32 (the CPU default)")


def parallel_config_from_args(args) -> ParallelConfig:
    return ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          args.sequence_parallel, args.seed)


def use_bf16(args) -> bool:
    import torch

    if args.bf16 and args.fp32:
        raise SystemExit("error: --bf16 and --fp32 are exclusive")
    if args.bf16 and not torch.cuda.is_available():
        raise SystemExit("error: --bf16 needs a GPU; on CPU training runs in fp32")
    return args.bf16 or (torch.cuda.is_available() and not args.fp32)


def add_data_args(p: argparse.ArgumentParser, data_flag: str, required: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(data_flag, dest="data_path", required=required,
                   help="preference pairs: .jsonl, .jsonl.gz, .parquet, or a `datasets` name/path")
    g.add_argument("--tokenizer", help="HF tokenizer directory or SentencePiece .model (default: from checkpoint)")
    g.add_argument("--seq-length", type=int, help="max tokens of prompt + response (default 1024 or checkpoint's)")
    g.add_argument("--instruction-field", default="instruction")
    g.add_argument("--chosen-field", default="chosen")
    g.add_argument("--rejected-field", default="rejected")
    g.add_argument("--chat-template", action="store_true", default=None,
                   help="render prompts with the tokenizer's chat template")
    g.add_argument("--skip-long-prompts", action="store_true",
                   help="skip (and count) pairs whose prompt alone exceeds --seq-length instead of failing")
    g.add_argument("--data-split", default="train", help="split, for a `datasets` source")
    g.add_argument("--max-pairs", type=int)


def add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-dir", help="metrics.jsonl + TensorBoard (default: --save)")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-run-name")


def add_training_args(p: argparse.ArgumentParser, unit: str) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help=f"{unit} per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=2, help=f"{unit} per optimizer step")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--no-shuffle", action="store_true", help="file order (the reference's), not shuffled")
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="constant")
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--no-distributed-optimizer", action="store_true",
                   help="replicate optimizer state instead of sharding it across data-parallel ranks")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tune; the paper's 70B RM uses 128")
    g.add_argument("--lora-alpha", type=float, help="default = rank (no scaling, as the reference)")
    g.add_argument("--lora-targets", default="qkv,proj,fc1,fc2")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    from megatron_qrm.planning import add_memory_check_args, add_recompute_args

    g = p.add_argument_group("memory")
    add_recompute_args(g)
    add_memory_check_args(g)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", help="resume from this checkpoint (save dir or iter_* dir)")
    g.add_argument("--pretrained-checkpoint", help="initialise from a base model (policy) checkpoint; head is fresh")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--exit-interval", type=int, help="save and exit at this iteration")


def optim_config_from_args(args, bf16: bool):
    from megatron_qrm.training.engine import OptimConfig

    for flag in ("micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive")
    return OptimConfig(lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
                       lr_decay_style=args.lr_decay_style, lr_decay_iters=args.lr_decay_iters,
                       weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                       adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                       use_distributed_optimizer=not args.no_distributed_optimizer, bf16=bf16)


def lora_config_from_args(args):
    from megatron_qrm.models import LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                      targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))


# ----------------------------------------------------------------------------- train-rm
def build_train_rm_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-rm", help="train a token-level Q-RM (or ORM / DPO-RM baseline) on preference pairs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_parallel_args(p)
    add_data_args(p, "--train-data", required=True)
    g = p.add_argument_group("reward loss")
    g.add_argument("--reward-loss", choices=("qrm", "orm", "dpo"), default="qrm",
                   help="qrm: mean-credit Bradley-Terry with margin; orm: last-token BT; dpo: DPO-RM")
    g.add_argument("--qrm-beta", type=float, default=0.2)
    g.add_argument("--qrm-gamma", type=float, default=2.0)
    g.add_argument("--dpo-beta", type=float, default=0.1)
    add_training_args(p, unit="preference pairs")
    add_lora_args(p)
    add_memory_args(p)
    add_checkpoint_args(p)
    add_logging_args(p)
    p.set_defaults(func=run_train_rm)
    return p


def _common_run_fields(args) -> dict:
    """RewardTrainConfig / SFTTrainConfig fields that come from the shared flag groups."""
    bf16 = use_bf16(args)
    if args.load and args.pretrained_checkpoint and os.path.exists(args.load) and os.listdir(args.load):
        log.info("--load has a checkpoint: --pretrained-checkpoint is ignored when resuming")
    return dict(
        model=model_config_from_args(args), tokenizer=args.tokenizer, parallel=parallel_config_from_args(args),
        optim=optim_config_from_args(args, bf16), lora=lora_config_from_args(args),
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        train_iters=args.train_iters, shuffle=not args.no_shuffle,
        load=args.load, pretrained_checkpoint=args.pretrained_checkpoint, save=args.save,
        save_interval=args.save_interval, keep_last=args.keep_last, exit_interval=args.exit_interval,
        log_interval=args.log_interval, log_dir=args.log_dir, tensorboard=not args.no_tensorboard,
        wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name, transformer_impl=args.transformer_impl,
        recompute_granularity=args.recompute_granularity, recompute_num_layers=args.recompute_num_layers,
        skip_memory_check=args.skip_memory_check)


def run_train_rm(args) -> int:
    from megatron_qrm.data import PreferenceDataConfig
    from megatron_qrm.rewards.scoring import RewardLossConfig
    from megatron_qrm.training.reward_trainer import RewardTrainConfig, train_reward_model

    cfg = RewardTrainConfig(
        data=PreferenceDataConfig(path=args.data_path, instruction_field=args.instruction_field,
                                  chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                                  chat_template=bool(args.chat_template), seq_length=args.seq_length or 1024,
                                  skip_long_prompts=args.skip_long_prompts, split=args.data_split,
                                  max_pairs=args.max_pairs),
        loss=RewardLossConfig(args.reward_loss, args.qrm_beta, args.qrm_gamma, args.dpo_beta),
        **_common_run_fields(args),
    )
    train_reward_model(cfg)
    return 0


# ----------------------------------------------------------------------------- train-sft
def build_train_sft_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train-sft", help="supervised fine-tuning of a policy on instruction/response pairs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_parallel_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--train-data", dest="data_path", required=True,
                   help="instruction/response examples: .jsonl, .jsonl.gz, .parquet, or a `datasets` name/path")
    g.add_argument("--tokenizer", help="HF tokenizer directory or SentencePiece .model (default: from checkpoint)")
    g.add_argument("--seq-length", type=int, default=1024, help="max tokens of prompt + response")
    g.add_argument("--instruction-field", default="instruction")
    g.add_argument("--response-field", default="response")
    g.add_argument("--chat-template", action="store_true", help="render prompts with the tokenizer's chat template")
    g.add_argument("--skip-long-prompts", action="store_true")
    g.add_argument("--data-split", default="train")
    g.add_argument("--max-examples", type=int)
    add_training_args(p, unit="examples")
    add_lora_args(p)
    add_memory_args(p)
    add_checkpoint_args(p)
    add_logging_args(p)
    p.set_defaults(func=run_train_sft)
    return p


def run_train_sft(args) -> int:
    from megatron_qrm.data.sft import SFTDataConfig
    from megatron_qrm.training.sft_trainer import SFTTrainConfig, train_sft

    cfg = SFTTrainConfig(
        data=SFTDataConfig(path=args.data_path, instruction_field=args.instruction_field,
                           response_field=args.response_field, chat_template=args.chat_template,
                           seq_length=args.seq_length, skip_long_prompts=args.skip_long_prompts,
                           split=args.data_split, max_examples=args.max_examples),
        **_common_run_fields(args),
    )
    train_sft(cfg)
    return 0


# ----------------------------------------------------------------------------- eval-rm
def build_eval_rm_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval-rm", help="pairwise accuracy / margin of a reward model on a preference file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="reward-model checkpoint (save dir or iter_* dir)")
    add_data_args(p, "--data", required=True)
    add_parallel_args(p)
    p.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward pass")
    p.add_argument("--output", help="write the metrics JSON here (default: SAVE/eval/iter_N_<data>.json)")
    p.add_argument("--dump-token-scores", help="write per-token credits (token text + score) as JSONL")
    p.add_argument("--reference-checkpoint", help="DPO-RM without LoRA: the frozen reference model")
    p.set_defaults(func=run_eval_rm)
    return p


def run_eval_rm(args) -> int:
    from megatron_qrm.evaluation.rm_eval import RMEvalConfig, evaluate_reward_model

    cfg = RMEvalConfig(load=args.load, data=args.data_path, tokenizer=args.tokenizer, seq_length=args.seq_length,
                       instruction_field=args.instruction_field, chosen_field=args.chosen_field,
                       rejected_field=args.rejected_field, chat_template=args.chat_template,
                       skip_long_prompts=args.skip_long_prompts, split=args.data_split, max_pairs=args.max_pairs,
                       micro_batch_size=args.micro_batch_size, output=args.output,
                       dump_token_scores=args.dump_token_scores, reference_checkpoint=args.reference_checkpoint,
                       parallel=parallel_config_from_args(args), bf16=use_bf16(args))
    evaluate_reward_model(cfg)
    return 0


# ----------------------------------------------------------------------------- eval-policy
def build_eval_policy_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval-policy", help="greedy Pass@1 (and sampled Pass@k) of a policy on GSM8K / MATH",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="policy checkpoint")
    p.add_argument("--task", required=True, help="gsm8k | math | a registered task")
    p.add_argument("--data", required=True, help="test prompts with `instruction` and `label`")
    p.add_argument("--tokenizer")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation call")
    p.add_argument("--samples", type=int, default=0, help="k > 0: also sample k responses per prompt for Pass@k")
    p.add_argument("--temperature", type=float, default=1.0, help="for the Pass@k samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--chat-template", action="store_true", default=None)
    p.add_argument("--output", help="JSONL of the greedy responses with their judgements")
    add_parallel_args(p)
    p.set_defaults(func=run_eval_policy)
    return p


def run_eval_policy(args) -> int:
    from megatron_qrm.evaluation.policy_eval import PolicyEvalConfig, evaluate_policy

    evaluate_policy(PolicyEvalConfig(
        load=args.load, data=args.data, task=args.task, tokenizer=args.tokenizer, seq_length=args.seq_length,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, max_prompts=args.max_prompts, output=args.output,
        seed=args.seed, chat_template=args.chat_template, parallel=parallel_config_from_args(args),
        bf16=use_bf16(args)))
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrm", description="Token-level reward models (Q-RM) and RL on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_train_sft_parser(sub)
    build_train_rm_parser(sub)
    build_eval_rm_parser(sub)
    from megatron_qrm.rl.cli import add_rl_parser

    add_rl_parser(sub, "ppo")
    add_rl_parser(sub, "reinforce")
    build_eval_policy_parser(sub)
    from megatron_qrm.evaluation.check_answers import add_parser as add_check_answers_parser

    add_check_answers_parser(sub)
    from megatron_qrm.planning import add_plan_parser

    add_plan_parser(sub)
    from megatron_qrm.demo.cli import add_demo_parser, add_make_pairs_parser

    add_make_pairs_parser(sub)
    add_demo_parser(sub)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import warnings

    # megatron-core warns at import about missing TE/apex on every rank; the chosen spec is logged instead
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    # megatron-core logs every parameter and its optimizer config at INFO; keep its warnings only
    logging.getLogger("megatron").setLevel(logging.WARNING)


def main(argv: Optional[list[str]] = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # DataError and PlanDoesNotFit are ValueErrors
        # user errors: one clear line naming the file:line or flag, no traceback; an open progress bar
        # is closed first so that the message starts its own line
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        from megatron_qrm.errors import print_error_line

        print_error_line(f"qrm {args.command}: error: {e}")
        return 2
    finally:
        if "megatron_qrm.parallel" in sys.modules:  # `qrm plan` never imports torch
            sys.modules["megatron_qrm.parallel"].destroy()


if __name__ == "__main__":
    sys.exit(main())
