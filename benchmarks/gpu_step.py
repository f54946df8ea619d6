"""Tokens/s and MFU of a reward-model training step and of rollout decoding, on one GPU.

A model of the chosen preset's shape with random weights (no checkpoint needed), bf16, the layer spec the
trainers use (Transformer Engine when it imports, else the local spec with SDPA attention):

* **RM step**: one optimizer step of ``qrm train-rm`` (Q-RM loss) on ``--micro-batch-size`` preference
  pairs of ``--seq-length`` tokens (2 sequences per pair), through the trainer's own pieces (build_model,
  DDP, distributed optimizer, forward step, megatron-core's schedule). Model FLOPs per step are
  :func:`megatron_qrm.planning.memory.training_flops_per_token` x tokens (LoRA: the frozen base needs no
  weight gradients); MFU = FLOPs / time / the GPU's dense bf16 peak.
* **decode**: ``megatron_qrm.rl.rollout.generate`` (static KV cache, the PPO sampler) of ``--decode-batch``
  prompts of ``--prompt-length`` random tokens, ``--new-tokens`` sampled tokens each (no stop token).
  Reports generated tokens/s, decode-step latency, MFU (forward FLOPs of the generated tokens) and the
  memory-bandwidth utilisation of the decode steps (weights + KV cache read per step / time / peak HBM).

Peak memory (``torch.cuda.max_memory_allocated``) is printed beside the planner's estimate of the same
step, which is how the planner is checked on a GPU.

    python benchmarks/gpu_step.py                                # llama3-8b shape, LoRA r=128 RM step + decode
    python benchmarks/gpu_step.py --model llama3.2-1b --lora-rank 0 --json
    python benchmarks/gpu_step.py --cpu-smoke                    # a tiny model on CPU: checks the script only
    python benchmarks/gpu_step.py --all                          # the GPU check: one table (docs/gpu.md)
    python benchmarks/gpu_step.py --all --cpu-smoke              # its CPU smoke (tests/test_gpu_path.py)

``--all`` is the check to run on the first GPU (``tools/gpu_check.sh`` wraps it): for each layer spec that
builds here -- Transformer Engine's (if it imports) and the local spec (SDPA; packed sequences through torch's
library kernels) -- it checks that a bf16 RM forward/backward on a packed (THD) micro-batch equals the unpacked
one, times the RM step (MFU) and the sampler, compares the planner's memory with
``torch.cuda.max_memory_allocated``, and, if vLLM is installed, runs a refit through the hook
``megatron_qrm.rl.vllm_engine.gpu_check_refit(model, model_cfg) -> dict`` when that module provides it
(docs/gpu.md). One table at the end; ``--json`` for the raw numbers.

Without a GPU the script refuses (exit 2) unless ``--cpu-smoke``: CPU numbers say nothing about GPUs.
No GPU figures measured with this script are recorded in the repository yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=160,
            vocab_size=256, max_position_embeddings=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokens/s and MFU of an RM training step and of rollout decoding")
    p.add_argument("--model", default="llama3-8b", help="architecture preset (random weights), 1B-8B class")
    p.add_argument("--lora-rank", type=int, default=128, help="RM step: LoRA rank (0 = full fine-tune)")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch-size", type=int, default=1, help="preference pairs per step (2 sequences each)")
    p.add_argument("--recompute-granularity", choices=("full", "selective"))
    p.add_argument("--transformer-impl", choices=("auto", "te", "local"), default="auto")
    p.add_argument("--local-attention", choices=("auto", "sdpa", "unfused"), default="auto")
    p.add_argument("--steps", type=int, default=10, help="timed RM steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode-batch", type=int, default=64, help="sequences per generate() call (0 skips decoding)")
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from the GPU's name)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", help="also write the JSON here")
    p.add_argument("--all", action="store_true",
                   help="the GPU check: every buildable layer spec, packed == unpacked, RM step, sampler, vLLM "
                        "refit, planner vs measured memory; one table")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, fp32, on CPU: checks that the script runs (no meaningful numbers)")
    return p.parse_args(argv)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def rm_batch(pairs: int, seq: int, vocab: int, seed: int, device):
    """A collated-looking micro-batch: 2*pairs random sequences, response = the second half."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    tokens = torch.randint(4, vocab, (n, seq), generator=g)
    response = torch.zeros(n, seq)
    response[:, seq // 2:] = 1.0
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    label_mask = torch.zeros_like(response)
    label_mask[:, :-1] = response[:, 1:]
    batch = {"tokens": tokens, "position_ids": torch.arange(seq).expand(n, seq).contiguous(),
             "response_mask": response, "labels": labels, "label_mask": label_mask, "index": torch.arange(pairs)}
    return {k: v.to(device) for k, v in batch.items()}


def bench_rm_step(args, model_cfg, bf16: bool, device) -> dict:
    import torch

    from megatron_qrm.models import LoRAConfig, PrecisionConfig, build_model
    from megatron_qrm.planning.memory import training_flops_per_token
    from megatron_qrm.rewards.scoring import RewardLossConfig, train_forward_step
    from megatron_qrm.training.engine import OptimConfig, build_optimizer, run_global_batch, wrap_ddp

    loss_cfg = RewardLossConfig("qrm")
    optim = OptimConfig(lr=1e-5, clip_grad=0.0, bf16=bf16)
    lora = LoRAConfig(rank=args.lora_rank) if args.lora_rank > 0 else None
    model = build_model(model_cfg, "reward", precision=PrecisionConfig(bf16=bf16), lora=lora,
                        transformer_impl=args.transformer_impl, recompute_granularity=args.recompute_granularity,
                        local_attention=args.local_attention, seed=args.seed)
    ddp = wrap_ddp(model, optim)
    optimizer, scheduler = build_optimizer(ddp, optim, train_iters=1_000_000)
    step_fn = train_forward_step(loss_cfg)
    batch = rm_batch(args.micro_batch_size, args.seq_length, model_cfg.vocab_size, args.seed, device)
    ddp.train()

    def step():
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        run_global_batch(ddp, step_fn, [batch], forward_only=False)
        optimizer.step()
        scheduler.step(increment=1)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    t = statistics.median(times)
    tokens = 2 * args.micro_batch_size * args.seq_length
    flops = tokens * training_flops_per_token(model_cfg, "reward", args.seq_length, args.lora_rank, full=True)
    if args.recompute_granularity == "full":
        hw_flops = flops + tokens * (training_flops_per_token(model_cfg, "reward", args.seq_length, 0, True) / 3)
    else:
        hw_flops = flops
    impl = model.transformer_impl
    return {"seconds": t, "tokens_per_s": tokens / t, "model_flops": flops, "hardware_flops": hw_flops,
            "tflops_per_s": flops / t / 1e12, "peak_memory_bytes": peak, "layer_spec": impl,
            "times": times}


def bench_decode(args, model_cfg, bf16: bool, device) -> dict:
    import torch

    from megatron_qrm.models import PrecisionConfig, build_model
    from megatron_qrm.planning.memory import forward_flops_per_token
    from megatron_qrm.rl.rollout import SamplingConfig, generate

    model = build_model(model_cfg, "policy", precision=PrecisionConfig(bf16=bf16),
                        transformer_impl=args.transformer_impl, local_attention=args.local_attention, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    b, p, n = args.decode_batch, args.prompt_length, args.new_tokens
    prompts = torch.randint(4, model_cfg.vocab_size, (b, p), generator=g).tolist()
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=n)
    kw = dict(eos_id=model_cfg.vocab_size + 7, pad_id=0, vocab_size=model_cfg.vocab_size, max_length=p + n)

    def run_prefill_only():  # one generated token: prefill + the first sample
        generate(model, prompts, SamplingConfig(temperature=1.0, max_new_tokens=1), **kw, seed=1)

    def run_all():
        generate(model, prompts, cfg, **kw, seed=1)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_prefill = statistics.median(_timed(run_prefill_only, 2, 1))
    t_all = statistics.median(_timed(run_all, 2, 1))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    t_decode = max(t_all - t_prefill, 1e-9)
    steps = max(n - 1, 1)
    ctx = p + n / 2
    flops = b * steps * forward_flops_per_token(model_cfg, "policy", int(ctx))
    e = 2 if bf16 else 4
    weight_bytes = sum(x.numel() * x.element_size() for x in model.parameters())
    kv_per_token = 2 * model_cfg.num_layers * model_cfg.num_query_groups * model_cfg.kv_channels * e
    bytes_per_step = weight_bytes + b * ctx * kv_per_token
    return {"seconds_total": t_all, "seconds_prefill": t_prefill, "generated_tokens_per_s": b * n / t_all,
            "decode_tokens_per_s": b * steps / t_decode, "decode_step_ms": 1e3 * t_decode / steps,
            "model_flops": flops, "tflops_per_s": flops / t_decode / 1e12, "bytes_per_step": bytes_per_step,
            "peak_memory_bytes": peak}


def check_packed_equals_unpacked(args, model_cfg, bf16: bool, device, impl: str) -> dict:
    """Reward-model scores and the gradient of their sum on a packed (THD) micro-batch vs the same sequences
    padded: max absolute difference relative to the scores' scale (bf16 rounding: ~1e-2; fp32: ~1e-6)."""
    import torch

    from megatron_qrm.data.packing import pack_collated, packed_seq_params, unpack
    from megatron_qrm.models import PrecisionConfig, build_model

    torch.manual_seed(args.seed)
    model = build_model(model_cfg, "reward", precision=PrecisionConfig(bf16=bf16), transformer_impl=impl,
                        local_attention=args.local_attention, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n, s = 4, args.seq_length
    lengths = torch.randint(max(s // 4, 2), s + 1, (n,), generator=g)
    tokens = torch.randint(4, model_cfg.vocab_size, (n, s), generator=g)
    cols = torch.arange(s)
    valid = cols[None, :] < lengths[:, None]
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    rows = {"tokens": tokens, "position_ids": cols.expand(n, s).contiguous(), "response_mask": valid.float(),
            "seq_lengths": lengths}
    packed = pack_collated(dict(rows), pad_id=0, pad_to_multiple=8)
    packed = {k: v.to(device) if torch.is_tensor(v) else v for k, v in packed.items()}
    rows = {k: v.to(device) for k, v in rows.items()}
    out = {}
    for name, batch in (("unpacked", rows), ("packed", packed)):
        model.zero_grad(set_to_none=True)
        scores = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                       packed_seq_params=packed_seq_params(batch))
        scores = unpack(scores, batch)[..., 0].float()  # [N, S]
        scores = torch.where(valid.to(device), scores, torch.zeros_like(scores))
        scores.sum().backward()
        grad = model.output_layer.weight.grad.float().clone()
        out[name] = (scores.detach(), grad)
    scale = float(out["unpacked"][0].abs().max()) or 1.0
    gscale = float(out["unpacked"][1].abs().max()) or 1.0
    return {"scores_max_rel_diff": float((out["packed"][0] - out["unpacked"][0]).abs().max()) / scale,
            "grad_max_rel_diff": float((out["packed"][1] - out["unpacked"][1]).abs().max()) / gscale,
            "tokens_packed": int(packed["tokens"].shape[1]), "tokens_padded": n * s}


def vllm_refit(args, model_cfg, bf16: bool) -> dict:
    """A vLLM refit through the hook ``megatron_qrm.rl.vllm_engine.gpu_check_refit(model, model_cfg) -> dict``
    (written with the vLLM engine; docs/gpu.md): skipped with the reason when vLLM or the hook is absent."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return {"status": f"skipped: vllm not importable ({type(e).__name__})"}
    try:
        from megatron_qrm.rl import vllm_engine
    except Exception as e:  # noqa: BLE001
        return {"status": f"skipped: megatron_qrm.rl.vllm_engine not importable ({type(e).__name__}: {e})"}
    hook = getattr(vllm_engine, "gpu_check_refit", None)
    if hook is None:
        return {"status": "skipped: megatron_qrm.rl.vllm_engine has no gpu_check_refit(model, model_cfg) hook"}
    from megatron_qrm.models import PrecisionConfig, build_model

    model = build_model(model_cfg, "policy", precision=PrecisionConfig(bf16=bf16), seed=args.seed)
    try:
        return dict(status="ok", **hook(model, model_cfg))
    except Exception as e:  # noqa: BLE001  (reported in the table, the rest of the check still runs)
        return {"status": f"failed: {type(e).__name__}: {e}"}


def specs_to_check(args) -> tuple[list[str], str]:
    from megatron_qrm.models.builder import transformer_impl_available

    te, why = transformer_impl_available()
    return (["te"] if te else []) + ["local"], why


def run_all(args, model_cfg, bf16: bool, device, peak_flops) -> dict:
    """The GPU check (``--all``): one entry per layer spec, plus the vLLM refit."""
    import torch

    specs, te_reason = specs_to_check(args)
    out = {"specs": {}, "te_reason": te_reason}
    for impl in specs:
        args.transformer_impl = impl
        entry = {"packed_vs_unpacked": check_packed_equals_unpacked(args, model_cfg, bf16, device, impl)}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rm = bench_rm_step(args, model_cfg, bf16, device)
        entry["rm_step"] = rm
        entry["rm_step_mfu"] = rm["model_flops"] / rm["seconds"] / peak_flops if peak_flops else None
        entry["rm_step_planned_peak_bytes"] = planned_peak(args, model_cfg, bf16, rm["layer_spec"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        entry["decode"] = bench_decode(args, model_cfg, bf16, device) if args.decode_batch > 0 else None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        out["specs"][impl] = entry
    out["vllm_refit"] = vllm_refit(args, model_cfg, bf16)
    return out


def print_table(result: dict, args) -> None:
    tol = 2e-2 if result["dtype"] == "bf16" else 1e-4
    print(f"{result['device']}; torch {result['torch']}, megatron-core {result['megatron_core']}; {result['model']} "
          f"({result['dtype']}){'  [CPU SMOKE: not a GPU measurement]' if result['cpu_smoke'] else ''}")
    if "te" not in result["all"]["specs"]:
        print(f"Transformer Engine spec: not built ({result['all']['te_reason']})")
    head = ("spec", "packed==unpacked", "RM step ms", "tokens/s", "MFU", "peak GiB", "planned GiB",
            "decode tok/s", "ms/step")
    print(" | ".join(f"{h:>16}" for h in head))
    for impl, e in result["all"]["specs"].items():
        pv, rm, dec = e["packed_vs_unpacked"], e["rm_step"], e["decode"]
        ok = max(pv["scores_max_rel_diff"], pv["grad_max_rel_diff"])
        gib = lambda b: f"{b / 2**30:.2f}" if b else "n/a"  # noqa: E731
        cells = (impl, f"{'ok' if ok <= tol else 'FAIL'} {ok:.1e}", f"{rm['seconds'] * 1e3:.1f}",
                 f"{rm['tokens_per_s']:.0f}", f"{e['rm_step_mfu']:.1%}" if e["rm_step_mfu"] else "n/a",
                 gib(rm["peak_memory_bytes"]), gib(e["rm_step_planned_peak_bytes"]),
                 f"{dec['generated_tokens_per_s']:.0f}" if dec else "n/a",
                 f"{dec['decode_step_ms']:.2f}" if dec else "n/a")
        print(" | ".join(f"{c:>16}" for c in cells))
    print(f"vLLM refit: {result['all']['vllm_refit']}")


def planned_peak(args, model_cfg, bf16: bool, impl: str) -> int:
    from megatron_qrm.planning.memory import PlanInput, estimate

    i = PlanInput(model=model_cfg, role="reward", lora_rank=args.lora_rank, micro_batch_size=args.micro_batch_size,
                  seq_length=args.seq_length, recompute=args.recompute_granularity or "none",
                  transformer_impl="te" if impl == "te" else "local",
                  attention="unfused" if (impl != "te" and args.local_attention == "unfused") else "auto",
                  bf16=bf16, fused_activation=bf16, gpu="h100-80gb", reserve_bytes=0)
    return estimate(i).per_gpu_bytes


def _write_result(result: dict, args) -> bool:
    """Write ``result`` to ``--output`` (if given) and print it as JSON with ``--json``; True when printed."""
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
    return bool(args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_step.py: no CUDA GPU here. It measures GPU throughput; `--cpu-smoke` runs a tiny model on CPU "
              "to check the script itself (its numbers mean nothing for GPUs).", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)  # megatron-core logs its DDP / optimizer configs
    import megatron.core

    from megatron_qrm import parallel
    from megatron_qrm.config import ModelConfig, ParallelConfig, preset
    from megatron_qrm.planning.check import detect_gpu
    from megatron_qrm.planning.memory import GPUS

    if args.cpu_smoke:
        if torch.cuda.is_available():
            print("gpu_step.py: --cpu-smoke is for machines without a GPU", file=sys.stderr)
            return 2
        model_cfg = ModelConfig(**TINY)
        args.seq_length, args.steps, args.warmup = min(args.seq_length, 32), 1, 0
        args.decode_batch = min(args.decode_batch, 2)
        args.prompt_length, args.new_tokens = min(args.prompt_length, 8), min(args.new_tokens, 4)
        args.lora_rank = min(args.lora_rank, 4)
        bf16 = False
    else:
        model_cfg = preset(args.model)
        bf16 = True
    parallel.initialize(ParallelConfig(seed=args.seed))
    device = parallel.device()
    gpu_key, _ = detect_gpu()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (GPUS[gpu_key].peak_bf16_flops if gpu_key else None)
    hbm = GPUS[gpu_key].hbm_bytes_per_s if gpu_key else None
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"

    if args.all:
        result = {
            "device": device_name, "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "python": platform.python_version(), "cpu_smoke": args.cpu_smoke,
            "model": "tiny" if args.cpu_smoke else args.model, "dtype": "bf16" if bf16 else "fp32",
            "lora_rank": args.lora_rank, "seq_length": args.seq_length, "peak_flops": peak,
            "all": run_all(args, model_cfg, bf16, device, peak),
        }
        parallel.destroy()
        if not _write_result(result, args):
            print_table(result, args)
        tol = 2e-2 if bf16 else 1e-4
        bad = [i for i, e in result["all"]["specs"].items()
               if max(e["packed_vs_unpacked"]["scores_max_rel_diff"], e["packed_vs_unpacked"]["grad_max_rel_diff"]) > tol]
        return 1 if bad else 0

    rm = bench_rm_step(args, model_cfg, bf16, device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the RM step's model and optimizer are gone with its frame
    dec = bench_decode(args, model_cfg, bf16, device) if args.decode_batch > 0 else None
    result = {
        "device": device_name, "torch": torch.__version__, "megatron_core": megatron.core.__version__,
        "python": platform.python_version(), "cpu_smoke": args.cpu_smoke,
        "model": "tiny" if args.cpu_smoke else args.model, "dtype": "bf16" if bf16 else "fp32",
        "layer_spec": rm["layer_spec"], "lora_rank": args.lora_rank, "seq_length": args.seq_length,
        "micro_batch_size_pairs": args.micro_batch_size, "recompute": args.recompute_granularity,
        "rm_step": {k: v for k, v in rm.items() if k != "layer_spec"},
        "rm_step_mfu": rm["model_flops"] / rm["seconds"] / peak if peak else None,
        "rm_step_planned_peak_bytes": planned_peak(args, model_cfg, bf16, rm["layer_spec"]),
        "decode": dec,
        "decode_mfu": dec["model_flops"] / (dec["decode_step_ms"] / 1e3 * max(args.new_tokens - 1, 1)) / peak
        if dec and peak else None,
        "decode_mbu": dec["bytes_per_step"] / (dec["decode_step_ms"] / 1e3) / hbm if dec and hbm else None,
        "peak_flops": peak,
    }
    parallel.destroy()
    if not _write_result(result, args):
        r = result
        print(f"{r['device']}; torch {r['torch']}, megatron-core {r['megatron_core']}; {r['model']} ({r['dtype']}, "
              f"{r['layer_spec']} spec){'  [CPU SMOKE: not a GPU measurement]' if args.cpu_smoke else ''}")
        s = r["rm_step"]
        mfu = f"{r['rm_step_mfu']:.1%}" if r["rm_step_mfu"] is not None else "n/a"
        peak_mem = f"{s['peak_memory_bytes'] / 2**30:.2f} GiB" if s["peak_memory_bytes"] else "n/a"
        print(f"RM step (LoRA r={args.lora_rank}, {args.micro_batch_size} pair(s) x {args.seq_length} tokens): "
              f"{s['seconds'] * 1e3:.1f} ms, {s['tokens_per_s']:.0f} tokens/s, {s['tflops_per_s']:.1f} TFLOP/s, "
              f"MFU {mfu}; peak memory {peak_mem} (planner: {r['rm_step_planned_peak_bytes'] / 2**30:.2f} GiB)")
        if dec:
            dm = f"{r['decode_mfu']:.2%}" if r["decode_mfu"] is not None else "n/a"
            mbu = f"{r['decode_mbu']:.1%}" if r["decode_mbu"] is not None else "n/a"
            print(f"decode ({args.decode_batch} x {args.prompt_length} prompt + {args.new_tokens} new): "
                  f"{dec['generated_tokens_per_s']:.0f} generated tokens/s, {dec['decode_step_ms']:.2f} ms/step, "
                  f"MFU {dm}, bandwidth utilisation {mbu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
