"""``qrm serve`` throughput and latency: dynamic batching vs one sequence per forward, at C concurrent clients.

Setup (everything on 127.0.0.1, nothing else reached): a tiny Q-RM checkpoint is trained for one step on
synthetic parity pairs (``--layers/--hidden``; or ``--load`` an existing checkpoint with its tokenizer),
and two servers of it are started side by side:

* **batched**: the defaults, ``--max-batch-tokens 8192 --max-wait-ms 5``;
* **unbatched**: ``--max-batch-tokens 1 --max-wait-ms 0``: every sequence is its own forward pass, i.e.
  one request at a time through the model (the requests still queue, so the clients see the same API).

Then rounds alternate (batched, unbatched, sequential, batched, ...) so that machine load hits all alike:
in a round ``--clients`` asyncio clients each send ``--requests`` ``/v1/score`` requests of one
(prompt, response) with responses of mixed length; the **sequential** round is one client sending the
same requests one after the other to the batched server (no concurrency at all). Reported per mode:
p50 / p99 request latency (median over rounds) and scored tokens/s (prompt + response tokens of the
answered requests / wall time of the round, median over rounds); the same tokens per CPU second of the
server process (user + system time over the round: the server's capacity, which stays comparable on a
machine shared with other work, where wall time mostly measures the wait for a core); and the ratio of
the batched figures to each peer. Idle servers use no CPU (they block on a queue).

Example::

    python benchmarks/bench_serve.py --clients 32 --requests 20 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="qrm serve: batched vs unbatched tokens/s and latency (loopback)")
    p.add_argument("--load", help="reward checkpoint to serve (default: train a tiny one)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--time-limit", type=float, default=1200, help="seconds; the run stops with an error past it")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny(workdir: str, args) -> tuple[str, list[dict]]:
    """One train-rm step on parity pairs (weights do not matter for speed); returns (checkpoint, rows)."""
    from megatron_qrm.data.synthetic import corpus, parity_pairs, sorting_pairs, write_jsonl
    from megatron_qrm.demo.tokenizer import train_tokenizer

    rows = parity_pairs(256, seed=args.seed, min_len=3, max_len=12)
    pairs = write_jsonl(os.path.join(workdir, "pairs.jsonl"), rows)
    texts = corpus(rows) + corpus(sorting_pairs(64, seed=0)) + [" ".join(map(str, range(1, 40)))] * 4
    tok = train_tokenizer(texts, os.path.join(workdir, "tok"), vocab_size=400)
    save = os.path.join(workdir, "qrm")
    heads = max(1, args.hidden // 32)
    cmd = [sys.executable, "-m", "megatron_qrm", "train-rm", "--train-data", pairs, "--tokenizer", tok,
           "--num-layers", str(args.layers), "--hidden-size", str(args.hidden), "--num-attention-heads", str(heads),
           "--ffn-hidden-size", str(4 * args.hidden), "--seq-length", str(args.seq_length),
           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--no-tensorboard",
           "--save", save]
    subprocess.run(cmd, check=True, env=_env(), cwd=REPO, capture_output=True)
    return save, rows


class Server:
    def __init__(self, load: str, extra: list[str], log_path: str):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_qrm", "serve", "--load", load,
                                      "--port", str(self.port), *extra], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=_env(), cwd=REPO, start_new_session=True)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qrm serve exited {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"qrm serve did not start; see {log_path}")
            time.sleep(0.3)

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()


def make_requests(rows: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` single-item requests with responses of mixed length (1x to 8x a chosen answer)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row = rng.choice(rows)
        out.append({"items": [{"prompt": row["instruction"], "response": row["chosen"] * rng.choice([1, 2, 4, 8])}]})
    return out


async def run_round(url: str, requests: list[dict], clients: int) -> tuple[list[float], int, float]:
    """All ``requests`` through ``clients`` concurrent connections; returns (latencies, tokens, seconds)."""
    import httpx

    queue = list(enumerate(requests))
    latencies, tokens = [], 0

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while queue:
            _, body = queue.pop()
            t0 = time.perf_counter()
            r = await http.post("/v1/score", json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
            tokens += sum(res["num_tokens"] + res["prompt_tokens"] for res in r.json()["results"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, tokens, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    workdir = tempfile.mkdtemp(prefix="bench_serve_")
    load, rows = args.load, None
    if load is None:
        load, rows = train_tiny(workdir, args)
    else:
        from megatron_qrm.data.synthetic import parity_pairs

        rows = parity_pairs(256, seed=args.seed, min_len=3, max_len=12)
    batched = Server(load, ["--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms",
                            str(args.max_wait_ms)], os.path.join(workdir, "batched.log"))
    unbatched = Server(load, ["--max-batch-tokens", "1", "--max-wait-ms", "0"], os.path.join(workdir, "unbatched.log"))
    modes = {"batched": (batched, args.clients), "unbatched": (unbatched, args.clients),
             "sequential": (batched, 1)}
    stats = {m: {"p50": [], "p99": [], "tps": [], "rps": [], "tpcpu": []} for m in modes}
    try:
        warm = make_requests(rows, 2 * args.clients, args.seed + 99)
        for srv, _ in list(modes.values())[:2]:
            asyncio.run(run_round(srv.url, warm, args.clients))
        for rnd in range(args.rounds):
            requests = make_requests(rows, args.clients * args.requests, args.seed + rnd)
            for mode, (srv, clients) in modes.items():
                if time.time() - t_start > args.time_limit:
                    raise RuntimeError(f"--time-limit {args.time_limit}s reached")
                cpu0 = srv.cpu_seconds()
                lat, tokens, secs = asyncio.run(run_round(srv.url, requests, clients))
                cpu = srv.cpu_seconds() - cpu0
                stats[mode]["tpcpu"].append(tokens / cpu)
                stats[mode]["p50"].append(percentile(lat, 0.5))
                stats[mode]["p99"].append(percentile(lat, 0.99))
                stats[mode]["tps"].append(tokens / secs)
                stats[mode]["rps"].append(len(requests) / secs)
                print(f"round {rnd} {mode:10s}: {len(requests)} requests, {tokens} tokens in {secs:.2f}s "
                      f"({tokens / secs:.0f} tok/s), p50 {percentile(lat, 0.5) * 1e3:.0f} ms, "
                      f"p99 {percentile(lat, 0.99) * 1e3:.0f} ms, server CPU {cpu:.2f}s ({tokens / cpu:.0f} tok/CPU-s)",
                      flush=True)
    finally:
        batched.stop()
        unbatched.stop()
    med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in stats.items()}
    print(f"\nqrm serve, {args.clients} clients x {args.requests} requests x {args.rounds} rounds, "
          f"model {args.layers}x{args.hidden}, seq {args.seq_length}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':12s} {'tokens/s':>10s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'tok/CPU-s':>10s}")
    for m, s in med.items():
        print(f"{m:12s} {s['tps']:10.0f} {s['rps']:8.1f} {s['p50'] * 1e3:8.0f} {s['p99'] * 1e3:8.0f} "
              f"{s['tpcpu']:10.0f}")
    for peer in ("unbatched", "sequential"):
        print(f"batched / {peer}: tokens/s {med['batched']['tps'] / med[peer]['tps']:.2f}x, "
              f"tokens per server CPU-second {med['batched']['tpcpu'] / med[peer]['tpcpu']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
