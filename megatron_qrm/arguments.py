"""Megatron-style flag groups shared by every ``qrm`` subcommand, and the configs built from them.

Subcommand parsers (``qrm train-rm``, ``train-ppo``, ``demo``, ...) compose these groups; nothing here
imports a subcommand, so any command module may import this one without a cycle through ``cli.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from megatron_qrm.config import ModelConfig, ParallelConfig, preset
from megatron_qrm.errors import UserError

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
    g.add_argument("--local-attention", choices=("auto", "sdpa", "unfused"), default="auto",
                   help="core attention of the local spec: fused scaled_dot_product_attention (sdpa; auto = sdpa "
                        "on every device) or megatron-core's DotProductAttention (unfused; for parity checks)")


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
        raise UserError(f"without --model, the model size needs {', '.join(missing)}")
    if "max_position_embeddings" not in given:
        given["max_position_embeddings"] = max(getattr(args, "seq_length", 0) or 0, 4096)
    return ModelConfig(**given)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 params/compute (GPU). Default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--fp32", action="store_true", help="force fp32 (the CPU default)")


def parallel_config_from_args(args) -> ParallelConfig:
    return ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          args.sequence_parallel, args.seed)


def use_bf16(args) -> bool:
    import torch

    bf16, fp32 = args.bf16, args.fp32
    if bf16 and fp32:
        raise UserError("--bf16 and --fp32 are exclusive")
    if bf16 and not torch.cuda.is_available():
        raise UserError("--bf16 needs a GPU; on CPU training runs in fp32")
    return bf16 or (torch.cuda.is_available() and not fp32)


CHAT_TEMPLATE_HELP = ("render prompts with the tokenizer's chat template (default: on when the tokenizer has "
                      "one, or as the checkpoint records)")


def add_data_args(p: argparse.ArgumentParser, data_flag: str, required: bool, training: bool = True) -> None:
    """Preference-data flags (``training``: also ``--strict-data``, which only the trainer reads)."""
    g = p.add_argument_group("data")
    g.add_argument(data_flag, dest="data_path", required=required,
                   help="preference pairs: .jsonl, .jsonl.gz, .parquet, or a `datasets` name/path")
    g.add_argument("--tokenizer", help="HF tokenizer directory or SentencePiece .model (default: from checkpoint)")
    g.add_argument("--seq-length", type=int, help="max tokens of prompt + response (default 1024 or checkpoint's)")
    g.add_argument("--instruction-field", default="instruction")
    g.add_argument("--chosen-field", default="chosen")
    g.add_argument("--rejected-field", default="rejected")
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help=CHAT_TEMPLATE_HELP)
    g.add_argument("--skip-long-prompts", action="store_true",
                   help="skip (and count) pairs whose prompt alone exceeds --seq-length instead of failing")
    g.add_argument("--data-split", default="train", help="split, for a `datasets` source")
    g.add_argument("--max-pairs", type=int)
    if training:
        g.add_argument("--strict-data", action="store_true",
                       help="fail on a pair with an empty side or chosen == rejected instead of skipping (and counting) "
                            "it")


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
    add_scheduler_resume_args(g)
    add_failure_args(g)


def add_scheduler_resume_args(g) -> None:
    """Which learning-rate schedule a resumed run follows when the flags differ from the checkpoint's
    (Megatron's flags; both spellings accepted). Neither: the checkpoint's, with one warning line."""
    s = g.add_mutually_exclusive_group()
    s.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, use --lr / --min-lr / --lr-warmup-iters / --lr-decay-* / --weight-decay as given, "
                        "not the checkpoint's")
    s.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, keep the checkpoint's learning-rate schedule whatever the flags say (the "
                        "default too, but with a warning when they differ)")


def add_packing_args(p: argparse.ArgumentParser, group_by_length: bool = True, shared_prompts: bool = False) -> None:
    """Sequence packing (data/packing.py; README \"Packed sequences\"): train-rm, train-sft and the RL updates."""
    g = p.add_argument_group("sequence packing")
    g.add_argument("--no-pack-sequences", action="store_true",
                   help="pad each micro-batch to its longest sequence instead of packing sequences into "
                        "THD streams (packing is on by default; it needs SDPA or Transformer Engine attention)")
    g.add_argument("--pack-tokens", type=int,
                   help="tokens per packed micro-batch (default: the padded micro-batch's size: --micro-batch-size "
                        "x sequences per sample x --seq-length; RL updates: x the rollout's padded length)")
    if shared_prompts:
        s = g.add_mutually_exclusive_group()
        s.add_argument("--pack-shared-prompts", action="store_true", default=None,
                       help="pack each preference pair as its prompt once, then the chosen and the rejected response "
                            "(each attending to the prompt and itself): the prompt is computed once, the losses are "
                            "unchanged. Needs the local spec's SDPA attention (not Transformer Engine). Default: on "
                            "where packing is on and the attention supports it")
        s.add_argument("--no-pack-shared-prompts", dest="pack_shared_prompts", action="store_false", default=None,
                       help="pack both sequences of a pair whole (the prompt computed twice)")
    if group_by_length:
        g.add_argument("--group-by-length", action="store_true",
                       help="with --no-pack-sequences: length-sorted micro-batches within each global batch")


def add_failure_args(g) -> None:
    """Failure handling shared by every trainer (README "Failure handling")."""
    g.add_argument("--max-nonfinite-steps", type=int, default=3,
                   help="optimizer steps with a non-finite loss or gradient are skipped; this many in a row stop "
                        "the run (exit 3) without saving")
    g.add_argument("--allow-tokenizer-change", action="store_true",
                   help="accept a tokenizer other than the checkpoint's (recorded in the new checkpoints)")


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

    return OptimConfig(lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
                       lr_decay_style=args.lr_decay_style, lr_decay_iters=args.lr_decay_iters,
                       weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                       adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                       use_distributed_optimizer=not args.no_distributed_optimizer, bf16=bf16,
                       override_opt_param_scheduler=args.override_opt_param_scheduler,
                       use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)


# ----------------------------------------------------------------------------- numeric flags
# One rule per numeric flag (argparse ``dest``), checked for every subcommand right after parsing, before any
# work. Table-driven so that it can move next to config dataclass fields later; a flag that is None (not given)
# is not checked. tests/test_reliability_round2.py fails when a numeric flag of any subcommand has no rule.
POSITIVE_INT, NON_NEGATIVE_INT = "positive integer", "integer >= 0"
POSITIVE, NON_NEGATIVE = "finite number > 0", "finite number >= 0"
UNIT_OPEN, UNIT_CLOSED, UNIT_POSITIVE = "[0, 1)", "[0, 1]", "(0, 1]"
SEED, PORT = "seed", "port"
_RULE_TEXT = {POSITIVE_INT: "must be a positive integer", NON_NEGATIVE_INT: "must be an integer >= 0",
              POSITIVE: "must be a finite number > 0", NON_NEGATIVE: "must be a finite number >= 0",
              UNIT_OPEN: "must be in [0, 1)", UNIT_CLOSED: "must be in [0, 1]", UNIT_POSITIVE: "must be in (0, 1]",
              SEED: "must be an integer in [0, 2**32)", PORT: "must be in 0..65535"}


def _rule_holds(rule: str, v: float) -> bool:
    import math

    if not math.isfinite(v):
        return False
    return {POSITIVE_INT: v >= 1, NON_NEGATIVE_INT: v >= 0, POSITIVE: v > 0, NON_NEGATIVE: v >= 0,
            UNIT_OPEN: 0 <= v < 1, UNIT_CLOSED: 0 <= v <= 1, UNIT_POSITIVE: 0 < v <= 1,
            SEED: 0 <= v < 2 ** 32, PORT: 0 <= v <= 65535}[rule]


NUMERIC_FLAG_RULES: dict[str, str] = {
    # sizes, counts, intervals: 0 or less means nothing
    **dict.fromkeys((
        "seq_length", "micro_batch_size", "global_batch_size", "train_iters", "save_interval", "keep_last",
        "exit_interval", "log_interval", "eval_interval", "lr_decay_iters", "max_nonfinite_steps", "pack_tokens",
        "max_pairs", "max_examples", "max_prompts", "eval_max_prompts", "max_pairs_per_prompt", "max_new_tokens",
        "batch_size", "forward_micro_batch_size", "generation_batch_size", "rollout_batch_size", "samples_per_prompt",
        "ppo_epochs", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "vocab_size", "max_position_embeddings", "recompute_num_layers", "tensor_model_parallel_size",
        "pipeline_model_parallel_size", "data_parallel_size", "num_gpus", "prompt_length", "max_batch_tokens",
        "max_body_bytes", "max_items", "pass_at_k", "seeds", "max_steps", "n_sft", "n_rl_prompts", "pair_prompts",
        "rm_batch", "rm_iters", "sft_iters", "rl_iters", "rl_rollout", "rl_global_batch", "rl_micro_batch"),
        POSITIVE_INT),
    # 0 is meaningful (off / none)
    **dict.fromkeys(("lora_rank", "critic_lora_rank", "reward_lora_rank", "lr_warmup_iters", "samples", "top_k",
                     "n_test", "n_heldout_prompts", "eval_samples", "vllm_sleep_level"), NON_NEGATIVE_INT),
    # rates and coefficients where 0 means "off"
    **dict.fromkeys(("lr", "min_lr", "critic_lr", "weight_decay", "clip_grad", "entropy_coef", "kl_coef",
                     "value_coef", "qrm_beta", "qrm_gamma", "max_wait_ms", "reserve_gb", "temperature", "sft_lr",
                     "rm_lr", "qrm_lr", "ppo_lr", "reinforce_lr"), NON_NEGATIVE),
    **dict.fromkeys(("adam_eps", "lora_alpha", "norm_epsilon", "rotary_base", "rope_scaling_factor", "gpu_memory_gb",
                     "dpo_beta", "clip_eps", "value_clip", "graceful_timeout", "rollout_is_cap",
                     "vllm_kv_cache_gib"), POSITIVE),
    **dict.fromkeys(("adam_beta1", "adam_beta2"), UNIT_OPEN),
    **dict.fromkeys(("gamma", "lam", "flaw_rate"), UNIT_CLOSED),
    **dict.fromkeys(("top_p", "mfu", "vllm_gpu_memory_utilization"), UNIT_POSITIVE),
    "seed": SEED,
    "port": PORT,
}


def check_numeric_flags(args, rules: Optional[dict[str, str]] = None) -> None:
    """Raise :class:`~megatron_qrm.errors.UserError` naming the first numeric flag whose value its rule in
    ``rules`` (default :data:`NUMERIC_FLAG_RULES`) refuses: zero, negative or non-finite where meaningless."""
    for dest, rule in (rules or NUMERIC_FLAG_RULES).items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not _rule_holds(rule, float(v)):
                raise UserError(f"--{dest.replace('_', '-')} {v}: {_RULE_TEXT[rule]}")


def default_load_to_save(args) -> None:
    """``--save DIR`` without ``--load``, DIR already holding a checkpoint: resume from it (``args.load = DIR``),
    with one line saying so. A requeued SLURM job reruns the identical command and continues; nothing in DIR
    is overwritten. (docs/reliability.md "Rerunning a command")"""
    if not getattr(args, "save", None) or not hasattr(args, "load") or args.load is not None:
        return
    save = args.save
    from megatron_qrm import checkpointing

    # supervised trainers save into DIR itself; RL into DIR/actor (and DIR/critic)
    found = checkpointing.resolve_checkpoint(save) or checkpointing.resolve_checkpoint(os.path.join(save, "actor"))
    if found is None:
        return
    args.load = save
    if int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger("megatron_qrm").info(
            f"resuming from {found} (--save {save} holds a checkpoint and no --load was given; "
            "use a new --save directory to start over)")


def lora_config_from_args(args):
    from megatron_qrm.models import LoRAConfig

    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                      targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))


def setup_logging() -> None:
    """INFO on rank 0, WARNING elsewhere; known third-party import noise filtered."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    import warnings

    # Known third-party warnings that every command printed and that say nothing actionable to a user of
    # this project; the project's own warnings (logging, and warnings raised from megatron_qrm) still show.
    for pattern in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # megatron-core logs every parameter and its optimizer config at INFO; keep its warnings only
    logging.getLogger("megatron").setLevel(logging.WARNING)


#: message patterns (``re.match``) of the third-party warnings :func:`setup_logging` filters, and why
KNOWN_THIRD_PARTY_WARNINGS = (
    # megatron-core at import, on every rank: no TE/apex on this machine; the chosen layer spec is logged
    r".*(Transformer Engine|Apex|apex).*",
    # megatron-core's TransformerConfig: a default of its own ("full" cuda-graph scope) it then deprecates
    r"full scope is deprecated",
    # torch.distributed.checkpoint API that megatron-core's dist-checkpointing calls
    r".*`load_state_dict` is deprecated",
    r".*deprecating ShardedTensor",
    # torch collectives renamed in torch 2.13 that megatron-core's distributed optimizer still calls
    r"`torch\.distributed\.\w+` is deprecated",
    # torch, when megatron-core's optimizer reads .grad of its non-leaf fp32 views
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)


def show_defaults_once(parser: argparse.ArgumentParser) -> None:
    """Make ``--help`` show every option's default exactly once, for ``parser`` and its subcommands.

    ArgumentDefaultsHelpFormatter appends "(default: ...)" only to options that have a help string, and
    appends it even when the help already states the default ("(default: = heads) (default: None)"). Here
    the default goes into the help string itself, unless the help already mentions one or the default says
    nothing (None / False), and the parsers then use the plain formatter.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                show_defaults_once(sub)
            continue
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            continue
        text = action.help or ""
        if ("%(default)" not in text and "default" not in text.lower()
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text = f"{text} (default: %(default)s)".strip()
        action.help = text or None
    if issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
        parser.formatter_class = argparse.HelpFormatter
