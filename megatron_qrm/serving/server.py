"""``qrm serve``: load a reward checkpoint on every rank, serve HTTP on rank 0 (uvicorn), stop cleanly.

Rank 0: the scorer loads; uvicorn serves on a thread of its own while the main thread runs the dynamic
batcher (the model stays on the thread that built it). SIGTERM / SIGINT tell uvicorn to stop accepting
connections and to wait for the requests in flight (at most ``--graceful-timeout`` seconds: a client stalled
mid-body cannot hold the server), whose sequences the batcher keeps scoring without waiting for more; when
uvicorn has returned, the batcher scores what is still queued, then releases the other ranks.
The other ranks ignore SIGTERM/SIGINT (torchrun forwards them to every worker) and leave when rank 0
releases them, so that no collective is cut in half.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron_qrm.errors import UserError
from megatron_qrm.config import ParallelConfig

log = logging.getLogger("megatron_qrm")


@dataclass
class ServeConfig:
    load: str
    tokenizer: Optional[str] = None
    reference_checkpoint: Optional[str] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bf16: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_body_bytes: int = 8 << 20
    max_items: int = 256
    api_key: Optional[str] = None
    # SIGTERM: seconds to wait for requests in flight before closing what is left (stalled clients)
    graceful_timeout_s: float = 10.0


def serve(cfg: ServeConfig) -> int:
    from megatron_qrm.serving.scorer import RewardScorer, ScorerConfig

    if _env_rank() != 0:
        # torchrun sends SIGTERM to every worker: only rank 0 decides when the followers stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    scorer = RewardScorer(ScorerConfig(load=cfg.load, tokenizer=cfg.tokenizer,
                                       reference_checkpoint=cfg.reference_checkpoint, parallel=cfg.parallel,
                                       bf16=cfg.bf16, max_batch_tokens=cfg.max_batch_tokens))
    if dist.get_rank() != 0:
        scorer.follow()
        return 0

    import uvicorn

    from megatron_qrm.serving.app import ServeLimits, create_app
    from megatron_qrm.serving.batcher import DynamicBatcher
    from megatron_qrm.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    batcher = DynamicBatcher(scorer.score, cfg.max_batch_tokens, cfg.max_wait_ms, metrics)
    par = cfg.parallel
    info = {"kind": scorer.kind, "checkpoint": scorer.checkpoint, "seq_length": scorer.seq_length,
            "tokenizer": scorer.tokenizer.name_or_path,
            "tensor_model_parallel_size": par.tensor_model_parallel_size,
            "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
            "max_batch_tokens": cfg.max_batch_tokens, "max_wait_ms": cfg.max_wait_ms}
    app = create_app(scorer.encoder, batcher, metrics,
                     ServeLimits(cfg.max_body_bytes, cfg.max_items, cfg.api_key), info)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=cfg.graceful_timeout_s,
                                           # clients keep connections between RL steps; uvicorn's 5 s default
                                           # closes them under a client about to reuse one (a ReadError there)
                                           timeout_keep_alive=75, lifespan="off"))

    def http() -> None:
        try:
            server.run()  # off the main thread uvicorn installs no signal handlers: ours below stop it
        finally:
            batcher.stop()

    def request_exit(signum, frame) -> None:
        log.info("qrm serve: %s: finishing the requests in flight (at most --graceful-timeout %g s)",
                 signal.Signals(signum).name, cfg.graceful_timeout_s)
        server.should_exit = True
        batcher.drain()  # queued sequences no longer wait --max-wait-ms for company

    signal.signal(signal.SIGTERM, request_exit)
    signal.signal(signal.SIGINT, request_exit)
    thread = threading.Thread(target=http, name="qrm-http", daemon=True)
    thread.start()
    log.info("qrm serve: %s reward model %s on http://%s:%d (TP=%d PP=%d, --max-batch-tokens %d, "
             "--max-wait-ms %g)%s", scorer.kind, scorer.checkpoint, cfg.host, cfg.port,
             par.tensor_model_parallel_size, par.pipeline_model_parallel_size, cfg.max_batch_tokens,
             cfg.max_wait_ms, ", bearer token required" if cfg.api_key else "")
    try:
        batcher.run()  # until the HTTP thread has finished (after a signal, or when it failed to start)
    finally:
        scorer.stop()
    thread.join()
    if not server.started:
        raise UserError(f"--host {cfg.host} --port {cfg.port}: the HTTP server could not start (see above)")
    log.info("qrm serve: stopped")
    return 0


def _env_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
