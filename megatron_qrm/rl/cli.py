"""Flags of `qrm train-ppo` and `qrm train-reinforce` (one parser builder, the algorithm fixed per command)."""

from __future__ import annotations

import argparse


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
    from megatron_qrm.rl.vllm_engine import VLLMEngineConfig, vllm_available

    if args.rollout_engine == "vllm" and not vllm_available():
        raise ValueError("--rollout-engine vllm: vLLM is not installed in this environment; run "
                         "tools/install_vllm.sh (docs/vllm.md) or use --rollout-engine megatron")
    if getattr(args, "rollout_is_correction", False) and not args.rollout_is_cap > 0:
        raise ValueError(f"--rollout-is-cap {args.rollout_is_cap}: must be positive")

    return VLLMEngineConfig(kv_cache_gib=args.vllm_kv_cache_gib, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                            enable_prefix_caching=args.vllm_prefix_caching, sleep_level=args.vllm_sleep_level)


def add_rl_parser(sub, algo: str) -> argparse.ArgumentParser:
    from megatron_qrm.arguments import CHAT_TEMPLATE_HELP, add_logging_args, add_packing_args, add_parallel_args

    name = "train-ppo" if algo == "ppo" else "train-reinforce"
    doc = ("PPO of a policy with token-level rewards (Q-RM: A_t = Z_std - beta*KL - V, no GAE)" if algo == "ppo"
           else "REINFORCE of a policy with Q-RM credits as token returns (or ORM / DPO-RM)")
    p = sub.add_parser(name, help=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_parallel_args(p)
    g = p.add_argument_group("models")
    g.add_argument("--actor-checkpoint", help="initial policy (e.g. SFT) checkpoint; the reference starts from it")
    g.add_argument("--reward-model", required=True, help="Q-RM / ORM / DPO-RM checkpoint (qrm train-rm or convert_hf)")
    g.add_argument("--dpo-reference", help="reference model of a fully fine-tuned DPO-RM")
    g.add_argument("--tokenizer", help="default: the actor checkpoint's")
    g.add_argument("--allow-retokenize", action="store_true",
                   help="accept a reward model whose tokenizer differs from the actor's")
    g.add_argument("--transformer-impl", choices=("auto", "te", "local"), default="auto")
    if algo == "ppo":
        g.add_argument("--critic-init", choices=("reward", "actor", "checkpoint"), default="reward",
                       help="critic backbone: the reward model's (fresh value head, as the paper), the actor's, "
                            "or --critic-checkpoint")
        g.add_argument("--critic-checkpoint")
        g.add_argument("--critic-lora-rank", type=int, default=0)
    g.add_argument("--offload", action="store_true", help="move frozen models off the GPU between phases")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt-data", required=True, help="RL prompts: jsonl/parquet/datasets with `instruction` (+`label`)")
    g.add_argument("--instruction-field", default="instruction")
    g.add_argument("--seq-length", type=int, default=1024, help="prompt + response tokens")
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None, help=CHAT_TEMPLATE_HELP)
    g.add_argument("--skip-long-prompts", action="store_true")
    g.add_argument("--max-prompts", type=int)
    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-batch-size", type=int, default=3072, help="prompts per iteration (all DP ranks)")
    g.add_argument("--samples-per-prompt", type=int, default=1)
    g.add_argument("--generation-batch-size", type=int, default=64, help="sequences per generation call per rank")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop-token-ids", default="", help="comma-separated extra stop ids (EOS always stops)")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the prefix at every step (debugging)")
    add_rollout_engine_args(p)
    add_packing_args(p, group_by_length=False)
    g = p.add_argument_group("advantages and losses")
    if algo == "ppo":
        g.add_argument("--advantage", choices=("qrm", "qrm-reference", "gae"),
                       help="default: qrm for a Q-RM, gae for ORM / DPO-RM")
        g.add_argument("--kl-coef", type=float, default=0.01)
        g.add_argument("--kl-estimator", choices=("full", "k1", "k3", "abs"), default="full",
                       help="full: KL of the full next-token distributions (vocab-parallel)")
        g.add_argument("--clip-eps", type=float, default=0.2)
        g.add_argument("--value-coef", type=float, default=0.01, help="qrm-reference advantage only")
        g.add_argument("--value-clip", type=float,
                       help="PPO value clipping range around the rollout-time values (default: none, as the reference)")
        g.add_argument("--gamma", type=float, default=0.9)
        g.add_argument("--lam", type=float, default=0.8)
        g.add_argument("--critic-lr", type=float, default=1e-5)
    g.add_argument("--entropy-coef", type=float, default=0.0)
    g.add_argument("--eos-rescore", action="store_true", help="REINFORCE: the reference's EOS re-scoring")
    g.add_argument("--no-reward-centering", action="store_true",
                   help="REINFORCE as the reference: Q-RM Z/sigma, ORM the broadcast reward / sigma over tokens "
                        "(no mean subtracted; default standardises, see docs/rl.md)")
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, required=True, help="RL iterations (rollout + update)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout")
    g.add_argument("--micro-batch-size", type=int, default=2, help="sequences per update micro-batch")
    g.add_argument("--global-batch-size", type=int, default=16, help="sequences per optimizer step")
    g.add_argument("--forward-micro-batch-size", type=int, default=8, help="sequences per scoring pass")
    g.add_argument("--lr", type=float, default=5e-6 if algo == "ppo" else 1e-6)
    g.add_argument("--clip-grad", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.0)
    from megatron_qrm.arguments import add_failure_args

    add_failure_args(g)
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-data", help="test prompts with `label` for Pass@1 after iterations")
    g.add_argument("--task", help="answer checker: gsm8k | math | a registered task")
    g.add_argument("--eval-interval", type=int, default=1)
    g.add_argument("--eval-max-prompts", type=int)
    g.add_argument("--load", help="resume this RL run (its --save)")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=int, default=1)
    g.add_argument("--exit-interval", type=int)
    add_logging_args(p)
    p.set_defaults(func=lambda args: run_rl(args, algo))
    return p


def run_rl(args, algo: str) -> int:
    from megatron_qrm.arguments import parallel_config_from_args, use_bf16
    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.models import LoRAConfig
    from megatron_qrm.rl.rollout import SamplingConfig
    from megatron_qrm.rl.trainer import RLConfig, train_rl
    from megatron_qrm.training.engine import OptimConfig

    bf16 = use_bf16(args)
    ppo = algo == "ppo"
    cfg = RLConfig(
        algo=algo,
        prompts=PromptDataConfig(path=args.prompt_data, instruction_field=args.instruction_field,
                                 chat_template=args.chat_template, seq_length=args.seq_length,
                                 skip_long_prompts=args.skip_long_prompts, max_prompts=args.max_prompts),
        reward_model=args.reward_model, actor=args.actor_checkpoint, load=args.load, save=args.save,
        tokenizer=args.tokenizer, dpo_reference=args.dpo_reference,
        critic_init=getattr(args, "critic_init", "reward"), critic_checkpoint=getattr(args, "critic_checkpoint", None),
        parallel=parallel_config_from_args(args),
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_new_tokens=args.max_new_tokens,
                                stop_token_ids=tuple(int(x) for x in args.stop_token_ids.split(",") if x.strip()),
                                use_kv_cache=not args.no_kv_cache),
        rollout_batch_size=args.rollout_batch_size, samples_per_prompt=args.samples_per_prompt,
        generation_batch_size=args.generation_batch_size, forward_micro_batch_size=args.forward_micro_batch_size,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, ppo_epochs=args.ppo_epochs,
        train_iters=args.train_iters, advantage=getattr(args, "advantage", None),
        kl_coef=getattr(args, "kl_coef", 0.0), kl_estimator=getattr(args, "kl_estimator", "full"),
        clip_eps=getattr(args, "clip_eps", 0.2), value_coef=getattr(args, "value_coef", 0.01),
        entropy_coef=args.entropy_coef, gamma=getattr(args, "gamma", 0.9), lam=getattr(args, "lam", 0.8),
        eos_rescore=args.eos_rescore, reinforce_center=not args.no_reward_centering,
        actor_optim=OptimConfig(lr=args.lr, clip_grad=args.clip_grad, weight_decay=args.weight_decay, bf16=bf16),
        critic_optim=OptimConfig(lr=getattr(args, "critic_lr", 1e-5), clip_grad=args.clip_grad, bf16=bf16),
        critic_lora=LoRAConfig(rank=getattr(args, "critic_lora_rank", 0)),
        eval_data=args.eval_data, eval_interval=args.eval_interval, eval_max_prompts=args.eval_max_prompts,
        task=args.task, save_interval=args.save_interval, log_dir=args.log_dir, tensorboard=not args.no_tensorboard,
        wandb_project=args.wandb_project, wandb_run_name=args.wandb_run_name, offload=args.offload,
        allow_retokenize=args.allow_retokenize, exit_interval=args.exit_interval, bf16=bf16,
        transformer_impl=args.transformer_impl, local_attention=getattr(args, "local_attention", "auto"),
        value_clip=getattr(args, "value_clip", None),
        max_nonfinite_steps=args.max_nonfinite_steps, allow_tokenizer_change=args.allow_tokenizer_change,
        pack_sequences=not args.no_pack_sequences, pack_tokens=args.pack_tokens,
        rollout_engine=args.rollout_engine, vllm=engine_config_from_args(args),
        rollout_is_correction=args.rollout_is_correction, rollout_is_cap=args.rollout_is_cap,
    )

    if ppo is False:
        cfg.kl_coef = 0.0  # REINFORCE (as the paper's): no reference model, no critic
    train_rl(cfg)
    return 0
