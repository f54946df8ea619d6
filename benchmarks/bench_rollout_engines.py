"""Rollout engines on the same weights and prompts: vLLM (``--rollout-engine vllm``) vs the project's decoder
vs transformers ``generate``; greedy tokens/s at batch 1, 32 and 32 of mixed lengths, vLLM refit seconds per
100M parameters, and vLLM's behaviour log-prob mismatch against the Megatron recompute.

Each side runs in its own process per round and the sides are interleaved (``--rounds``), so one side's
warm caches or another's load do not favour it. Weights: a random Llama of the given size (``--model tiny``)
or an HF folder (``--hf-dir``, e.g. SmolLM2-135M-Instruct from ``megatron_qrm.conversion.gguf.smollm2_hf_dir``),
imported once to a Megatron checkpoint that the project and vLLM sides load.

    python benchmarks/bench_rollout_engines.py --hf-dir ~/.cache/megatron_qrm/smollm2-135m-instruct-hf \
        --new-tokens 128 --rounds 3 --json bench_engines.json
    python benchmarks/bench_rollout_engines.py --model tiny --new-tokens 8 --rounds 1   # smoke
    ... --sides vllm --vllm-compiled / --vllm-bf16        # vLLM CPU options (thread binding: VLLM_CPU_OMP_THREADS_BIND)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BATCHES = {"b1": (1, False), "b32": (32, False), "mixed32": (32, True)}


def _prompts(n: int, mixed: bool, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, 96, (n,), generator=g).tolist() if mixed else [48] * n
    return [torch.randint(10, vocab, (ln,), generator=g).tolist() for ln in lens]


def side(args) -> dict:
    import torch

    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig
    from megatron_qrm.rl.rollout import SamplingConfig

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    saved = checkpointing.read_config(args.megatron)
    mcfg = ModelConfig.from_dict(saved["model"])
    out: dict = {}
    if args.side == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        with torch.no_grad():  # warm-up
            model.generate(torch.tensor([[11, 12, 13]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        for name, (n, mixed) in BATCHES.items():
            prompts = _prompts(n, mixed, mcfg.vocab_size)
            t, toks = time.perf_counter(), 0
            with torch.no_grad():
                for p in prompts if n == 1 else [None]:
                    batch = prompts if p is None else [p]
                    width = max(map(len, batch))
                    ids = torch.tensor([[0] * (width - len(q)) + q for q in batch])
                    att = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in batch])
                    o = model.generate(ids, attention_mask=att, max_new_tokens=args.new_tokens, do_sample=False,
                                       min_new_tokens=args.new_tokens, pad_token_id=0)
                    toks += (o.shape[1] - width) * len(batch)
            out[name] = toks / (time.perf_counter() - t)
        return out
    parallel.initialize(ParallelConfig(1, 1))
    from megatron_qrm.models import build_model

    model = build_model(mcfg, "policy")
    checkpointing.load_checkpoint(args.megatron, model, load_rng=False)
    if args.side == "vllm":
        from megatron_qrm.rl.rollout_engine import build_rollout_engine
        from megatron_qrm.rl.vllm_engine import VLLMEngineConfig

        eng = build_rollout_engine("vllm", model, mcfg, eos_id=2, pad_id=0,
                                   vocab_size=mcfg.vocab_size, max_length=args.max_length,
                                   engine_cfg=VLLMEngineConfig(kv_cache_gib=args.kv_cache_gib,
                                                               dtype="bfloat16" if args.vllm_bf16 else "auto",
                                                               enforce_eager=not args.vllm_compiled))
        t = time.perf_counter()
        eng.refit(model, 1)
        n_params = sum(p.numel() for p in model.parameters())
        out["refit_s_per_100M"] = (time.perf_counter() - t) * 1e8 / n_params
        gen = lambda prompts: eng.generate(prompts, cfg, seed=0, max_length=args.max_length)  # noqa: E731
    else:
        from megatron_qrm.rl.rollout import generate

        gen = lambda prompts: generate(model, prompts, cfg, eos_id=2, pad_id=0,  # noqa: E731
                                       vocab_size=mcfg.vocab_size, max_length=args.max_length, seed=0)
    gen(_prompts(2, True, mcfg.vocab_size, seed=1))  # warm-up (first-call allocations, kernel selection)
    for name, (n, mixed) in BATCHES.items():
        prompts = _prompts(n, mixed, mcfg.vocab_size)
        t, toks = time.perf_counter(), 0
        for chunk in ([[p] for p in prompts] if n == 1 else [prompts]):
            r = gen(chunk)
            toks += int(r.response_lens.sum())
        out[name] = toks / (time.perf_counter() - t)
        if args.side == "vllm" and name == "mixed32":
            with torch.no_grad():
                logits = model(r.tokens, torch.arange(r.tokens.shape[1]).expand_as(r.tokens), attention_mask=None)
            lp = logits[..., :mcfg.vocab_size].float().log_softmax(-1)[:, :-1].gather(-1, r.tokens[:, 1:, None])[..., 0]
            m = r.action_mask[:, 1:] > 0
            d = (lp[m] - r.logprobs[:, 1:][m]).abs()
            out["logp_diff_mean"], out["logp_diff_max"] = float(d.mean()), float(d.max())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny",), default="tiny")
    ap.add_argument("--hf-dir", help="an HF Llama folder (e.g. SmolLM2); default: a random tiny Llama")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    ap.add_argument("--sides", default="vllm,project,hf")
    ap.add_argument("--vllm-bf16", action="store_true", help="vLLM in bf16 (slow without AVX512-BF16/AMX)")
    ap.add_argument("--vllm-compiled", action="store_true", help="vLLM with torch.compile (no enforce_eager)")
    ap.add_argument("--json")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--megatron", help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        print("RESULT " + json.dumps(side(args)), flush=True)
        return
    work = tempfile.mkdtemp(prefix="bench_engines_")
    hf = args.hf_dir
    if hf is None:
        import torch
        import transformers

        hf = os.path.join(work, "hf")
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
                                       max_position_embeddings=512)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
    from megatron_qrm.conversion import import_hf

    meg = import_hf(hf, os.path.join(work, "megatron"), show_progress=False)
    results: dict = {s: [] for s in args.sides.split(",")}
    for _ in range(args.rounds):
        for s in results:
            p = subprocess.run([sys.executable, __file__, "--side", s, "--megatron", meg, "--hf", hf,
                                "--new-tokens", str(args.new_tokens), "--kv-cache-gib", str(args.kv_cache_gib),
                                "--max-length", str(96 + args.new_tokens + 8),
                                *(["--vllm-bf16"] if args.vllm_bf16 else []),
                                *(["--vllm-compiled"] if args.vllm_compiled else [])],
                               capture_output=True, text=True, cwd=REPO)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"side {s} failed:\n{p.stderr[-4000:]}")
            results[s].append(json.loads(line[0][7:]))
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
