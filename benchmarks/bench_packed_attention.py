"""Packed (THD) causal attention on this machine: the local spec's bucketed SDPA against torch's library kernels.

Forward + backward of one layer's core attention over a packed stream of ``--seqs`` sequences (lengths drawn
from ``--min-len`` .. ``--max-len``), ``[t, heads, head_dim]`` with GQA, for:

* ``bucketed``: :func:`megatron_qrm.models.packed_attention.bucketed_packed_attention` (the CPU path);
* ``flex_eager`` / ``flex_compiled``: FlexAttention with the document mask (or, ``--shared``, the prefix-tree mask
  of shared-prompt packing), eager and through ``torch.compile``;
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen; CUDA fp16/bf16 only in torch
  2.13 -- on CPU the error is printed).

Median of ``--repeats`` after ``--warmup``, measured in turns. Timings need an idle machine.

    python benchmarks/bench_packed_attention.py --seqs 16 --min-len 64 --max-len 512 [--shared] [--device cuda --bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--shared", action="store_true", help="pairs sharing a prompt: the prefix-tree mask")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forward-only", action="store_true",
                   help="no backward (FlexAttention has no CPU backward in torch 2.13): scoring / evaluation")
    p.add_argument("--skip", default="", help="comma-separated kernels not to run")
    args = p.parse_args(argv)

    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_qrm.models import packed_attention as pa

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.seqs,), generator=g).tolist()
    parent = None
    if args.shared:  # every two sequences share a prompt of half the first one's length
        segs, parent = [], []
        for i in range(0, len(lengths) - 1, 2):
            prompt = lengths[i] // 2
            parent_index = len(segs)
            segs += [prompt, lengths[i] - prompt, max(lengths[i + 1] - prompt, 1)]
            parent += [-1, parent_index, parent_index]
        lengths = segs
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=args.device)
    t, m = int(cu[-1]), max(lengths) * 2
    if parent is not None:
        params = pa.PrefixSharingPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m,
                                                 max_seqlen_kv=m, segment_parent=torch.tensor(parent, device=args.device))
    else:
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m,
                                 max_seqlen_kv=m)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    grad = not args.forward_only
    q = torch.randn(t, args.heads, args.head_dim, device=args.device, dtype=dtype, requires_grad=grad)
    k = torch.randn(t, args.groups, args.head_dim, device=args.device, dtype=dtype, requires_grad=grad)
    v = torch.randn(t, args.groups, args.head_dim, device=args.device, dtype=dtype, requires_grad=grad)
    scale = args.head_dim ** -0.5
    kernels = {
        "bucketed": lambda: pa.bucketed_packed_attention(q, k, v, params, scale, enable_gqa=True),
        "flex_eager": lambda: pa.flex_packed_attention(q, k, v, params, scale, compiled=False),
        "flex_compiled": lambda: pa.flex_packed_attention(q, k, v, params, scale, compiled=True),
        "varlen": lambda: pa.varlen_packed_attention(q, k, v, params, scale),
    }
    if args.shared:
        kernels.pop("varlen")  # a document-mask kernel: it cannot mask a prefix tree
    for name in filter(None, args.skip.split(",")):
        kernels.pop(name, None)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    errors, times = {}, {n: [] for n in kernels}

    def once(fn):
        out = fn()
        if grad:
            out.float().square().sum().backward()
        sync()

    for name, fn in list(kernels.items()):
        try:
            for _ in range(args.warmup):
                once(fn)
        except Exception as e:  # noqa: BLE001  (a kernel this device lacks: report why)
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            kernels.pop(name)
            times.pop(name)
    reference = kernels["bucketed"]() if "bucketed" in kernels else None
    max_diff = {n: float((fn() - reference).abs().max()) for n, fn in kernels.items()} if reference is not None else {}
    for _ in range(args.repeats):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            once(fn)
            times[name].append(time.perf_counter() - t0)
    res = {"tokens": t, "segments": len(lengths), "shared": args.shared, "device": args.device,
           "pass": "forward" if args.forward_only else "forward+backward",
           "dtype": str(dtype), "median_ms": {n: 1e3 * statistics.median(v) for n, v in times.items()},
           "max_abs_diff_vs_bucketed": max_diff, "errors": errors}
    for n, ms in res["median_ms"].items():
        print(f"{n:>14}: {ms:9.2f} ms {res['pass']}  (max |diff| vs bucketed {max_diff.get(n, float('nan')):.1e})")
    for n, e in errors.items():
        print(f"{n:>14}: unavailable ({e})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
