"""Worker for tests/test_vllm_stream.py and tests/test_vllm.py (job file: tests/workers/job_runner.py).

``stream`` (torchrun, 2 processes, gloo, CPU): the in-memory HF weights of one policy at every layout, in ONE
launch. At the first layout (TP=1, data-parallel 2) build a tiny GQA policy (4 layers, vocab 250: padded
differently at TP 1 and 2), perturb its norms (with LoRA: random adapters B so the merge matters) and save it
with dist_checkpointing (``{dir}/ckpt``, the config the exporter reads); at each layout (tp1, tp2, pp2) load it
and stream :func:`megatron_qrm.conversion.streaming.iter_hf_weights`; global rank 0 saves
``{dir}/stream_{layout}.pt`` and every rank reports how many tensors it received.

``engine`` (one plain process): one in-process vLLM engine through the checks of :func:`run_engine`.
``real`` (one plain process): SmolLM2-135M-Instruct through vLLM, the project's decoder and transformers.
"""

from __future__ import annotations

import os
import sys
import time

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


# ------------------------------------------------------------------------------------------------ engine
ENGINE_VOCAB, EOS, PAD, BLOCK = 250, 3, 0, 32
#: prompt lengths: 40 and 70 span more than one KV-cache block (32), so a stale prefix cache shows
ENGINE_PROMPT_LENS = (1, 4, 9, 13, 40, 70)


def engine_model_config(tied: bool = False):
    from megatron_qrm.config import ModelConfig

    # head_dim 32: vLLM's CPU attention has no kernel for 16. Tied embeddings: the case vLLM's reload gets
    # wrong without WorkerExtension._qrm_retie
    return ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256,
                       vocab_size=ENGINE_VOCAB, max_position_embeddings=256, tie_word_embeddings=tied)


def _hf_greedy(weights: dict, cfg, prompts, max_new: int) -> list[list[int]]:
    """transformers' LlamaForCausalLM on the streamed tensors, greedy, one prompt at a time."""
    import torch
    import transformers

    from megatron_qrm.conversion.streaming import hf_config_for

    hf_cfg = hf_config_for(cfg, torch.float32)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set()), missing
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() or not cfg.tie_word_embeddings
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=PAD, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            out.append(ids[0, len(p):].tolist())
    return out


def _responses(r) -> list[list[int]]:
    return [r.response_ids(i) for i in range(r.tokens.shape[0])]


def _recompute_logp(model, r):
    """Megatron teacher-forced log-probs of the sampled tokens: [n] over action positions."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(r.tokens, torch.arange(r.tokens.shape[1]).expand_as(r.tokens), attention_mask=None)
    logp = logits[..., :ENGINE_VOCAB].float().log_softmax(-1)[:, :-1].gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    mask = r.action_mask[:, 1:] > 0
    return logp[mask], r.logprobs[:, 1:][mask]


def run_engine(job: dict) -> dict:
    """One vLLM engine through: greedy == project decoder == HF; behaviour log-probs vs recompute; one real
    optimizer step; a skipped refit (stale outputs, StaleWeightsError); refit without / with the prefix-cache
    reset; greedy again; LoRA; sampled rollouts' structure."""
    import torch

    from megatron_qrm import parallel
    from megatron_qrm.config import ParallelConfig
    from megatron_qrm.conversion.streaming import hf_weights_dict, iter_hf_weights
    from megatron_qrm.models import LoRAConfig, build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate
    from megatron_qrm.rl.rollout_engine import build_rollout_engine
    from megatron_qrm.rl.vllm_engine import StaleWeightsError, VLLMEngineConfig

    parallel.initialize(ParallelConfig(1, 1, seed=1234))
    cfg = engine_model_config(tied=bool(job.get("tied")))
    model = build_model(cfg, "policy")
    with torch.no_grad():  # peaked logits (scale the final norm: the head may be tied): greedy gaps above noise
        model.decoder.final_layernorm.weight.mul_(12.0)
    g = torch.Generator().manual_seed(5)
    prompts = [[2] + torch.randint(4, ENGINE_VOCAB, (n - 1,), generator=g).tolist() for n in ENGINE_PROMPT_LENS]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=job.get("max_new", 20))
    max_len = 128
    res: dict = {}
    t0 = time.time()
    eng = build_rollout_engine("vllm", model, cfg, eos_id=EOS, pad_id=PAD, vocab_size=ENGINE_VOCAB, max_length=max_len,
                               engine_cfg=VLLMEngineConfig(kv_cache_gib=1, enable_prefix_caching=True, block_size=BLOCK))
    res["start_s"] = time.time() - t0

    def project(m):
        return _responses(generate(m, prompts, greedy, eos_id=EOS, pad_id=PAD, vocab_size=ENGINE_VOCAB,
                                   max_length=max_len, seed=0))

    def check_all(tag, m, version):
        r = eng.generate(prompts, greedy, seed=0, max_length=max_len, expected_version=version)
        rec, beh = _recompute_logp(m, r)
        res[tag] = {"vllm": _responses(r), "project": project(m),
                    "hf": _hf_greedy(hf_weights_dict(m, cfg), cfg, prompts, greedy.max_new_tokens),
                    "logp_diff_max": float((rec - beh).abs().max()), "n_tokens": int(rec.numel())}

    check_all("before", model, 0)
    # one real optimizer step (Adam on a next-token loss through megatron-core's forward)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    tokens = torch.randint(4, ENGINE_VOCAB, (4, 48), generator=g)
    logits = model(tokens[:, :-1], torch.arange(47).expand(4, 47), attention_mask=None)
    loss = torch.nn.functional.cross_entropy(logits[..., :ENGINE_VOCAB].float().reshape(-1, ENGINE_VOCAB),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    model.eval()

    # a skipped refit: the engine still samples the old weights, and asking for the new version fails
    res["stale"] = _responses(eng.generate(prompts, greedy, seed=0, max_length=max_len))
    try:
        eng.generate(prompts, greedy, seed=0, max_length=max_len, expected_version=1)
        res["stale_error"] = None
    except StaleWeightsError as e:
        res["stale_error"] = str(e)
    # control: reload WITHOUT resetting the prefix cache (the long prompts' cached blocks are stale)
    eng.engine.llm.collective_rpc("qrm_reload", args=(iter_hf_weights(model, cfg),))
    res["no_reset"] = _responses(eng.engine.generate(prompts, greedy, seed=0, max_length=max_len))
    t0 = time.time()
    eng.refit(model, 1)
    res["refit_s"] = time.time() - t0
    check_all("after", model, 1)

    # sampled rollouts: n samples per prompt, top-k / top-p / stop ids
    samp = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=16, stop_token_ids=tuple(range(100, 130)))
    r = eng.engine.generate(prompts, samp, seed=3, n=3, max_length=max_len)
    rec, beh = _recompute_logp(model, r)
    with torch.no_grad():
        logits = model(r.tokens, torch.arange(r.tokens.shape[1]).expand_as(r.tokens), attention_mask=None)
    logits = logits[..., :ENGINE_VOCAB][:, :-1]
    mask = r.action_mask[:, 1:] > 0
    chosen = logits.gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    rank = (logits > chosen[..., None]).sum(-1)[mask]
    res["sampled"] = {"rows": _responses(r), "finished": r.finished.tolist(), "max_rank": int(rank.max()),
                      "logp_diff_max": float((rec - beh).abs().max()), "prompt_lens": r.prompt_lens.tolist()}

    # LoRA (merged into the stream): a LoRA policy with random adapters, refitted into the same engine
    lora_model = build_model(cfg, "policy", lora=LoRAConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        lora_model.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
        for name, p in lora_model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    eng.refit(lora_model, 2)
    check_all("lora", lora_model, 2)
    res["lora_changed"] = res["lora"]["project"] != res["after"]["project"]
    # (no eng.close(): vLLM's shutdown also destroys the torch.distributed world job_runner still needs)
    return res


def run_real(job: dict) -> dict:
    """SmolLM2-135M-Instruct (an import at ``job['megatron']``, its HF folder ``job['hf']``): vLLM refitted from
    the Megatron model, greedy on chat prompts, against the project's decoder and transformers' generate;
    behaviour log-probs against the Megatron recompute."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.models import build_model
    from megatron_qrm.rl.rollout import SamplingConfig, generate
    from megatron_qrm.rl.rollout_engine import build_rollout_engine
    from megatron_qrm.rl.vllm_engine import VLLMEngineConfig

    parallel.initialize(ParallelConfig(1, 1))
    cfg = ModelConfig.from_dict(checkpointing.read_config(job["megatron"])["model"])
    model = build_model(cfg, "policy")
    checkpointing.load_checkpoint(job["megatron"], model, load_rng=False)
    prompts, eos, pad, new = job["prompts"], job["eos_id"], job["pad_id"], job["max_new_tokens"]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=new)
    max_len = max(map(len, prompts)) + new + 8
    t0 = time.time()
    eng = build_rollout_engine("vllm", model, cfg, eos_id=eos, pad_id=pad, vocab_size=cfg.vocab_size,
                               max_length=max_len, engine_cfg=VLLMEngineConfig(kv_cache_gib=1))
    res = {"start_and_refit_s": time.time() - t0}
    r = eng.generate(prompts, greedy, seed=0, max_length=max_len, expected_version=0)
    res["vllm"] = _responses(r)
    res["project"] = _responses(generate(model, prompts, greedy, eos_id=eos, pad_id=pad, vocab_size=cfg.vocab_size,
                                         max_length=max_len, seed=0))
    with torch.no_grad():
        logits = model(r.tokens, torch.arange(r.tokens.shape[1]).expand_as(r.tokens), attention_mask=None)
    lp = logits[..., :cfg.vocab_size].float().log_softmax(-1)[:, :-1].gather(-1, r.tokens[:, 1:, None])[..., 0]
    m = r.action_mask[:, 1:] > 0
    res["logp_diff_max"] = float((lp[m] - r.logprobs[:, 1:][m]).abs().max())
    hf = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32).eval()
    res["hf"] = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
            res["hf"].append(ids[0, len(p):].tolist())
    t0 = time.time()
    eng.refit(model, 1)
    res["refit_s"] = time.time() - t0
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


def main() -> None:
    run_jobs({"stream": run_stream, "engine": run_engine, "real": run_real})


if __name__ == "__main__":
    main()
