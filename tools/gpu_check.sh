#!/usr/bin/env bash
# The GPU check, for the first GPU this project gets (docs/gpu.md). One prepared script, ~5-10 minutes on one
# H100/A100 with the defaults:
#
#   1. environment: nvidia-smi, torch / CUDA / Transformer Engine / vLLM versions;
#   2. the GPU-path unit tests that need a GPU-free interpreter anyway (the wall; FlexAttention masks);
#   3. packed attention on the GPU: bucketed SDPA vs varlen_attn vs compiled FlexAttention, bf16, document and
#      prefix-tree masks (benchmarks/bench_packed_attention.py);
#   4. benchmarks/gpu_step.py --all: per layer spec (TE if importable, local): bf16 RM step packed == unpacked,
#      RM step time and MFU, sampler tokens/s, planner memory vs torch.cuda.max_memory_allocated, vLLM refit
#      (if installed) -- one table; its JSON is written to $OUT (default ./gpu_check_out).
#
# Usage (repository root, the project's Python environment active):
#   tools/gpu_check.sh                       # llama3.2-1b shape (fits any 40 GB+ GPU), LoRA r=128
#   MODEL=llama3-8b tools/gpu_check.sh       # the 8B shape (80 GB GPU)
#   tools/gpu_check.sh --cpu-smoke           # the same steps on CPU with a tiny model (checks the script only)
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
MODEL=${MODEL:-llama3.2-1b}
mkdir -p "$OUT"
SMOKE=""
[ "${1:-}" = "--cpu-smoke" ] && SMOKE="--cpu-smoke"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
status=0

echo "== 1. environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("megatron.core", "transformer_engine", "vllm", "apex"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(name, "not importable:", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
PY

echo "== 2. GPU-path tests"
timeout 900 "$PY" -m pytest -x -q tests/test_gpu_path.py || status=1

echo "== 3. packed attention kernels"
if [ -n "$SMOKE" ]; then
    timeout 600 "$PY" benchmarks/bench_packed_attention.py --seqs 4 --min-len 16 --max-len 48 --warmup 1 --repeats 1 \
        --skip flex_compiled | tee "$OUT/packed_attention.txt" || status=1
else
    for shared in "" "--shared"; do
        timeout 900 "$PY" benchmarks/bench_packed_attention.py --device cuda --bf16 --seqs 16 --min-len 256 \
            --max-len 2048 $shared | tee -a "$OUT/packed_attention.txt" || status=1
    done
fi

echo "== 4. gpu_step --all"
if [ -n "$SMOKE" ]; then
    timeout 900 "$PY" benchmarks/gpu_step.py --all --cpu-smoke --output "$OUT/gpu_step_all.json" || status=1
else
    timeout 1800 "$PY" benchmarks/gpu_step.py --all --model "$MODEL" --output "$OUT/gpu_step_all.json" || status=1
fi
echo "results in $OUT/ (exit $status)"
exit $status
