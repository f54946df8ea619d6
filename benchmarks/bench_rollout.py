"""Rollout throughput with the KV cache vs full recomputation, and the phase shares of a PPO iteration.

Part 1 samples the same prompts with the same seed twice from one model: with the sampler's KV cache
(``megatron_qrm.models.kv_decode``: one prefill, then one new position per step) and with full recomputation of the prefix at every step
(``SamplingConfig(use_kv_cache=False)``), checks that both produce the same tokens, and reports generated
tokens/s and their ratio. Full recomputation costs O(n^2) positions per sequence against O(n), so the gap
grows with the response length; use a long generation (default 256 new tokens).

Part 2 runs a few PPO iterations of ``RLTrainer`` (same architecture, a randomly initialised actor and
Q-RM, synthetic prompts, SentencePiece tokenizer) and reports the trainer's logged ``generate_s``,
``score_s`` and ``update_s`` per iteration (first iteration dropped as warm-up) and each phase's share.

    python benchmarks/bench_rollout.py                       # defaults below, CPU or one GPU
    python benchmarks/bench_rollout.py --new-tokens 512 --batch 16 --json out.json

Single process (TP = PP = 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-attention-heads", type=int, default=8)
    ap.add_argument("--num-query-groups", type=int, default=4)
    ap.add_argument("--ffn-hidden-size", type=int, default=704)
    ap.add_argument("--batch", type=int, default=8, help="sequences per generate() call")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--kv-repeats", type=int, default=3, help="timed KV-cache runs (median)")
    ap.add_argument("--full-repeats", type=int, default=2, help="timed full-recompute runs (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--ppo-iters", type=int, default=3, help="PPO iterations for the phase shares (0: skip)")
    ap.add_argument("--ppo-rollout", type=int, default=16, help="prompts per PPO iteration")
    ap.add_argument("--ppo-new-tokens", type=int, default=128)
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_args(argv)


def _tokenizer(workdir: str):
    from helpers_tokenizers import make_sentencepiece_model

    from megatron_qrm.data.synthetic import corpus, parity_pairs, sorting_pairs, write_jsonl

    rows = parity_pairs(256, seed=0)
    pairs = write_jsonl(os.path.join(workdir, "pairs.jsonl"), rows)
    texts = corpus(rows) + corpus(sorting_pairs(64, seed=0)) + [" ".join(map(str, range(1, 40)))] * 4
    return make_sentencepiece_model(os.path.join(workdir, "tok"), texts, vocab_size=400), pairs


def bench_generation(args, model_cfg) -> dict:
    import torch

    from megatron_qrm.models import build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    model = build_model(model_cfg, "policy")
    g = torch.Generator().manual_seed(0)
    vocab = model_cfg.vocab_size
    prompts = [[2] + torch.randint(4, vocab, (args.prompt_len - 1,), generator=g).tolist() for _ in range(args.batch)]
    max_length = args.prompt_len + args.new_tokens
    # EOS outside the vocabulary (never sampled): every row generates exactly --new-tokens tokens

    def run(kv: bool, new_tokens: int):
        w0, c0 = time.perf_counter(), time.process_time()
        r = generate(model, prompts, SamplingConfig(temperature=1.0, max_new_tokens=new_tokens, use_kv_cache=kv),
                     eos_id=vocab, pad_id=0, vocab_size=vocab, max_length=max_length, seed=1)
        return time.perf_counter() - w0, time.process_time() - c0, r

    run(True, 8)  # warm-up (allocations, first-call paths)
    run(False, 8)
    # interleaved (kv, full, kv, full, kv, ...): a shared machine's load drifts, adjacent runs see alike
    times = {True: [], False: []}
    rollouts = {}
    for i in range(args.kv_repeats + args.full_repeats):
        kv = i % 2 == 0 if i < 2 * min(args.kv_repeats, args.full_repeats) else args.kv_repeats > args.full_repeats
        wall, cpu, rollouts[kv] = run(kv, args.new_tokens)
        times[kv].append((wall, cpu))
        print(f"  {'KV cache' if kv else 'full recompute'}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    same = torch.equal(rollouts[True].tokens, rollouts[False].tokens)
    tokens = float(rollouts[True].action_mask.sum())
    kv_s = statistics.median(w for w, _ in times[True])
    full_s = statistics.median(w for w, _ in times[False])
    kv_cpu = statistics.median(c for _, c in times[True])
    full_cpu = statistics.median(c for _, c in times[False])
    return {"generated_tokens": tokens, "kv_s": kv_s, "full_s": full_s, "kv_tokens_per_s": tokens / kv_s,
            "full_tokens_per_s": tokens / full_s, "speedup": full_s / kv_s, "kv_cpu_s": kv_cpu, "full_cpu_s": full_cpu,
            "speedup_cpu": full_cpu / kv_cpu, "same_tokens": same, "kv_times": times[True],
            "full_times": times[False]}


def bench_ppo(args, model_cfg, workdir: str, tok_path: str, pairs: str) -> dict:
    import dataclasses

    from megatron_qrm import checkpointing
    from megatron_qrm.data import PromptDataConfig
    from megatron_qrm.models import build_model
    from megatron_qrm.rl.rollout import SamplingConfig
    from megatron_qrm.rl.trainer import RLConfig, RLTrainer
    from megatron_qrm.training.engine import OptimConfig
    from megatron_qrm.training.metrics_log import read_metrics

    seq = 64 + args.ppo_new_tokens
    cfg = dataclasses.replace(model_cfg, max_position_embeddings=max(model_cfg.max_position_embeddings, seq))
    for role, name in (("policy", "actor"), ("reward", "qrm")):
        model = build_model(cfg, role)
        meta = {"kind": role, "role": role, "model": cfg.to_dict(), "tokenizer": tok_path, "seq_length": seq}
        if role == "reward":
            meta["reward_loss"] = {"kind": "qrm"}
        checkpointing.save_checkpoint(os.path.join(workdir, name), 0, model, meta)
    save = os.path.join(workdir, "ppo")
    rl = RLConfig(algo="ppo", prompts=PromptDataConfig(path=pairs, seq_length=seq),
                  reward_model=os.path.join(workdir, "qrm"), actor=os.path.join(workdir, "actor"), save=None,
                  log_dir=save, sampling=SamplingConfig(temperature=1.0, max_new_tokens=args.ppo_new_tokens),
                  rollout_batch_size=args.ppo_rollout, generation_batch_size=args.ppo_rollout,
                  forward_micro_batch_size=8, micro_batch_size=4, global_batch_size=min(8, args.ppo_rollout),
                  train_iters=args.ppo_iters, kl_coef=0.01, actor_optim=OptimConfig(lr=1e-5),
                  critic_optim=OptimConfig(lr=1e-5), tensorboard=False)
    RLTrainer(rl).train()
    recs = [r for r in read_metrics(save) if "train/generate_s" in r]
    timed = recs[1:] if len(recs) > 1 else recs  # iteration 1 warms up
    phases = {k: statistics.mean(r[f"train/{k}"] for r in timed) for k in ("generate_s", "score_s", "update_s")}
    total = sum(phases.values())
    return {"iterations_timed": len(timed), **phases, "iteration_s": statistics.mean(r["train/iteration_s"] for r in timed),
            "shares": {k: v / total for k, v in phases.items()},
            "response_length": statistics.mean(r["train/response_length"] for r in timed)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_qrm import parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    parallel.initialize(ParallelConfig(1, 1, seed=1234))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as workdir:
        tok_path, pairs = _tokenizer(workdir)
        from megatron_qrm.data import load_tokenizer

        vocab = load_tokenizer(tok_path).vocab_size
        model_cfg = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                                ffn_hidden_size=args.ffn_hidden_size, vocab_size=vocab,
                                max_position_embeddings=max(1024, args.prompt_len + args.new_tokens))
        out = {"device": device, "torch": torch.__version__, "model": model_cfg.to_dict(), "args": vars(args)}
        gen = bench_generation(args, model_cfg)
        out["generation"] = gen
        print(f"device: {device}")
        print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads} "
              f"(groups {args.num_query_groups}), ffn {args.ffn_hidden_size}, vocab {vocab}")
        print(f"generation: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
              f"({gen['generated_tokens']:.0f} generated)")
        print(f"  KV cache:          {gen['kv_tokens_per_s']:9.1f} tokens/s  ({gen['kv_s']:.2f} s wall, "
              f"{gen['kv_cpu_s']:.2f} s CPU, median of {len(gen['kv_times'])})")
        print(f"  full recompute:    {gen['full_tokens_per_s']:9.1f} tokens/s  ({gen['full_s']:.2f} s wall, "
              f"{gen['full_cpu_s']:.2f} s CPU, median of {len(gen['full_times'])})")
        print(f"  speed-up KV/full:  {gen['speedup']:.1f}x wall, {gen['speedup_cpu']:.1f}x CPU time   "
              f"identical tokens: {gen['same_tokens']}")
        if args.ppo_iters > 0:
            ppo = bench_ppo(args, model_cfg, workdir, tok_path, pairs)
            out["ppo"] = ppo
            s = ppo["shares"]
            print(f"PPO iteration (rollout {args.ppo_rollout} prompts, up to {args.ppo_new_tokens} new tokens, "
                  f"mean response {ppo['response_length']:.0f}; mean of {ppo['iterations_timed']} iterations after "
                  f"the first): {ppo['iteration_s']:.2f} s")
            for k in ("generate_s", "score_s", "update_s"):
                print(f"  {k[:-2]:9s} {ppo[k]:7.2f} s  {100 * s[k]:5.1f}%")
            print(f"  ratios generate:score:update = 1 : {ppo['score_s'] / ppo['generate_s']:.2f} : "
                  f"{ppo['update_s'] / ppo['generate_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    parallel.destroy()
    return 0 if out["generation"]["same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
