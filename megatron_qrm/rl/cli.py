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


def add_rl_parser(sub, name: str) -> argparse.ArgumentParser:
    """The parser of ``name`` (a key of :data:`COMMANDS`) with every flag of its config."""
    from megatron_qrm.arguments import add_parallel_args
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
    add_options(groups["training"], OptimConfig, only=("lr", "clip_grad", "weight_decay"),
                defaults={"lr": ACTOR_LR[algo], "clip_grad": RL_CLIP_GRAD})
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
    actor_optim = options_from_args(OptimConfig, args, bf16=bf16)
    critic_optim = OptimConfig(lr=getattr(args, "critic_lr", CRITIC_LR), clip_grad=actor_optim.clip_grad, bf16=bf16)
    given = dict(algo=algo, prompts=options_from_args(PromptDataConfig, args),
                 sampling=options_from_args(SamplingConfig, args), parallel=parallel_config_from_args(args),
                 actor_optim=actor_optim, critic_optim=critic_optim,
                 critic_lora=LoRAConfig(rank=getattr(args, "critic_lora_rank", 0)), bf16=bf16)
    if algo != "ppo":
        given["kl_coef"] = 0.0  # REINFORCE (as the paper's): no reference model, no critic
    return options_from_args(RLConfig, args, **given)


def run_rl(args, algo: str) -> int:
    from megatron_qrm.rl.trainer import train_rl

    train_rl(rl_config_from_args(args, algo))
    return 0
