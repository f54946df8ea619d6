"""The ``qrm serve`` subcommand's flags."""

from __future__ import annotations

import argparse
import os

from megatron_qrm.arguments import add_parallel_args, parallel_config_from_args, use_bf16


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a reward model's per-token credits over HTTP (/v1/score, OpenRLHF "
                       "/get_reward, /health, /metrics)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, help="reward checkpoint (save dir or iter_* dir): Q-RM, ORM or DPO-RM")
    p.add_argument("--tokenizer", help="default: the checkpoint's")
    p.add_argument("--reference-checkpoint", help="DPO-RM without LoRA: its frozen reference model "
                   "(default: the checkpoint's recorded --pretrained-checkpoint)")
    add_parallel_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only by default)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="dynamic batching: prompt + response tokens per batch (also the padded size of a "
                        "forward micro-batch)")
    g.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="dynamic batching: longest wait of a queued sequence for others to join its batch")
    g.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    g.add_argument("--max-items", type=int, default=256, help="more items (or queries) in one request get 413")
    g.add_argument("--graceful-timeout", type=float, default=10.0,
                   help="seconds SIGTERM/SIGINT waits for requests in flight (answered work is drained) before the "
                        "remaining connections, e.g. a client stalled mid-body, are closed and the server exits")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                   "(default: $QRM_API_KEY when set; else no check)")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args) -> int:
    from megatron_qrm.serving.server import ServeConfig, serve

    # numeric flags were checked by cli.main (arguments.NUMERIC_FLAG_RULES)
    return serve(ServeConfig(
        load=args.load, tokenizer=args.tokenizer, reference_checkpoint=args.reference_checkpoint,
        parallel=parallel_config_from_args(args), bf16=use_bf16(args), host=args.host, port=args.port,
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
        max_items=args.max_items, api_key=args.api_key or os.environ.get("QRM_API_KEY") or None,
        graceful_timeout_s=args.graceful_timeout))
