"""Time one reward-model training step and, separately, the pairwise loss alone.

What is measured (single process; on CPU through megatron_qrm.cpu, on a GPU if there is one):

* **step**: one full optimizer step of ``qrm train-rm`` on one micro-batch of ``B`` pairs
  (``2B`` sequences of ``--seq-length`` tokens): zero the grad buffers, megatron-core's
  forward-backward schedule (model forward, token head, loss, backward), optimizer step. The model,
  DDP wrapper, optimizer and forward step are the trainer's own (``models.build_model``,
  ``training.engine.wrap_ddp/build_optimizer/run_global_batch``, ``rewards.scoring.train_forward_step``).
* **loss**: the loss function alone (``rewards.qrm_loss`` / ``rewards.orm_loss``) forward + backward on
  random scores of the same ``[2B, S]`` shape with the same response mask.

Each is timed ``--repeats`` times after ``--warmup`` untimed runs, all measurements taken in turns
(step qrm, loss qrm, step orm, loss orm, step qrm, ...) so that changing machine load hits them alike;
the median (and the minimum) is reported. "loss share of step" is median(loss) / median(step);
"step tokens/s" is 2B x S / median(step).

Example::

    python benchmarks/bench_rm_step.py --layers 2 --hidden 256 --seq-length 256 --micro-batch-size 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="time a reward-model training step vs. the loss alone")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, help="attention heads (default: hidden // 64, at least 1)")
    p.add_argument("--ffn", type=int, help="FFN hidden size (default: 4 * hidden)")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size of the random tokens")
    p.add_argument("--seq-length", type=int, default=256, help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt-fraction", type=float, default=0.5, help="share of each sequence that is prompt")
    p.add_argument("--micro-batch-size", type=int, default=4, help="preference pairs (2x sequences)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--losses", default="qrm,orm", help="comma list out of qrm, orm")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def make_batch(b: int, s: int, vocab: int, prompt_fraction: float, seed: int):
    """A collated-looking micro-batch of ``b`` pairs: random tokens, full length, rows ``i`` and ``b + i`` with
    the same prompt (``prompt_fraction`` of the length), as a preference pair's chosen and rejected."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 2 * b
    tokens = torch.randint(4, vocab, (n, s), generator=g)
    prompt_len = max(1, min(s - 1, int(round(s * prompt_fraction))))
    tokens[b:, :prompt_len] = tokens[:b, :prompt_len]
    response_mask = torch.zeros(n, s)
    response_mask[:, prompt_len:] = 1.0
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    label_mask = torch.zeros_like(response_mask)
    label_mask[:, :-1] = response_mask[:, 1:]
    return {
        "tokens": tokens,
        "position_ids": torch.arange(s).expand(n, s).contiguous(),
        "response_mask": response_mask,
        "labels": labels,
        "label_mask": label_mask,
        "index": torch.arange(b),
    }


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Times of each function in ``fns``, run in turns (a, b, a, b, ...) so that a change in machine load
    during the run affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def make_step(args, kind: str, batch):
    """A function running one full training step with ``--reward-loss kind`` (model built once)."""
    from megatron_qrm.config import ModelConfig
    from megatron_qrm.models import PrecisionConfig, build_model
    from megatron_qrm.parallel import set_seed
    from megatron_qrm.rewards.scoring import RewardLossConfig

    set_seed(args.seed)
    heads = args.heads or max(1, args.hidden // 64)
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=heads,
                            ffn_hidden_size=args.ffn or 4 * args.hidden, vocab_size=args.vocab,
                            max_position_embeddings=max(args.seq_length, 128))
    loss_cfg = RewardLossConfig(kind)
    model = build_model(model_cfg, loss_cfg.role, precision=PrecisionConfig(bf16=False))
    return train_step_fn(model, loss_cfg, batch, lr=1e-5)


def train_step_fn(model, loss_cfg, batch, lr: float):
    """One optimizer step of the trainer on ``batch``, as ``qrm train-rm`` runs it: megatron-core DDP and
    optimizer around ``model``, its forward-backward schedule, ``train_forward_step``. Also used by
    bench_vs_hf.py."""
    from megatron_qrm.rewards.scoring import train_forward_step
    from megatron_qrm.training.engine import OptimConfig, build_optimizer, run_global_batch, wrap_ddp

    optim_cfg = OptimConfig(lr=lr, bf16=False)
    ddp = wrap_ddp(model, optim_cfg)
    optimizer, scheduler = build_optimizer(ddp, optim_cfg, train_iters=1_000_000)
    forward_step = train_forward_step(loss_cfg)
    ddp.train()

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        run_global_batch(ddp, forward_step, [batch], forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)

    return step


def make_loss(args, kind: str, batch):
    """A function running the loss alone (forward + backward) on random scores of the step's shape."""
    import torch

    from megatron_qrm.rewards import orm_loss, qrm_loss

    mask = batch["response_mask"]
    scores = torch.randn(mask.shape, generator=torch.Generator().manual_seed(args.seed))
    if torch.cuda.is_available():
        scores, mask = scores.cuda(), mask.cuda()
    scores.requires_grad_(True)

    def run():
        scores.grad = None
        out = qrm_loss(scores, mask, beta=0.2, gamma=2.0) if kind == "qrm" else orm_loss(scores, mask)
        out.loss_sum.backward()

    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # megatron-core logs its DDP/optimizer configs at INFO
    import megatron.core
    import torch

    from megatron_qrm import parallel
    from megatron_qrm.config import ParallelConfig

    kinds = [k.strip() for k in args.losses.split(",") if k.strip()]
    for k in kinds:
        if k not in ("qrm", "orm"):
            raise SystemExit(f"--losses: {k!r} is not one of qrm, orm")
    parallel.initialize(ParallelConfig(seed=args.seed))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, python "
          f"{platform.python_version()}, device: {dev}, torch threads: {torch.get_num_threads()}")
    heads = args.heads or max(1, args.hidden // 64)
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {heads}, ffn {args.ffn or 4 * args.hidden}, "
          f"vocab {args.vocab}; batch: {args.micro_batch_size} pairs = {2 * args.micro_batch_size} sequences x "
          f"{args.seq_length} tokens; median of {args.repeats} after {args.warmup} warm-up runs")

    batch = make_batch(args.micro_batch_size, args.seq_length, args.vocab, args.prompt_fraction, args.seed)
    n_tokens = batch["tokens"].numel()
    fns = {}
    for kind in kinds:
        fns[("step", kind)] = make_step(args, kind, batch)
        fns[("loss", kind)] = make_loss(args, kind, batch)
    times = timed_interleaved(fns, args.repeats, args.warmup)
    rows = []
    for kind in kinds:
        st, lt = times[("step", kind)], times[("loss", kind)]
        rows.append((kind, statistics.median(st), statistics.median(lt), min(st), min(lt)))

    print()
    print(f"{'loss':<6}{'step ms (median)':>18}{'step ms (min)':>15}{'loss fwd+bwd ms (median)':>26}"
          f"{'loss ms (min)':>15}{'loss share':>12}{'step tokens/s':>15}")
    for kind, step, loss, step_min, loss_min in rows:
        print(f"{kind:<6}{step * 1e3:>18.2f}{step_min * 1e3:>15.2f}{loss * 1e3:>26.3f}{loss_min * 1e3:>15.3f}"
              f"{100 * loss / step:>11.2f}%{n_tokens / step:>15.0f}")
    print()
    for kind, step, loss, _, _ in rows:
        print(f"{kind}: loss share of step: {100 * loss / step:.2f}% "
              f"(step {step * 1e3:.2f} ms, {n_tokens / step:.0f} tokens/s)")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
