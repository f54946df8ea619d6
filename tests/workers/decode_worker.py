"""Worker for tests/test_attention.py (torchrun, 2 processes, gloo, CPU): ONE launch runs every layout.

For each layout of ``LAYOUTS`` (tp1 = DP 2, tp2, pp2) and each imported HF model of the job:

* greedy sampling of the mixed-length prompts with the KV-cache decoder and with full recomputation;
* (tp1) teacher-forced log-probs of the sampled sequences from megatron-core's own forward;
* (first model, tp1 and tp2) temperature-1 samples of one token after one prompt, many rows (plain and
  top-k), with a different seed per layout, and (tp1) the exact next-token distribution;
* (tp1, tp2) the Q-RM loss and every gradient of a reward model with SDPA core attention and with
  megatron-core's DotProductAttention, same weights and batch;
* (first model, every layout) the same greedy sampling with LoRA adapters (rank 4, random B) attached:
  KV cache vs full recomputation (the adapters' forward hooks must run in the decoder too).

Rank 0 writes everything to ``out`` (torch.save).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
EOS_NEVER = 10**6  # an id outside every vocabulary: rows run to max_new_tokens, as with HF's eos_token_id=None


def _load(name: str, ckpt: str):
    from megatron_qrm import checkpointing
    from megatron_qrm.config import ModelConfig
    from megatron_qrm.models import build_model

    cfg = ModelConfig.from_dict(checkpointing.read_config(ckpt)["model"])
    model = build_model(cfg, "policy")
    checkpointing.load_checkpoint(ckpt, model, load_rng=False)
    model.eval()
    return model, cfg


def _lora_case(ckpt: str, prompts, max_new: int, vocab: int, max_length: int) -> dict:
    import torch

    from megatron_qrm import checkpointing
    from megatron_qrm.config import ModelConfig
    from megatron_qrm.models import LoRAConfig, build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    cfg = ModelConfig.from_dict(checkpointing.read_config(ckpt)["model"])
    model = build_model(cfg, "policy", lora=LoRAConfig(rank=4))
    checkpointing.load_checkpoint(ckpt, model, load_rng=False, model_key_filter=lambda k: ".lora." not in k)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = {}
    for kv in (True, False):
        r = generate(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new, use_kv_cache=kv),
                     eos_id=EOS_NEVER, pad_id=0, vocab_size=vocab, max_length=max_length, seed=0)
        out["kv" if kv else "full"] = {"tokens": r.tokens, "logprobs": r.logprobs}
    return out


def _teacher_forced(model, tokens, vocab: int):
    """log p(tokens[:, p] | tokens[:, :p]) [B, L-1] from GPTModel.forward (TP=PP=1)."""
    import torch

    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
    return logits[..., :vocab].float().log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _sdpa_vs_unfused(cfg) -> dict:
    """Loss and gradients of a Q-RM step with both core attentions (same weights, this rank's shards)."""
    import torch
    import torch.distributed as dist

    from megatron_qrm.models import build_model
    from megatron_qrm.rewards import qrm_loss

    torch.manual_seed(0)
    unfused = build_model(cfg, "reward", local_attention="unfused")
    sdpa = build_model(cfg, "reward", local_attention="sdpa")
    sdpa.load_state_dict(unfused.state_dict())
    g = torch.Generator().manual_seed(3)
    b, s = 4, 24
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    mask = torch.zeros(b, s)
    mask[:, 10:] = 1.0
    out = {"core": [type(m.decoder.layers[0].self_attention.core_attention).__name__ for m in (unfused, sdpa)]}
    losses = []
    for m in (unfused, sdpa):
        scores = m(tokens, torch.arange(s).expand(b, s), attention_mask=None).squeeze(-1).float()  # [b, s]
        res = qrm_loss(scores, mask, beta=0.2, gamma=2.0)
        loss = res.loss_sum / res.num_valid
        loss.backward()
        losses.append(float(loss))
    out["losses"] = losses
    diffs = [float((p.grad - q.grad).abs().max()) for p, q in zip(unfused.parameters(), sdpa.parameters())]
    scale = [float(p.grad.abs().max()) for p in unfused.parameters()]
    worst = torch.tensor([max(diffs), abs(losses[0] - losses[1])], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # every rank's shards
    out["grad_maxdiff"], out["loss_diff"], out["grad_min_scale"] = float(worst[0]), float(worst[1]), min(scale)
    out["n_params"] = len(diffs)
    return out


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_qrm import parallel
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    args = ap.parse_args()
    with open(args.job) as f:
        job = json.load(f)
    prompts, max_new, vocab = job["prompts"], job["max_new_tokens"], job["vocab_size"]
    results: dict = {}
    for layout, (tp, pp) in LAYOUTS.items():
        parallel.initialize(ParallelConfig(tp, pp, seed=1234))
        res = results[layout] = {}
        for i, (name, ckpt) in enumerate(job["models"].items()):
            model, cfg = _load(name, ckpt)
            r = {}
            for kv in (True, False):
                out = generate(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new, use_kv_cache=kv),
                               eos_id=EOS_NEVER, pad_id=0, vocab_size=vocab, max_length=job["max_length"], seed=0)
                r["kv" if kv else "full"] = {k: getattr(out, k) for k in ("tokens", "prompt_lens", "response_lens",
                                                                         "logprobs", "action_mask")}
            if layout == "tp1":
                r["teacher_forced"] = _teacher_forced(model, r["kv"]["tokens"], vocab)
            if i == 0 and layout in ("tp1", "tp2"):
                stat = job["stat"]
                n = stat["rows"]
                for case, kw in (("plain", {}), ("top_k", {"top_k": stat["top_k"]})):
                    out = generate(model, [stat["prompt"]] * n, SamplingConfig(temperature=1.0, max_new_tokens=1, **kw),
                                   eos_id=EOS_NEVER, pad_id=0, vocab_size=vocab, max_length=job["max_length"],
                                   seed=stat["seeds"][layout])
                    first = out.tokens[:, len(stat["prompt"])]
                    r[f"stat_{case}"] = torch.bincount(first, minlength=vocab)
                    r[f"stat_{case}_tokens"] = first
                    r[f"stat_{case}_logp"] = out.logprobs[:, len(stat["prompt"])]
                if layout == "tp1":
                    p = torch.tensor([stat["prompt"]])
                    with torch.no_grad():
                        logits = model(p, torch.arange(p.shape[1])[None], attention_mask=None)[0, -1, :vocab].float()
                    r["stat_logits"] = logits
                if pp == 1:
                    res["sdpa_vs_unfused"] = _sdpa_vs_unfused(cfg)
            if i == 0:
                r["lora"] = _lora_case(ckpt, prompts, max_new, vocab, job["max_length"])
            res[name] = r
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, job["out"])
    parallel.destroy()


if __name__ == "__main__":
    main()
