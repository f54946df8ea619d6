"""Worker for the RL tests (tests/test_rollout.py, tests/test_rl.py).

  rollout: in ONE launch (torchrun, 2 processes) for each layout of ``--layouts`` (tp1 = DP 2, tp2,
           pp2): build a tiny policy from one set of weights (made at the first layout and saved with
           dist_checkpointing, so every layout samples from the same model), sample every case of
           :data:`ROLLOUT_CASES` with the KV cache and with full recomputation, same seed, and save both
           Rollouts per case and layout (global rank 0) for the test to compare.
  learn:   (one process) PPO and REINFORCE of a tiny random policy with a synthetic token reward
           (credit 1 for one token id, 0 otherwise) through RLTrainer(reward_fn=...); the target
           token's frequency in sampled responses is measured before and after with the sampler (same
           seeds). Also checks the --allow-retokenize credit path against the direct one when both
           tokenizers are the same (identical credits on canonically tokenised responses).
  cli:     run several ``qrm`` command lines through ``megatron_qrm.cli.main`` in this process (or
           torchrun launch), capturing each one's exit status and the lines it prints to stdout/stderr,
           and go on after a failing one (the error-message tests batch their bad inputs here).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# ----------------------------------------------------------------------------------------------- rollout

#: vocab 250: not a multiple of 128, so the padded vocabulary columns (256) must be dropped by the sampler
ROLLOUT_VOCAB = 250
EOS = 3
PAD = 0
#: prompt lengths of the batch: different lengths exercise the forced-prompt-token logic (1 = BOS only)
PROMPT_LENS = (1, 4, 9, 13, 6, 9)
#: name -> (SamplingConfig kwargs, max_length)
ROLLOUT_CASES = {
    "greedy": (dict(temperature=0.0, max_new_tokens=20), 64),
    "sampled": (dict(temperature=1.0, max_new_tokens=20), 64),
    "top_k": (dict(temperature=0.8, top_k=20, max_new_tokens=20), 64),
    "top_p": (dict(temperature=1.0, top_p=0.9, max_new_tokens=20), 64),
    # many stop ids (~1/8 of the vocabulary): most rows end early, at different steps
    "top_k_top_p_stops": (dict(temperature=1.3, top_k=50, top_p=0.8, max_new_tokens=24,
                               stop_token_ids=tuple(range(100, 130))), 64),
    # the context (20) cuts the longest prompts' responses before max_new_tokens
    "context_cut": (dict(temperature=1.0, max_new_tokens=16), 20),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _rollout_model_config():
    from megatron_qrm.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                       vocab_size=ROLLOUT_VOCAB, max_position_embeddings=64)


def rollout_prompts():
    import torch

    g = torch.Generator().manual_seed(5)
    return [[2] + torch.randint(4, ROLLOUT_VOCAB, (n - 1,), generator=g).tolist() for n in PROMPT_LENS]


def run_rollout(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.models import build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    cfg = _rollout_model_config()
    weights = os.path.join(args.dir, "rollout_weights")
    prompts = rollout_prompts()
    results = {}
    for i, name in enumerate(args.layouts.split(",")):
        tp, pp = LAYOUTS[name]
        t_layout = time.time()
        parallel.initialize(ParallelConfig(tp, pp, seed=1234))
        model = build_model(cfg, "policy")
        if i == 0:  # (decided by position, not by the folder's existence: ranks must agree)
            # random init logits are almost flat; scaling the LM head makes them peaked (greedy gaps far
            # above float noise) while sampling stays diverse
            with torch.no_grad():
                if getattr(model, "output_layer", None) is not None:
                    model.output_layer.weight.mul_(12.0)
            checkpointing.save_checkpoint(weights, 0, model, {"model": cfg.to_dict()})
        checkpointing.load_checkpoint(weights, model, load_rng=False)
        layout = {}
        for case, (kw, max_length) in ROLLOUT_CASES.items():
            out = {}
            for kv in (True, False):
                t0 = time.time()
                r = generate(model, prompts, SamplingConfig(use_kv_cache=kv, **kw), eos_id=EOS, pad_id=PAD,
                             vocab_size=ROLLOUT_VOCAB, max_length=max_length, seed=4321)
                out["kv" if kv else "full"] = {k: getattr(r, k) for k in ("tokens", "prompt_lens", "response_lens",
                                                                         "logprobs", "action_mask", "finished")}
                out[("kv" if kv else "full") + "_s"] = time.time() - t0
            layout[case] = out
        if name == "tp1":  # where the sampled tokens sit in the teacher-forced distributions
            layout["teacher_forced"] = {case: _teacher_forced_stats(model, layout[case]["kv"], ROLLOUT_CASES[case][0])
                                        for case in ROLLOUT_CASES}
        results[name] = layout
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"rollout layout {name}: {time.time() - t_layout:.1f}s", file=sys.stderr, flush=True)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(args.dir, "rollout.pt"))
    parallel.destroy()


def _teacher_forced_stats(model, r: dict, kw: dict) -> dict:
    """For every generated token (TP=PP=1 model): its rank in the untempered next-token distribution,
    the tempered probability mass of the tokens ranked before it (top-p keeps a token iff that mass is
    below top_p), the top-1 minus top-2 logit gap (how far greedy is from a tie), and its untempered
    teacher-forced log-prob next to the one the sampler recorded."""
    import torch

    model.eval()
    with torch.no_grad():
        tokens = r["tokens"]
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    logits = logits[..., :ROLLOUT_VOCAB].float()
    mask = r["action_mask"][:, 1:] > 0  # action at p <- logits at p - 1
    prev = logits[:, :-1][mask]  # [n, V]
    tok = tokens[:, 1:][mask]
    chosen = prev.gather(-1, tok[:, None])
    rank = (prev > chosen).sum(-1)
    temperature = kw.get("temperature", 1.0) or 1.0
    probs = (prev / temperature).softmax(-1)
    mass_before = (probs * (prev > chosen)).sum(-1)
    top2 = prev.topk(2, -1).values
    return {"rank": rank, "mass_before": mass_before, "gap": top2[:, 0] - top2[:, 1],
            "logp": prev.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1),
            "recorded_logp": r["logprobs"][:, 1:][mask]}


# ----------------------------------------------------------------------------------------------- learn

LEARN_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                   max_position_embeddings=64)


def _save_random_model(path: str, role: str, tokenizer_path: str, vocab: int, seed: int) -> None:
    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.models import build_model

    parallel.initialize(ParallelConfig(1, 1, seed=seed))
    cfg = ModelConfig(vocab_size=vocab, **LEARN_MODEL)
    model = build_model(cfg, role, seed=seed)
    meta = {"kind": role, "role": role, "model": cfg.to_dict(), "tokenizer": tokenizer_path, "chat_template": False,
            "seq_length": 64}
    if role == "reward":
        meta["reward_loss"] = {"kind": "qrm"}
    checkpointing.save_checkpoint(path, 0, model, meta)


def token_counts(model, tokenizer, prompts, seeds, max_new_tokens: int):
    """How often each token id is sampled in the responses to ``prompts`` (same seeds every call), and
    the number of sampled tokens."""
    import torch

    from megatron_qrm.rl.rollout import SamplingConfig, generate

    counts = torch.zeros(tokenizer.vocab_size)
    for seed in seeds:
        r = generate(model, prompts, SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens),
                     eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size,
                     max_length=64, seed=seed)
        counts += torch.bincount(r.tokens[r.action_mask > 0], minlength=tokenizer.vocab_size).float()
    return counts, float(counts.sum())


def target_frequency(model, tokenizer, prompts, target: int, seeds, max_new_tokens: int) -> float:
    """Share of sampled response tokens equal to ``target``."""
    counts, total = token_counts(model, tokenizer, prompts, seeds, max_new_tokens)
    return float(counts[target]) / max(total, 1.0)


def run_learn(args) -> None:
    import dataclasses

    from megatron_qrm import parallel
    from megatron_qrm.data import PromptDataConfig, load_tokenizer
    from megatron_qrm.rl.rollout import SamplingConfig
    from megatron_qrm.rl.trainer import RLConfig, RLTrainer
    from megatron_qrm.training.engine import OptimConfig

    tok = load_tokenizer(args.tokenizer)
    actor = os.path.join(args.dir, "actor0")
    _save_random_model(actor, "policy", args.tokenizer, tok.vocab_size, seed=11)
    target = args.target
    report: dict = {}

    def reward_fn(exp):  # credit 1 on every generated `target` token, 0 elsewhere (indexed by position)
        return ((exp["tokens"] == target) & (exp["action_mask"] > 0)).float()

    base = RLConfig(
        algo="ppo", prompts=PromptDataConfig(path=args.prompts, seq_length=64), reward_model=None, actor=actor,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens),
        rollout_batch_size=32, generation_batch_size=32, forward_micro_batch_size=16, micro_batch_size=8,
        global_batch_size=16, train_iters=args.iters, kl_coef=0.01,
        actor_optim=OptimConfig(lr=args.lr, clip_grad=1.0), critic_optim=OptimConfig(lr=args.lr, clip_grad=1.0),
        tensorboard=False)
    eval_prompts = None
    seeds = list(range(100, 100 + args.eval_rounds))
    for algo in ("ppo", "reinforce"):
        cfg = dataclasses.replace(base, algo=algo, save=os.path.join(args.dir, f"learn_{algo}"),
                                  kl_coef=0.01 if algo == "ppo" else 0.0)
        t0 = time.time()
        trainer = RLTrainer(cfg, reward_fn=reward_fn, reward_kind="qrm")
        if eval_prompts is None:
            eval_prompts = [trainer.prompts.prompt_ids(i) for i in range(32)]
            if target < 0:  # the initial policy's most frequent token (not EOS): a visible starting frequency
                counts, _ = token_counts(trainer.roles.actor.module, tok, eval_prompts, [7], args.max_new_tokens)
                counts[tok.eos_id] = -1
                target = int(counts.argmax())
            report["target"] = target
            report["before"] = target_frequency(trainer.roles.actor.module, tok, eval_prompts, target, seeds,
                                                args.max_new_tokens)
        before_again = target_frequency(trainer.roles.actor.module, tok, eval_prompts, target, seeds,
                                        args.max_new_tokens)
        last = trainer.train()
        after = target_frequency(trainer.roles.actor.module, tok, eval_prompts, target, seeds, args.max_new_tokens)
        from megatron_qrm.training.metrics_log import read_metrics

        report[algo] = {"before": before_again, "after": after, "seconds": time.time() - t0,
                        "rewards": [r["train/token_reward_mean"] for r in read_metrics(cfg.save)],
                        "last": {k: v for k, v in last.items() if isinstance(v, float)}}
    report["retokenize"] = _retokenize_identity(args, tok)
    with open(os.path.join(args.dir, "learn.json"), "w") as f:
        json.dump(report, f, indent=1)
    parallel.destroy()


def _retokenize_identity(args, tok) -> dict:
    """With the SAME tokenizer on both sides, the re-tokenising credit path must give exactly the direct
    path's credits (canonically tokenised responses, with and without EOS)."""

    import torch

    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.rl.experience import head_scores
    from megatron_qrm.rl.rollout import SamplingConfig
    from megatron_qrm.rl.trainer import RLConfig, RLTrainer
    from megatron_qrm.training.engine import OptimConfig

    rm = os.path.join(args.dir, "rm0")
    _save_random_model(rm, "reward", args.tokenizer, tok.vocab_size, seed=12)
    cfg = RLConfig(algo="reinforce", prompts=PromptDataConfig(path=args.prompts, seq_length=64), reward_model=rm,
                   actor=os.path.join(args.dir, "actor0"), sampling=SamplingConfig(max_new_tokens=8),
                   rollout_batch_size=8, generation_batch_size=8, micro_batch_size=4, global_batch_size=8,
                   train_iters=1, kl_coef=0.0, actor_optim=OptimConfig(lr=0.0), tensorboard=False)
    trainer = RLTrainer(cfg)
    # the same tokenizer on both sides does not re-tokenise: force the path to compare it with the direct one
    trainer.rm_tokenizer, trainer.rm_chat_template, trainer.rm_max_length = tok, False, 64
    trainer._rm_prompt_cache = {}
    responses = [" 2 4 6", " 12 14 38", " hello there", " 1", " 10 20 30 40", "  8", " x = y + 7", " 24"]
    rows, prompt_lens, resp_lens, finished = [], [], [], []
    for i, text in enumerate(responses):
        p = trainer.prompts.prompt_ids(i)
        r = tok.encode(text) + ([tok.eos_id] if i % 2 == 0 else [])
        rows.append(p + r)
        prompt_lens.append(len(p))
        resp_lens.append(len(r))
        finished.append(i % 2 == 0)
    length = max(map(len, rows))
    tokens = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, prompt_lens[i]:len(row)] = 1
    exp = {"tokens": tokens, "position_ids": torch.arange(length).expand(len(rows), length).contiguous(),
           "action_mask": mask, "prompt_lens": torch.tensor(prompt_lens), "response_lens": torch.tensor(resp_lens),
           "finished": torch.tensor(finished), "prompt_index": torch.arange(len(rows))}
    direct = head_scores(trainer.roles.reward, exp, 4, shift_to_state=False) * mask
    retok = trainer.retokenized_credits(exp)
    return {"max_abs_diff": float((direct - retok).abs().max()), "n_actions": int(mask.sum()),
            "credit_std": float(direct[mask > 0].std())}


# ----------------------------------------------------------------------------------------------- cli

def run_cli(args) -> None:
    from megatron.core import parallel_state as ps

    from megatron_qrm import parallel
    from megatron_qrm.cli import main

    # Between commands keep the default process group and tear down megatron's groups only. Destroying
    # and re-creating the default group in one process under torchrun reuses the agent store's keys
    # (group names restart at 0): a rank can read the previous run's gloo address and the next
    # command hangs or fails with "connectFullMesh ... Connection refused".
    real_destroy = parallel.destroy

    def destroy_model_parallel_only() -> None:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    parallel.destroy = destroy_model_parallel_only
    with open(args.runs) as f:
        runs = json.load(f)
    results = []
    for argv in runs:
        out, err, t0 = io.StringIO(), io.StringIO(), time.time()
        escaped = None
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # a bug: user errors become an exit status with one line
            rc, escaped = 99, traceback.format_exc()
        results.append({"argv": argv, "rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "exception": escaped, "seconds": time.time() - t0})
        sys.stderr.write(f"rl_worker cli: rc={rc} {time.time() - t0:.1f}s: qrm {' '.join(argv)}\n")
        if escaped and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            break  # the other rank may wait in a collective: stop here
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.results, "w") as f:
            json.dump(results, f)
    real_destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("rollout")
    p.add_argument("--dir", required=True)
    p.add_argument("--layouts", default="tp1,tp2,pp2")
    p = sub.add_parser("learn")
    p.add_argument("--dir", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--target", type=int, default=-1, help="rewarded token id (default: the initial most frequent)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--eval-rounds", type=int, default=2)
    p = sub.add_parser("cli")
    p.add_argument("runs")
    p.add_argument("results")
    args = ap.parse_args()
    {"rollout": run_rollout, "learn": run_learn, "cli": run_cli}[args.mode](args)


if __name__ == "__main__":
    main()
