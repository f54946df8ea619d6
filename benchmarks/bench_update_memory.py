"""Peak memory of one RL actor-update micro-batch: the logits on the packed stream (now) vs gathered to rows
(before), at the vocabularies of SmolLM2 (49,152) and Llama-3 (128,256), with a tiny model.

One micro-batch of ``--rows`` rollout sequences (prompt + response lengths drawn from ``--min-len`` ..
``--max-len``), packed as the update packs them (``rl/update_batching.update_microbatches``), goes through the
policy's forward pass, the actor loss (PPO, with the logged entropy) and backward:

* ``after``: the trainer's own ``RLTrainer._actor_loss`` and ``update_forward_step`` (log-probs with megatron-core's
  vocab-parallel cross-entropy on the ``[1, T, V/tp]`` stream, entropy under no_grad in chunks when
  ``--entropy-coef`` is 0, only ``[N, S]`` results unpacked);
* ``before``: the previous code, reproduced here: the output gathered to ``[N, S, V/tp]`` rows (``unpack``: a
  gather and a ``where``), log-probs on a transposed copy, entropy with autograd on another fp32 copy.

How the memory is measured (CPU, so no ``torch.cuda.max_memory_allocated``): each configuration runs in a fresh
process with ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor above 64 KiB is its own ``mmap``, returned to the
system when freed, so the resident set follows the live tensors); the figure is the process's peak resident set
(``ru_maxrss``) during the step minus its resident set just before it (model built, batch made). Memory figures
do not depend on machine load. The model is tiny (2 layers, hidden 64): the logits dominate, as they do per
rank at scale. fp32 (CPU); on a GPU in bf16 the model output is half as large, the fp32 copies the same.

Run::

    python benchmarks/bench_update_memory.py --all            # the table of docs/benchmarks.md
    python benchmarks/bench_update_memory.py --vocab 49152 --impl after
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--impl", choices=("before", "after"), default="after")
    p.add_argument("--rows", type=int, default=4, help="sequences in the micro-batch")
    p.add_argument("--min-len", type=int, default=96)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all", action="store_true", help="both vocabularies x before/after, one process each")
    return p.parse_args(argv)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(args) -> dict:
    import gc

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_qrm import parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.data.packing import unpack
    from megatron_qrm.models import build_model
    from megatron_qrm.models.logits import mask_padded_vocab
    from megatron_qrm.rl import losses as rl_losses
    from megatron_qrm.rl.experience import shift_right
    from megatron_qrm.rl.kl import vocab_parallel_entropy
    from megatron_qrm.rl.trainer import RLTrainer
    from megatron_qrm.rl.update_batching import update_forward_step, update_microbatches

    parallel.initialize(ParallelConfig())
    torch.manual_seed(args.seed)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=args.vocab, max_position_embeddings=args.max_len)
    model = build_model(cfg, "policy")
    n, s = args.rows, args.max_len
    lengths = torch.randint(args.min_len, args.max_len + 1, (n,))
    prompt = lengths // 2
    tokens = torch.randint(0, args.vocab, (n, s))
    cols = torch.arange(s)
    action = ((cols >= prompt[:, None]) & (cols < lengths[:, None])).float()
    exp = {"tokens": tokens, "position_ids": cols.expand(n, s).clone(), "action_mask": action,
           "logp_old": -torch.rand(n, s), "advantages": torch.randn(n, s), "prompt_lens": prompt,
           "response_lens": lengths - prompt}
    keys = ("tokens", "position_ids", "action_mask", "logp_old", "advantages")
    (batch,) = update_microbatches(exp, list(range(n)), keys, n, pad_id=0, pack_capacity=n * s)
    me = SimpleNamespace(cfg=SimpleNamespace(algo="ppo", clip_eps=0.2, entropy_coef=args.entropy_coef),
                         tokenizer=SimpleNamespace(vocab_size=args.vocab))

    def after_loss(output, b):
        return RLTrainer._actor_loss(me, output, b)

    def before_loss(output, b):  # the update before it moved to the stream (git 3bd9804^)
        rows_out = unpack(output, b)  # [N, S, V]: a gather and a where
        toks = unpack(b["tokens"], b)
        labels = torch.cat([toks[:, 1:], toks[:, -1:]], dim=1)
        logits = mask_padded_vocab(rows_out.float(), args.vocab)
        nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.t().contiguous()).t()
        logp = shift_right(-nll)
        out = rl_losses.ppo_policy_loss(logp, b["logp_old"], b["advantages"], b["action_mask"], clip_eps=0.2)
        ent = vocab_parallel_entropy(mask_padded_vocab(rows_out.float(), args.vocab),
                                     ps.get_tensor_model_parallel_group())
        ent_sum = (shift_right(ent) * b["action_mask"]).sum()
        loss = out.loss_sum - args.entropy_coef * ent_sum if args.entropy_coef > 0 else out.loss_sum
        return loss, out.num_tokens, {}

    step = update_forward_step(after_loss if args.impl == "after" else before_loss)
    gc.collect()
    rss0, peak0 = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output, loss_fn = step(iter([batch]), model)
    loss, _, _ = loss_fn(output)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = int(batch["tokens"].shape[1])
    vpad = output.shape[-1]
    return {"vocab": args.vocab, "impl": args.impl, "rows": n, "row_length": s, "stream_tokens": t,
            "padded_vocab": vpad, "entropy_coef": args.entropy_coef, "step_peak_mib": (peak - rss0) / 2**20,
            "peak_before_step_exceeded": peak <= peak0, "logits_stream_mib": t * vpad * 4 / 2**20,
            "logits_rows_mib": n * s * vpad * 4 / 2**20, "loss": float(loss)}


def main(argv=None):
    args = parse_args(argv)
    if not args.all:
        print(json.dumps(run_one(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for vocab in (49152, 128256):
        for impl in ("before", "after"):
            cmd = [sys.executable, os.path.abspath(__file__), "--vocab", str(vocab), "--impl", impl,
                   "--rows", str(args.rows), "--min-len", str(args.min_len), "--max-len", str(args.max_len),
                   "--entropy-coef", str(args.entropy_coef), "--seed", str(args.seed)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'vocab':>7} {'impl':>6} {'T':>5} {'N x S':>8} {'[T,V] fp32 MiB':>15} {'[N,S,V] fp32 MiB':>17} "
          f"{'step peak MiB':>14} {'loss':>10}")
    for r in rows:
        print(f"{r['vocab']:>7} {r['impl']:>6} {r['stream_tokens']:>5} {str(r['rows']) + 'x' + str(r['row_length']):>8} "
              f"{r['logits_stream_mib']:>15.0f} {r['logits_rows_mib']:>17.0f} {r['step_peak_mib']:>14.0f} "
              f"{r['loss']:>10.5f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
