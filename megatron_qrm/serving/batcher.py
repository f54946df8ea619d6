"""Dynamic batching: sequences from concurrent requests are queued and scored together.

One loop owns the model (and, under torchrun, the collectives): :meth:`DynamicBatcher.run`, on the main
thread of rank 0 (CUDA's current device and the CPU emulation's function mode are per-thread state, so
the model stays on the thread that built it; the HTTP server runs on another thread). It takes the
oldest waiting sequence, then keeps taking sequences until the batch holds ``max_batch_tokens`` prompt +
response tokens or ``max_wait_ms`` have passed since that oldest sequence arrived, and scores the batch
(which the scorer splits into length groups). Each sequence's result resolves its own future on the
event loop, so a request may be answered from several batches and a large request does not hold back
small ones for long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_qrm.errors import UserError
from megatron_qrm.serving.encoding import EncodedItem
from megatron_qrm.serving.metrics import ServerMetrics

log = logging.getLogger("megatron_qrm")

ScoreFn = Callable[[Sequence[EncodedItem]], list[np.ndarray]]


@dataclass
class _Pending:
    item: EncodedItem
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


_STOP = object()
_WAKE = object()  # wakes a batcher waiting for more sequences (after drain())


class DynamicBatcher:
    """Queue of sequences to score and the loop that batches them (see the module docstring)."""

    def __init__(self, score_fn: ScoreFn, max_batch_tokens: int, max_wait_ms: float,
                 metrics: Optional[ServerMetrics] = None):
        if max_batch_tokens < 1:
            raise UserError(f"--max-batch-tokens must be positive, got {max_batch_tokens}")
        if max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
        self.score_fn = score_fn
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        self._carry: Optional[_Pending] = None
        self._draining = False

    def submit(self, items: Sequence[EncodedItem]) -> list[asyncio.Future]:
        """Queue ``items`` (from the event loop); each future resolves to that item's credits array."""
        loop = asyncio.get_running_loop()
        futures = []
        for it in items:
            fut = loop.create_future()
            self._queue.put(_Pending(it, fut, loop))
            futures.append(fut)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return futures

    def drain(self) -> None:
        """From now on score what is queued without waiting ``--max-wait-ms`` for more (SIGTERM: the requests
        in flight are answered as fast as possible, within the server's grace period). Any thread."""
        self._draining = True
        self._queue.put(_WAKE)

    def stop(self) -> None:
        """Ask :meth:`run` to return once everything queued before this call is scored (any thread)."""
        self._queue.put(_STOP)

    # ---------------------------------------------------------------- the model's thread
    def _next_batch(self) -> tuple[list[_Pending], bool]:
        """The next batch and whether a stop was seen (then it is the last one)."""
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return [], True
        if first is _WAKE:
            return [], False
        batch, tokens = [first], first.item.num_tokens
        deadline = first.arrived + self.max_wait
        while tokens < self.max_batch_tokens:
            wait = 0.0 if self._draining else deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _WAKE:
                continue
            if nxt is _STOP:
                self._carry = nxt
                break
            if tokens + nxt.item.num_tokens > self.max_batch_tokens:
                self._carry = nxt  # first of the next batch
                break
            batch.append(nxt)
            tokens += nxt.item.num_tokens
        return batch, False

    def run(self) -> None:
        """Score batches until :meth:`stop` (blocks the calling thread)."""
        while True:
            batch, stop = self._next_batch()
            if stop:
                return
            self._score(batch)

    def _score(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.cancelled()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results = self.score_fn([p.item for p in live])
        except Exception as err:  # a failed forward answers its requests with 500 and the server goes on
            log.exception("qrm serve: scoring a batch of %d sequences failed", len(live))
            for p in live:
                p.loop.call_soon_threadsafe(_set_exception, p.future, err)
            return
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.observe_batch(len(live), sum(p.item.num_tokens for p in live), seconds)
            self.metrics.queue_depth.set(self._queue.qsize())
        for p, credits in zip(live, results):
            p.loop.call_soon_threadsafe(_set_result, p.future, credits)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
