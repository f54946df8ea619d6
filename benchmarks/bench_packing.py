"""Packed vs padded `qrm train-rm` steps on the real GSM8K preference pairs: padding share and real tokens/s.

What is measured (single process; CPU, or a GPU if there is one):

* the pairs of ``--data`` (default ``/work/shared/data/gsm8k/test_pairwise.jsonl``) tokenised by the trainer's
  own :class:`~megatron_qrm.data.PreferenceDataset` with ``--tokenizer`` (a SentencePiece ``.model`` or an HF
  directory; without one, a SentencePiece BPE of ``--vocab`` pieces is trained on the pairs' own text by the
  demo's :func:`~megatron_qrm.demo.tokenizer.train_tokenizer` -- say which in any recorded figure);
* ``--global-batches`` consecutive global batches of ``--global-batch-size`` shuffled pairs (the trainer's
  :class:`~megatron_qrm.data.sampler.GlobalBatchSampler`), each cut into micro-batches the way ``qrm train-rm``
  does: **padded** (today's default before packing: ``--micro-batch-size`` pairs per micro-batch, each padded to
  its longest sequence), **grouped** (``--no-pack-sequences --group-by-length``: the same, the global batch
  sorted by length first), **packed** (``data/packing.py``: micro-batches of up to micro-batch x 2 x
  ``--seq-length`` tokens, THD, no padding but the rounding of each stream to a multiple of 8) and **shared**
  (``--pack-shared-prompts``: packed, each pair's prompt computed once), at every micro-batch size of
  ``--micro-batch-sizes``; real tokens are the unpacked pairs' tokens (both sequences) in every configuration;
* one full optimizer step per global batch (the trainer's model, DDP, optimizer and forward step); the
  configurations run in turns (padded m=2, grouped m=2, packed m=2, padded m=8, ...; ``--repeats`` rounds after
  one warm-up round) so that a change in machine load hits them alike. Reported: padding share of the computed
  tokens, median wall and process-CPU seconds per step, real (non-padding) tokens per CPU second, and the
  speed over the padded configuration at the same micro-batch size in CPU time and in wall time. With
  ``--threads 1`` (the default) the CPU time is the work this process did, which a loaded machine does not
  inflate the way it inflates wall time.

Example (the figures in docs/benchmarks.md)::

    python benchmarks/bench_packing.py --repeats 4 --global-batches 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings

DEFAULT_DATA = "/work/shared/data/gsm8k/test_pairwise.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="packed vs padded train-rm steps on GSM8K pairs")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--tokenizer", help="SentencePiece .model or HF tokenizer dir (default: train a BPE on --data)")
    p.add_argument("--vocab", type=int, default=8000, help="pieces of the BPE trained when --tokenizer is not given")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--micro-batch-sizes", default="2,8")
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--global-batches", type=int, default=2, help="distinct global batches cycled through")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loss", default="qrm", choices=("qrm", "orm", "dpo"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--profile", help="comma list of configs (e.g. 'packed m=2,packed m=8'): after the timed rounds, "
                   "profile one step of each (torch.profiler, top operators by self CPU time)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the process CPU time is the work done, robust to a loaded machine)")
    return p.parse_args(argv)


def tokenizer_path(args, workdir: str) -> tuple[str, str]:
    if args.tokenizer:
        return args.tokenizer, args.tokenizer
    import json

    from megatron_qrm.demo.tokenizer import train_tokenizer

    texts = []
    with open(args.data) as f:
        for line in f:
            r = json.loads(line)
            texts += [r["instruction"], r["chosen"], r["rejected"]]
    path = train_tokenizer(texts, os.path.join(workdir, "tok"), vocab_size=args.vocab)
    return path, f"SentencePiece BPE, {args.vocab} pieces, trained on the pairs' text (demo/tokenizer.py)"


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    import megatron.core
    import numpy as np
    import torch

    from megatron_qrm import parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, load_tokenizer
    from megatron_qrm.data.packing import padding_share, rank_microbatches
    from megatron_qrm.data.preference import pair_microbatch
    from megatron_qrm.data.sampler import GlobalBatchSampler
    from megatron_qrm.models import PrecisionConfig, build_model
    from megatron_qrm.rewards.scoring import RewardLossConfig, train_forward_step
    from megatron_qrm.training.engine import OptimConfig, build_optimizer, run_global_batch, wrap_ddp

    if not os.path.exists(args.data):
        raise SystemExit(f"--data {args.data}: not found")
    parallel.initialize(ParallelConfig(seed=args.seed))
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, python {platform.python_version()}, "
          f"device: {dev}, torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as workdir:
        tok_path, tok_desc = tokenizer_path(args, workdir)
        tokenizer = load_tokenizer(tok_path)
        dataset = PreferenceDataset(PreferenceDataConfig(path=args.data, seq_length=args.seq_length), tokenizer)
    lengths = dataset.sequence_lengths()
    print(f"tokenizer: {tok_desc}; {len(dataset)} pairs; sequence tokens p5/median/p95/max "
          f"{np.percentile(lengths, 5):.0f}/{np.median(lengths):.0f}/{np.percentile(lengths, 95):.0f}/{lengths.max()}")
    prompt_tokens = int(dataset.prompt_lengths().sum())
    print(f"each pair's prompt is computed twice: the second copy is {prompt_tokens / lengths.sum():.1%} of the real "
          "tokens (what shared-prompt packing, --pack-shared-prompts, saves less one token per pair)")

    loss_cfg = RewardLossConfig(args.loss)
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                            num_query_groups=args.groups, ffn_hidden_size=args.ffn, vocab_size=tokenizer.vocab_size,
                            max_position_embeddings=args.seq_length)
    optim_cfg = OptimConfig(lr=1e-6)
    model = build_model(model_cfg, loss_cfg.role, precision=PrecisionConfig(bf16=torch.cuda.is_available()),
                        local_attention="sdpa")
    ddp = wrap_ddp(model, optim_cfg)
    optimizer, _ = build_optimizer(ddp, optim_cfg, train_iters=1_000_000)
    forward_step = train_forward_step(loss_cfg)
    ref = torch.zeros(len(dataset), 2) - 50.0 if args.loss == "dpo" else None
    pair_tokens = lengths.sum(axis=1)

    configs: dict[str, list[list[dict]]] = {}
    mbs_list = [int(m) for m in args.micro_batch_sizes.split(",")]
    for mbs in mbs_list:
        sampler = GlobalBatchSampler(len(dataset), args.global_batch_size, mbs, 0, 1, seed=args.seed)
        for mode in ("padded", "grouped", "packed", "shared"):
            capacity = mbs * 2 * args.seq_length if mode in ("packed", "shared") else None
            sizes = dataset.pair_tokens(shared_prompt=mode == "shared")
            batches = []
            for g in range(args.global_batches):
                gb = sampler.global_batch(g * args.global_batch_size)
                groups = rank_microbatches(gb, sizes[gb], micro_batch_size=mbs, dp_rank=0, dp_size=1,
                                           pack_capacity=capacity, group_by_length_=mode == "grouped")
                batches.append([pair_microbatch(dataset, idx, tokenizer.pad_id, 8, pack=capacity is not None,
                                                share_prompts=mode == "shared", ref_sums=ref) for idx in groups])
            configs[f"{mode} m={mbs}"] = batches
    real_tokens = [int(pair_tokens[GlobalBatchSampler(len(dataset), args.global_batch_size, 1, 0, 1,
                                                       seed=args.seed).global_batch(g * args.global_batch_size)].sum())
                   for g in range(args.global_batches)]

    def step(micro: list[dict]) -> None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        run_global_batch(ddp, forward_step, micro, forward_only=False)
        optimizer.step()

    times: dict[str, list[float]] = {k: [] for k in configs}  # wall seconds per real token
    cpu_times: dict[str, list[float]] = {k: [] for k in configs}  # process CPU seconds per real token
    for rnd in range(args.repeats + 1):  # round 0: warm-up, not timed
        for name, batches in configs.items():
            for g, micro in enumerate(batches):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                step(micro)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if rnd:
                    times[name].append((time.perf_counter() - t0) / real_tokens[g])
                    cpu_times[name].append((time.process_time() - c0) / real_tokens[g])

    for name in (args.profile.split(",") if args.profile else []):
        if name.strip() not in configs:
            raise SystemExit(f"--profile: {name!r} is not one of {', '.join(configs)}")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(configs[name.strip()][0])
        print(f"--- profile: one step of {name.strip()}\n"
              + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.groups} groups, "
          f"ffn {args.ffn}, "
          f"vocab {tokenizer.vocab_size}; loss {args.loss}; --seq-length {args.seq_length}; global batch "
          f"{args.global_batch_size} pairs x {args.global_batches} batches x {args.repeats} rounds")
    print(f"{'config':<13} {'micro-batches':>13} {'padding':>8} {'wall s/step':>11} {'CPU s/step':>10} "
          f"{'real tok/s (CPU)':>16} {'vs padded (CPU)':>15} {'vs padded (wall)':>16}")
    for name, batches in configs.items():
        wall, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        peer = f"padded m={name.split('=')[1]}"
        n_micro = sum(len(b) for b in batches) / len(batches)
        pad = padding_share([mb for b in batches for mb in b])
        print(f"{name:<13} {n_micro:>13.1f} {pad:>7.1%} {wall * np.mean(real_tokens):>11.2f} "
              f"{cpu * np.mean(real_tokens):>10.2f} {1 / cpu:>16.0f} "
              f"{statistics.median(cpu_times[peer]) / cpu:>14.2f}x {statistics.median(times[peer]) / wall:>15.2f}x")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
