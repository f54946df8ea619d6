"""The command line of the job-file workers: ``--jobs JOBS.json --out RESULTS.json`` under torchrun.

Each key of the job file names a handler; the handlers run in the order given, each on its job's value,
and rank 0 writes ``{key: result}`` of those that return something.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def run_jobs(handlers: dict[str, Callable]) -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.jobs) as f:
        jobs = json.load(f)
    results: dict = {}
    for key, handler in handlers.items():
        if jobs.get(key):
            result = handler(jobs[key])
            if result is not None:
                results[key] = result
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    from megatron_qrm import parallel

    parallel.destroy()
