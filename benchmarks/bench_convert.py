"""Wall time and peak memory of `tools/convert_hf.py` import / export on a synthetic multi-GB Llama.

1. Generates a random Llama checkpoint (bf16 by default, written tensor by tensor in HF's sharded
   safetensors layout, ``--shard-size`` per file, 2+ shards) in ``--workdir``.
2. Runs, each as its own process under ``/usr/bin/time -v``:
   * ``import`` at TP=1 PP=1 and at ``--tp``/``--pp`` (default TP=8 PP=2, the 70B reward-model layout);
   * ``export`` of the TP/PP import back to HF (``--shard-size`` shards);
   and checks the round trip is bitwise identical (tensor by tensor, streamed).
3. Reports wall time, peak RSS ("Maximum resident set size") and the ratio of peak RSS to the largest
   input shard and to the largest single tensor; ``--json`` writes it all.

Example (defaults: ~2.7 GB model, 3 shards of <= 1 GB)::

    python benchmarks/bench_convert.py --workdir /tmp/bench_convert
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_convert")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--shard-size", default="1GB", help="HF shard size of the generated (and exported) model")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def generate(args, path: str) -> dict:
    """A random Llama in HF layout, written one tensor at a time (never the whole model in memory)."""
    import torch

    from megatron_qrm.conversion.safetensors_io import ShardedSafetensorsWriter, parse_size

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h, d = args.hidden, args.hidden // args.heads
    kv = args.kv_heads * d
    per_layer = [("input_layernorm.weight", (h,)), ("self_attn.q_proj.weight", (h, h)),
                 ("self_attn.k_proj.weight", (kv, h)), ("self_attn.v_proj.weight", (kv, h)),
                 ("self_attn.o_proj.weight", (h, h)), ("post_attention_layernorm.weight", (h,)),
                 ("mlp.gate_proj.weight", (args.ffn, h)), ("mlp.up_proj.weight", (args.ffn, h)),
                 ("mlp.down_proj.weight", (h, args.ffn))]
    entries = [("model.embed_tokens.weight", (args.vocab, h), dtype)]
    entries += [(f"model.layers.{i}.{n}", s, dtype) for i in range(args.layers) for n, s in per_layer]
    entries += [("model.norm.weight", (h,), dtype), ("lm_head.weight", (args.vocab, h), dtype)]
    os.makedirs(path)
    writer = ShardedSafetensorsWriter(path, entries, parse_size(args.shard_size))
    gen = torch.Generator().manual_seed(0)
    for name, shape, dt in entries:
        t = (1 + 0.02 * torch.randn(shape, generator=gen)) if name.endswith("norm.weight") else \
            0.02 * torch.randn(shape, generator=gen)
        writer.write(name, t.to(dt))
        del t
    writer.close()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": args.ffn, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
              "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float32"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    esize = 2 if args.dtype == "bf16" else 4
    return {"tensors": len(entries), "total_bytes": sum(math.prod(s) for _, s, _ in entries) * esize,
            "largest_tensor_bytes": max(math.prod(s) for _, s, _ in entries) * esize}


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (bytes)."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(x) for x in elapsed.split(":")]
    seconds = sum(v * 60 ** k for k, v in enumerate(reversed(parts)))
    return {"wall_s": round(seconds, 2), "wall_s_outer": round(wall, 2), "peak_rss_bytes": rss_kb * 1024}


def baseline_rss() -> int:
    """Peak RSS of a process that only imports what the converter imports (Python + torch + DCP)."""
    r = timed([sys.executable, "-c", "import megatron_qrm.conversion.cli, megatron_qrm.conversion.importer, "
                                     "megatron_qrm.conversion.exporter, tqdm"])
    return r["peak_rss_bytes"]


def bitwise_equal(a_dir: str, b_dir: str) -> bool:
    """Every tensor of ``a_dir`` and ``b_dir`` has the same name, dtype, shape and bytes (streamed)."""
    import torch

    from megatron_qrm.conversion.safetensors_io import SafetensorsReader

    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    if set(a.tensors) != set(b.tensors):
        return False
    for name in a.tensors:
        x, y = a.read(name), b.read(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, tool = os.path.join(work, "hf"), os.path.join(REPO, "tools", "convert_hf.py")
    t0 = time.time()
    model = generate(args, hf)
    model["generate_s"] = round(time.time() - t0, 1)
    shards = {fn: os.path.getsize(os.path.join(hf, fn)) for fn in os.listdir(hf) if fn.endswith(".safetensors")}
    largest = max(shards.values())
    runs = {}
    py = [sys.executable, tool]
    runs["import_tp1_pp1"] = timed(py + ["import", "--hf-path", hf, "--out", os.path.join(work, "mg_tp1"),
                                         "--no-progress"])
    runs[f"import_tp{args.tp}_pp{args.pp}"] = timed(py + [
        "import", "--hf-path", hf, "--out", os.path.join(work, "mg_tp"), "-tp", str(args.tp), "-pp", str(args.pp),
        "--role", "reward", "--no-progress"])
    shutil.rmtree(os.path.join(work, "mg_tp1"))
    # export the policy layout back (the reward import has no LM head): re-import TP/PP as policy
    shutil.rmtree(os.path.join(work, "mg_tp"))
    subprocess.run(py + ["import", "--hf-path", hf, "--out", os.path.join(work, "mg_tp"), "-tp", str(args.tp),
                         "-pp", str(args.pp), "--no-progress"], check=True, capture_output=True)
    runs[f"export_from_tp{args.tp}_pp{args.pp}"] = timed(py + [
        "export", "--megatron-path", os.path.join(work, "mg_tp"), "--out", os.path.join(work, "hf_back"),
        "--max-shard-size", args.shard_size, "--no-progress"])
    base = baseline_rss()
    for r in runs.values():
        r["rss_over_largest_shard"] = round(r["peak_rss_bytes"] / largest, 3)
        r["rss_over_largest_tensor"] = round(r["peak_rss_bytes"] / model["largest_tensor_bytes"], 3)
        r["rss_minus_baseline_over_largest_tensor"] = round(
            (r["peak_rss_bytes"] - base) / model["largest_tensor_bytes"], 3)
        r["throughput_MB_s"] = round(model["total_bytes"] / 1e6 / r["wall_s"], 1)
    result = {
        "model": dict(model, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                      ffn=args.ffn, vocab=args.vocab, dtype=args.dtype),
        "hf_shards": shards, "largest_shard_bytes": largest, "baseline_rss_bytes": base,
        "round_trip_bitwise": bitwise_equal(hf, os.path.join(work, "hf_back")),
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
