"""Flags of `qrm train-ppo` and `qrm train-reinforce`, generated from :class:`~megatron_qrm.rl.config.RLConfig`
and its nested configs (one parser builder, the algorithm fixed per command)."""

from __future__ import annotations

import argparse

#: the two commands and their one-line help (light: `qrm --help` lists them without importing torch)
COMMANDS = {
    "train-ppo": ("ppo", "PPO of a policy with token-level rewards (Q-RM: A_t = Z_std - beta*KL - V, no GAE)"),
    "train-reinforce": ("reinforce", "REINFORCE of a policy with Q-RM credits as token returns (or ORM / DPO-RM)"),
}

#: RLConfig fields per help group (a field in none of them has no flag or is added by a shared group)
GROUPS = {
    "models": ("actor", "reward_model", "dpo_reference", "tokenizer", "allow_retokenize", "transformer_impl",
               "local_attention", "critic_init", "critic_checkpoint", "offload"),
    "rollout": ("rollout_batch_size", "samples_per_prompt", "generation_batch_size"),
    "sequence packing": ("pack_sequences", "pack_tokens"),
    "advantages and losses": ("advantage", "kl_coef", "kl_estimator", "clip_eps", "value_coef", "value_clip",
                              "gamma", "lam", "entropy_coef", "eos_rescore", "reinforce_center"),
    "training": ("train_iters", "ppo_epochs", "micro_batch_size", "global_batch_size", "forward_micro_batch_size",
                 "max_nonfinite_steps", "allow_tokenizer_change"),
    "evaluation and checkpoints": ("eval_data", "task", "eval_interval", "eval_max_prompts", "load", "save",
                                   "save_interval", "exit_interval"),
    "logging": ("log_interval", "log_dir", "tensorboard", "wandb_project", "wandb_run_name"),
}


ENGINES = ("megatron", "vllm")  # = megatron_qrm.rl.rollout_engine.ENGINES (not imported: the parser stays light)


def add_rollout_engine_args(parser, *, training: bool = True) -> None:
    """``--rollout-engine`` and the vLLM settings (train-ppo / train-reinforce / eval-policy)."""
    g = parser.add_argument_group("rollout engine")
    g.add_argument("--rollout-engine", choices=ENGINES, default="megatron",
                   help="sampling engine: the project's KV-cache decoder on the policy, or an in-process vLLM engine "
                        "refitted from the policy after every update (tools/install_vllm.sh; docs/vllm.md)")
    g.add_argument("--vllm-kv-cache-gib", type=float, default=1.0,
                   help="vLLM KV-cache size on CPU (VLLM_CPU_KVCACHE_SPACE)")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.4,
                   help="GPU: fraction of the device the colocated vLLM engine may take")
    g.add_argument("--vllm-prefix-caching", action="store_true", help="vLLM prefix caching (reset at every refit)")
    g.add_argument("--vllm-sleep-level", type=int, choices=(0, 1, 2), default=0,
                   help="GPU colocated: put vLLM to sleep during training (1: weights offloaded, 2: discarded); "
                        "untested (no GPU in CI)")
    if training:
        g.add_argument("--rollout-is-correction", action="store_true",
                       help="multiply each token's policy loss by min(exp(logp_old - behaviour_logp), cap): "
                            "truncated importance sampling for the engine/trainer mismatch (docs/vllm.md)")
        g.add_argument("--rollout-is-cap", type=float, default=2.0, help="cap of --rollout-is-correction")


def engine_config_from_args(args):
    """The vLLM engine settings of the flags above (rl/vllm_engine.VLLMEngineConfig); with
    ``--rollout-engine vllm`` checks first that vLLM is importable (before any model is built)."""
    from megatron_qrm.errors import UserError
    from megatron_qrm.rl.vllm_engine import VLLMEngineConfig, vllm_available

    if args.rollout_engine == "vllm" and not vllm_available():
        raise UserError("--rollout-engine vllm: vLLM is not installed in this environment; run "
                         "tools/install_vllm.sh (docs/vllm.md) or use --rollout-engine megatron")
    if getattr(args, "rollout_is_correction", False) and not args.rollout_is_cap > 0:
        raise UserError(f"--rollout-is-cap {args.rollout_is_cap}: must be positive")

    return VLLMEngineConfig(kv_cache_gib=args.vllm_kv_cache_gib, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                            enable_prefix_caching=args.vllm_prefix_caching, sleep_level=args.vllm_sleep_level)


def add_rl_parser(sub, name: str) -> argparse.ArgumentParser:
    """The parser of ``name`` (a key of :data:`COMMANDS`) with every flag of its config."""
    from megatron_qrm.arguments import add_parallel_args, add_scheduler_resume_args
    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.options import add_options
    from megatron_qrm.rl.config import ACTOR_LR, CRITIC_LR, RL_CLIP_GRAD, RLConfig, SamplingConfig
    from megatron_qrm.training.engine import OptimConfig

    algo, doc = COMMANDS[name]
    p = sub.add_parser(name, help=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_parallel_args(p)
    groups = {title: p.add_argument_group(title) for title in ("models", "prompts", "rollout", "sequence packing",
                                                               "advantages and losses", "training",
                                                               "evaluation and checkpoints", "logging")}
    for title, fields in GROUPS.items():
        add_options(groups[title], RLConfig, only=fields, algo=algo,
                    required=("reward_model", "train_iters"))
    if algo == "ppo":
        groups["models"].add_argument("--critic-lora-rank", type=int, default=0,
                                      help="LoRA rank of the critic (0: full fine-tune)")
        groups["training"].add_argument("--critic-lr", type=float, default=CRITIC_LR, help="the critic's learning rate")
    add_options(groups["prompts"], PromptDataConfig, required=("path",), defaults={"chat_template": None})
    add_options(groups["rollout"], SamplingConfig)
    add_rollout_engine_args(p)
    add_options(groups["training"], OptimConfig, only=("lr", "clip_grad", "weight_decay"),
                defaults={"lr": ACTOR_LR[algo], "clip_grad": RL_CLIP_GRAD})
    add_scheduler_resume_args(groups["training"])
    p.set_defaults(func=lambda args: run_rl(args, algo))
    return p


def rl_config_from_args(args, algo: str):
    """The :class:`RLConfig` of a parsed ``train-ppo`` / ``train-reinforce`` command line."""
    from megatron_qrm.arguments import parallel_config_from_args, use_bf16
    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.models import LoRAConfig
    from megatron_qrm.options import options_from_args
    from megatron_qrm.rl.config import CRITIC_LR, RLConfig, SamplingConfig
    from megatron_qrm.training.engine import OptimConfig

    bf16 = use_bf16(args)
    on_resume = dict(override_opt_param_scheduler=args.override_opt_param_scheduler,
                     use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler)
    actor_optim = options_from_args(OptimConfig, args, bf16=bf16, **on_resume)
    critic_optim = OptimConfig(lr=getattr(args, "critic_lr", CRITIC_LR), clip_grad=actor_optim.clip_grad, bf16=bf16,
                               **on_resume)
    given = dict(algo=algo, prompts=options_from_args(PromptDataConfig, args),
                 sampling=options_from_args(SamplingConfig, args), parallel=parallel_config_from_args(args),
                 actor_optim=actor_optim, critic_optim=critic_optim,
                 critic_lora=LoRAConfig(rank=getattr(args, "critic_lora_rank", 0)), bf16=bf16,
                 rollout_engine=args.rollout_engine, vllm=engine_config_from_args(args),
                 rollout_is_correction=args.rollout_is_correction, rollout_is_cap=args.rollout_is_cap)
    if algo != "ppo":
        given["kl_coef"] = 0.0  # REINFORCE (as the paper's): no reference model, no critic
    return options_from_args(RLConfig, args, **given)


def run_rl(args, algo: str) -> int:
    from megatron_qrm.rl.trainer import train_rl

    train_rl(rl_config_from_args(args, algo))
    return 0
