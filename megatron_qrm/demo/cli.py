"""Flags of `qrm demo` and `qrm make-pairs` (argparse subparsers; wired into :mod:`megatron_qrm.cli`)."""

from __future__ import annotations

import argparse

from megatron_qrm.errors import UserError

#: size flags of `qrm demo`: DemoConfig field -> type (each is --field-name)
_SIZE_FLAGS = {
    "n_sft": int, "n_rl_prompts": int, "n_heldout_prompts": int, "n_test": int, "num_layers": int,
    "hidden_size": int, "ffn_hidden_size": int, "sft_iters": int, "pair_prompts": int, "samples_per_prompt": int,
    "rm_iters": int, "rm_batch": int, "rl_iters": int, "rl_rollout": int, "rl_global_batch": int, "rl_micro_batch": int,
    "ppo_lr": float, "reinforce_lr": float, "sft_lr": float, "rm_lr": float, "qrm_lr": float, "kl_coef": float,
    "qrm_beta": float, "qrm_gamma": float, "eval_samples": int,
}


def add_demo_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="the whole method end to end on a CPU in minutes: synthetic task, SFT, Q-RM/ORM/DPO-RM, "
                     "PPO/REINFORCE, credit localisation, report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generates a chained-arithmetic task with a known first error, trains a SentencePiece "
                    "tokenizer and a tiny Megatron GPT (SFT), builds preference pairs from its samples, trains "
                    "Q-RM, ORM and DPO-RM, runs PPO and REINFORCE with each, measures credit localisation and "
                    "writes OUT/report.md (+ report.json, PNG plots). Rerunning with the same --out resumes.")
    p.add_argument("--out", default="qrm-demo", help="output folder (a rerun with the same folder resumes)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: about 5 minutes on 2 CPU cores")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--study", action="store_true", help="run the comparison over --seeds seeds and aggregate")
    p.add_argument("--seeds", type=int, default=3, help="with --study: seeds SEED, SEED+1, ...")
    g = p.add_argument_group("sizes (override the preset)")
    for name, typ in _SIZE_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    g.add_argument("--max-steps", type=int, help="longest chain (task difficulty)")
    g.add_argument("--flaw-rate", type=float, help="share of flawed SFT demonstrations")
    g.add_argument("--ppo-qrm-advantage", choices=("qrm", "qrm-reference"),
                   help="PPO with the Q-RM: the paper's Algorithm 1 (qrm) or the reference code's estimator")
    g.add_argument("--algos", help="comma list of ppo,reinforce")
    g.add_argument("--reward-models", help="comma list of qrm,orm,dpo")
    p.set_defaults(func=run_demo_command)
    return p


def demo_config_from_args(args, seed: int):
    from megatron_qrm.demo.pipeline import default_config, quick_config

    cfg = quick_config(seed) if args.quick else default_config(seed)
    for name in _SIZE_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if getattr(args, "max_steps", None) is not None:
        cfg.task.max_steps = args.max_steps
    if getattr(args, "ppo_qrm_advantage", None):
        cfg.ppo_qrm_advantage = args.ppo_qrm_advantage
    if getattr(args, "flaw_rate", None) is not None:
        cfg.task.flaw_rate = args.flaw_rate
    if getattr(args, "algos", None):
        cfg.algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
        bad = [a for a in cfg.algos if a not in ("ppo", "reinforce")]
        if bad:
            raise UserError(f"--algos: unknown {bad[0]!r} (ppo, reinforce)")
    if getattr(args, "reward_models", None):
        cfg.rm_kinds = tuple(a.strip() for a in args.reward_models.split(",") if a.strip())
        bad = [a for a in cfg.rm_kinds if a not in ("qrm", "orm", "dpo")]
        if bad:
            raise UserError(f"--reward-models: unknown {bad[0]!r} (qrm, orm, dpo)")
    cfg.pair_prompts = min(cfg.pair_prompts, cfg.n_rl_prompts)
    if cfg.rl_rollout % cfg.rl_global_batch or cfg.rl_global_batch % cfg.rl_micro_batch:
        raise UserError("--rl-global-batch must divide --rl-rollout and be a multiple of --rl-micro-batch")
    return cfg


def run_demo_command(args) -> int:
    if args.study:
        from megatron_qrm.demo.study import run_study

        import shlex
        import sys

        command = "qrm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        run_study(lambda s: demo_config_from_args(args, s), args.out, [args.seed + i for i in range(args.seeds)],
                  command=command)
        return 0
    from megatron_qrm.demo.pipeline import run_demo

    run_demo(demo_config_from_args(args, args.seed), args.out)
    return 0


def add_make_pairs_parser(sub) -> argparse.ArgumentParser:
    from megatron_qrm.demo.pairs import __doc__ as doc

    p = sub.add_parser("make-pairs", help="sampled responses + gold labels -> deduplicated preference pairs "
                                          "(correct chosen, incorrect rejected)",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--responses", required=True, help="JSONL: instruction + responses (string or list) [+ label]")
    p.add_argument("--task", required=True, help="gsm8k | math | arith | another registered task")
    p.add_argument("--output", required=True, help="pairs JSONL to write")
    p.add_argument("--labels", help="JSONL with instruction + label, joined to rows without a label")
    p.add_argument("--checker", help="judge of the task (gsm8k/math: reference | strict; default: the first)")
    p.add_argument("--response-field", default="responses")
    p.add_argument("--instruction-field", default="instruction")
    p.add_argument("--label-field", default="label")
    p.add_argument("--max-pairs-per-prompt", type=int, help="keep a seeded random subset of each prompt's pairs")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_make_pairs)
    return p


def _run_make_pairs(args) -> int:
    from megatron_qrm.demo.pairs import run_make_pairs

    return run_make_pairs(args)


def main(argv=None) -> int:
    """Standalone entry (before the commands are wired into `qrm`): ``python -m megatron_qrm.demo.cli demo ...``."""

    from megatron_qrm.arguments import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(prog="qrm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_make_pairs_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        from megatron_qrm.errors import print_error_line

        print_error_line(f"qrm {args.command}: error: {e}")
        return 2
    finally:
        from megatron_qrm import parallel

        parallel.destroy()


if __name__ == "__main__":
    import sys

    sys.exit(main())
