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

from megatron_qrm.arguments import (
    CHAT_TEMPLATE_HELP,
    add_model_args,
    model_config_from_args,
    add_parallel_args,
    parallel_config_from_args,
    use_bf16,
    add_data_args,
    add_logging_args,
    add_training_args,
    add_packing_args,
    add_lora_args,
    add_memory_args,
    add_checkpoint_args,
    check_numeric_flags,
    default_load_to_save,
    optim_config_from_args,
    lora_config_from_args,
    setup_logging,
    show_defaults_once,
)

log = logging.getLogger("megatron_qrm")
#: seconds the other ranks wait before exiting on an error that rank 0 alone reports (see :func:`main`)
RANK0_ONLY_GRACE_S = 3.0


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
    add_packing_args(p, shared_prompts=True)
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
        local_attention=args.local_attention,
        recompute_granularity=args.recompute_granularity, recompute_num_layers=args.recompute_num_layers,
        skip_memory_check=args.skip_memory_check, max_nonfinite_steps=args.max_nonfinite_steps,
        allow_tokenizer_change=args.allow_tokenizer_change,
        pack_sequences=not args.no_pack_sequences, pack_tokens=args.pack_tokens, group_by_length=args.group_by_length)


def run_train_rm(args) -> int:
    from megatron_qrm.data import PreferenceDataConfig
    from megatron_qrm.rewards.scoring import RewardLossConfig
    from megatron_qrm.training.reward_trainer import RewardTrainConfig, train_reward_model

    cfg = RewardTrainConfig(
        data=PreferenceDataConfig(path=args.data_path, instruction_field=args.instruction_field,
                                  chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                                  chat_template=args.chat_template, seq_length=1024 if args.seq_length is None else args.seq_length,
                                  skip_long_prompts=args.skip_long_prompts, split=args.data_split,
                                  max_pairs=args.max_pairs, strict=args.strict_data),
        loss=RewardLossConfig(args.reward_loss, args.qrm_beta, args.qrm_gamma, args.dpo_beta),
        pack_shared_prompts=args.pack_shared_prompts,
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
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None, help=CHAT_TEMPLATE_HELP)
    g.add_argument("--skip-long-prompts", action="store_true")
    g.add_argument("--data-split", default="train")
    g.add_argument("--max-examples", type=int)
    add_training_args(p, unit="examples")
    add_packing_args(p)
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
    add_data_args(p, "--data", required=True, training=False)
    add_parallel_args(p)
    p.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward pass")
    add_packing_args(p, group_by_length=False, shared_prompts=True)
    p.add_argument("--output", help="write the metrics JSON here (default: SAVE/eval/iter_N_<data>.json)")
    p.add_argument("--dump-token-scores", help="write per-token credits (token text + score) as JSONL")
    p.add_argument("--reference-checkpoint", help="DPO-RM without LoRA: the frozen reference model")
    p.add_argument("--allow-tokenizer-change", action="store_true",
                   help="evaluate with a tokenizer other than the checkpoint's")
    p.set_defaults(func=run_eval_rm)
    return p


def run_eval_rm(args) -> int:
    from megatron_qrm.evaluation.rm_eval import RMEvalConfig, evaluate_reward_model

    cfg = RMEvalConfig(load=args.load, data=args.data_path, tokenizer=args.tokenizer, seq_length=args.seq_length,
                       instruction_field=args.instruction_field, chosen_field=args.chosen_field,
                       rejected_field=args.rejected_field, chat_template=args.chat_template,
                       skip_long_prompts=args.skip_long_prompts, split=args.data_split, max_pairs=args.max_pairs,
                       micro_batch_size=args.micro_batch_size, pack_sequences=not args.no_pack_sequences,
                       pack_tokens=args.pack_tokens, pack_shared_prompts=args.pack_shared_prompts, output=args.output,
                       dump_token_scores=args.dump_token_scores, reference_checkpoint=args.reference_checkpoint,
                       parallel=parallel_config_from_args(args), bf16=use_bf16(args),
                       allow_tokenizer_change=args.allow_tokenizer_change)
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
    p.add_argument("--seq-length", type=int, help="prompt + response tokens (default: the checkpoint's, else 1024)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generation call")
    p.add_argument("--samples", type=int, default=0, help="k > 0: also sample k responses per prompt for Pass@k")
    p.add_argument("--temperature", type=float, default=1.0, help="for the Pass@k samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None, help=CHAT_TEMPLATE_HELP)
    p.add_argument("--output", help="JSONL of the greedy responses with their judgements")
    p.add_argument("--allow-tokenizer-change", action="store_true",
                   help="evaluate with a tokenizer other than the checkpoint's")
    add_parallel_args(p)
    from megatron_qrm.rl.cli import add_rollout_engine_args

    add_rollout_engine_args(p, training=False)
    p.set_defaults(func=run_eval_policy)
    return p


def run_eval_policy(args) -> int:
    from megatron_qrm.evaluation.policy_eval import PolicyEvalConfig, evaluate_policy
    from megatron_qrm.rl.cli import engine_config_from_args

    evaluate_policy(PolicyEvalConfig(
        load=args.load, data=args.data, task=args.task, tokenizer=args.tokenizer, seq_length=args.seq_length,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, max_prompts=args.max_prompts, output=args.output,
        seed=args.seed, chat_template=args.chat_template, parallel=parallel_config_from_args(args),
        bf16=use_bf16(args), allow_tokenizer_change=args.allow_tokenizer_change,
        rollout_engine=args.rollout_engine, vllm=engine_config_from_args(args)))
    return 0


# ----------------------------------------------------------------------------- main
def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``qrm`` parser. ``command``: the subcommand about to run; the parsers whose flags come from config
    dataclasses that import torch (train-ppo, train-reinforce) are then built in full only for it (the
    others are listed by name and help), so that ``qrm --help`` and light commands start without torch.
    None builds every parser in full."""
    parser = argparse.ArgumentParser(prog="qrm", description="Token-level reward models (Q-RM) and RL on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build_train_sft_parser(sub)
    build_train_rm_parser(sub)
    build_eval_rm_parser(sub)
    from megatron_qrm.rl.cli import COMMANDS, add_rl_parser

    for name, (_, doc) in COMMANDS.items():
        if command is None or command == name:
            add_rl_parser(sub, name)
        else:
            sub.add_parser(name, help=doc)
    build_eval_policy_parser(sub)
    from megatron_qrm.evaluation.check_answers import add_parser as add_check_answers_parser

    add_check_answers_parser(sub)
    from megatron_qrm.planning import add_plan_parser

    add_plan_parser(sub)
    from megatron_qrm.demo.cli import add_demo_parser, add_make_pairs_parser

    add_make_pairs_parser(sub)
    add_demo_parser(sub)
    from megatron_qrm.serving.cli import add_serve_parser

    add_serve_parser(sub)
    show_defaults_once(parser)
    return parser


def _subcommand(argv: list[str]) -> str:
    """The first argument that is not an option ("" when there is none, e.g. ``qrm --help``)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = build_parser(_subcommand(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    from megatron_qrm.errors import EXIT_ABORTED, EXIT_USER_ERROR, RunAborted, UserError

    try:
        check_numeric_flags(args)  # zero / negative / non-finite values, before any work
        default_load_to_save(args)  # a rerun of the same command (--save, no --load) resumes
        return args.func(args)
    except (UserError, RunAborted) as e:
        # user errors (a bad flag, file, data line: megatron_qrm.errors.UserError) and runs stopped on purpose
        # (non-finite training, a failed write): one clear line naming the file:line, flag or step, no
        # traceback. Any other exception is a bug and keeps its traceback. An open progress bar is closed
        # first so that the message starts its own line.
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        from megatron_qrm.errors import print_error_line

        # an error every rank raises alike (a layout the world size cannot take) is printed by rank 0 only;
        # the others linger a moment before exiting, because torchrun SIGTERMs the remaining ranks as soon as
        # one exits, which could otherwise stop rank 0 before it has written the line
        if getattr(e, "rank0_only", False) and int(os.environ.get("RANK", "0")) != 0:
            import time

            time.sleep(RANK0_ONLY_GRACE_S)
        else:
            print_error_line(f"qrm {args.command}: error: {e}")
        return EXIT_ABORTED if isinstance(e, RunAborted) else EXIT_USER_ERROR
    finally:
        if "megatron_qrm.parallel" in sys.modules:  # `qrm plan` never imports torch
            sys.modules["megatron_qrm.parallel"].destroy()


if __name__ == "__main__":
    sys.exit(main())
