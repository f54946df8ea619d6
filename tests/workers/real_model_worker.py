"""Worker for tests/test_real_model.py (torchrun, 2 processes, gloo, CPU): the Megatron-side checks on the
real SmolLM2-135M-Instruct in ONE launch (each launch pays ~10 s of imports and the model load).

Jobs (a JSON file):
  verify:   [{name, hf, megatron, tp, pp, tokens, attention}] -> conversion.verify on these token rows (right-padded);
            results keyed by name (world of 2: a TP=PP=1 layout runs data-parallel).
  generate: [{name, megatron, tp, pp, prompts, max_new_tokens, eos_id, pad_id}] -> greedy KV-cache
            generation through rl.rollout.generate (the trainers' public sampler); the response ids.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from job_runner import run_jobs  # noqa: E402


def _to_rank0(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return next((g for g in gathered if g is not None), None)


def run_verify(jobs: list[dict]) -> dict:
    from megatron_qrm.conversion.verify import verify

    out = {}
    for job in jobs:
        r = verify(job["hf"], job["megatron"], tp=job["tp"], pp=job["pp"], quiet=True,
                   tokens=torch.tensor(job["tokens"], dtype=torch.long), local_attention=job.get("attention", "auto"))
        out[job["name"]] = _to_rank0(r)
    return out


def run_generate(jobs: list[dict]) -> dict:
    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.models import PrecisionConfig, build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    out = {}
    for job in jobs:
        parallel.initialize(ParallelConfig(job["tp"], job["pp"]))
        ckpt = checkpointing.resolve_checkpoint(job["megatron"])
        saved = checkpointing.read_config(ckpt)
        model_cfg = ModelConfig.from_dict(saved["model"])
        model = build_model(model_cfg, "policy", precision=PrecisionConfig(bf16=False))
        checkpointing.load_checkpoint(ckpt, model, load_rng=False)
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=job["max_new_tokens"])
        r = generate(model, job["prompts"], cfg, eos_id=job["eos_id"], pad_id=job["pad_id"],
                     vocab_size=model_cfg.vocab_size, max_length=max(map(len, job["prompts"])) + job["max_new_tokens"],
                     seed=0)
        out[job["name"]] = [r.response_ids(i) for i in range(len(job["prompts"]))]
        del model
    return out


def main() -> None:
    run_jobs({"verify": run_verify, "generate": run_generate})


if __name__ == "__main__":
    main()
