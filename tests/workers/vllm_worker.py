"""Worker for tests/test_vllm.py (torchrun, 2 processes, gloo, CPU): the in-memory HF weights of one policy
at every layout, in ONE launch.

Job ``stream`` ({dir, lora: bool}): at the first layout (TP=1, data-parallel 2) build a tiny GQA policy
(4 layers, vocab 250: padded differently at TP 1 and 2), perturb EVERY tensor (norms included; with LoRA
random adapters B so the merge matters) and save it with dist_checkpointing (``{dir}/ckpt``, the config
the exporter reads); at each layout (tp1, tp2, pp2) load it and stream
:func:`megatron_qrm.conversion.streaming.iter_hf_weights`; global rank 0 saves ``{dir}/stream_{layout}.pt``
(it is the stream's destination at every layout) and checks that no other rank received a tensor.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from job_runner import run_jobs  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def stream_model_config():
    from megatron_qrm.config import ModelConfig

    return ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                       vocab_size=250, max_position_embeddings=128)


def run_stream(job: dict) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.conversion.streaming import iter_hf_weights
    from megatron_qrm.models import LoRAConfig, build_model

    cfg = stream_model_config()
    lora = LoRAConfig(rank=4, alpha=8.0) if job.get("lora") else None
    ckpt = os.path.join(job["dir"], "ckpt")
    counts = {}
    for i, (name, (tp, pp)) in enumerate(LAYOUTS.items()):
        parallel.initialize(ParallelConfig(tp, pp, seed=1234))
        model = build_model(cfg, "policy", lora=lora)
        if i == 0:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if pname.endswith("lora_b"):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                    elif "layernorm" in pname:
                        p.add_(torch.randn(p.shape, generator=g) * 0.1)
            config = {"kind": "policy", "role": "policy", "model": cfg.to_dict()}
            if lora is not None:
                config["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
            checkpointing.save_checkpoint(ckpt, 0, model, config)
        checkpointing.load_checkpoint(ckpt, model, load_rng=False)
        got = {k: t.clone() for k, t in iter_hf_weights(model, cfg)}
        counts[name] = [None] * dist.get_world_size()
        dist.all_gather_object(counts[name], len(got))
        if dist.get_rank() == 0 and name == "tp1" and lora is not None:
            qkv = model.decoder.layers[0].self_attention.linear_qkv
            torch.save({"weight": qkv.weight.detach().clone(), "a": qkv.lora.lora_a.detach().clone(),
                        "b": qkv.lora.lora_b.detach().clone(), "scale": qkv.lora.scale},
                       os.path.join(job["dir"], "layer0_qkv_lora.pt"))
        if dist.get_rank() == 0:
            torch.save(got, os.path.join(job["dir"], f"stream_{name}.pt"))
        dist.barrier()
    return {"counts": counts}


def main() -> None:
    run_jobs({"stream": run_stream})


if __name__ == "__main__":
    main()
