"""Worker for tests/test_convert.py (torchrun, 2 processes, gloo, CPU): every Megatron-side check of the
conversion tests in ONE launch (each launch costs ~10 s of imports).

Jobs (a JSON file):
  verify:  [{name, hf, megatron, tp, pp, seq}]  -> `convert_hf.py verify` at each layout (world of 2: a
           TP=PP=1 layout runs data-parallel); results keyed by name.
  lora:    {import, out, hf_out, tokenizer}: load the imported reward model into a LoRA (rank 4, alpha 8)
           model, randomise adapters + head, save it as a trained checkpoint would be, export it to HF
           (rank 0; LoRA merged) and verify the export at TP=1 and TP=2.
  eval_rm: {load, data, dump}: `qrm eval-rm --dump-token-scores` on the trained Q-RM (its own code path).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from job_runner import run_jobs  # noqa: E402


def run_verify(jobs: list[dict]) -> dict:
    from megatron_qrm.conversion.verify import verify

    out = {}
    for job in jobs:
        r = verify(job["hf"], job["megatron"], tp=job["tp"], pp=job["pp"], seq_length=job.get("seq", 48),
                   batch_size=2, quiet=True)
        if r is not None:
            out[job["name"]] = r
        # results live on the last stage: hand them to rank 0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out.get(job["name"]))
        out[job["name"]] = next(g for g in gathered if g is not None)
    return out


def run_lora(job: dict) -> dict:
    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.conversion import export_hf
    from megatron_qrm.models import LoRAConfig, build_model

    parallel.initialize(ParallelConfig(1, 1))
    saved = checkpointing.read_config(job["import"])
    model_cfg = ModelConfig.from_dict(saved["model"])
    lora = LoRAConfig(rank=4, alpha=8.0)
    model = build_model(model_cfg, "reward", lora=lora)
    checkpointing.load_checkpoint(job["import"], model, load_rng=False, model_key_filter=lambda k: ".lora." not in k)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b") or name.endswith("output_layer.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    config = {"kind": "reward_model", "role": "reward", "model": model_cfg.to_dict(), "tokenizer": saved["tokenizer"],
              "lora": {"rank": 4, "alpha": 8.0, "targets": list(lora.targets)}}
    checkpointing.save_checkpoint(job["out"], 0, model, config)
    if dist.get_rank() == 0:
        export_hf(job["out"], job["hf_out"], show_progress=False)
    dist.barrier()
    return run_verify([{"name": f"lora_tp{tp}", "hf": job["hf_out"], "megatron": job["out"], "tp": tp, "pp": 1}
                       for tp in (1, 2)])


def run_eval_rm(job: dict) -> None:
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.evaluation.rm_eval import RMEvalConfig, evaluate_reward_model

    evaluate_reward_model(RMEvalConfig(load=job["load"], data=job["data"], dump_token_scores=job["dump"],
                                       output=job["dump"] + ".metrics.json", parallel=ParallelConfig(1, 1)))


def main() -> None:
    run_jobs({"verify": run_verify, "lora": run_lora, "eval_rm": run_eval_rm})


if __name__ == "__main__":
    main()
