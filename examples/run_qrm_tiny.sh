#!/usr/bin/env bash
# Train and evaluate a tiny token-level reward model (Q-RM) on CPU, on data generated here.
#
#   bash examples/run_qrm_tiny.sh                 # single process, outputs in runs/tiny
#   OUT=/tmp/qrm bash examples/run_qrm_tiny.sh    # elsewhere
#   NPROC=2 TP=2 bash examples/run_qrm_tiny.sh    # 2 processes under torchrun, tensor parallel 2
#   NPROC=2 bash examples/run_qrm_tiny.sh         # 2 processes, data parallel 2
#
# Steps: (1) synthetic preference pairs (sort a list of numbers; the rejected answer swaps two
# neighbours) + a SentencePiece tokenizer trained on them; (2) `qrm train-rm` with the Q-RM loss;
# (3) `qrm eval-rm` on a held-out file: pairwise accuracy + every response token's credit Z.
# Everything in OUT is recreated on each run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-runs/tiny}"
NPROC="${NPROC:-1}"
TP="${TP:-1}"
PP="${PP:-1}"
ITERS="${ITERS:-1000}"
GLOBAL_BATCH="${GLOBAL_BATCH:-16}"   # preference pairs per optimizer step
TRAIN_PAIRS="${TRAIN_PAIRS:-2000}"
TEST_PAIRS="${TEST_PAIRS:-200}"

if (( NPROC % (TP * PP) != 0 )); then
    echo "run_qrm_tiny.sh: NPROC=$NPROC is not a multiple of TP*PP=$((TP * PP))" >&2
    exit 2
fi
DP=$(( NPROC / (TP * PP) ))
if (( GLOBAL_BATCH % DP != 0 )); then
    echo "run_qrm_tiny.sh: GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of the data-parallel size $DP" >&2
    exit 2
fi
MICRO_BATCH=$(( GLOBAL_BATCH / DP ))  # one micro-batch per data-parallel rank and step

if (( NPROC > 1 )); then
    QRM=(torchrun --standalone --nproc_per_node "$NPROC" -m megatron_qrm)
elif command -v qrm >/dev/null 2>&1; then
    QRM=(qrm)
else
    QRM=(python -m megatron_qrm)
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

DATA="$OUT/data"
CKPT="$OUT/checkpoints"
EVAL="$OUT/eval"
rm -rf "$DATA" "$CKPT" "$EVAL"
mkdir -p "$OUT"
start=$SECONDS

echo "== 1/3 synthetic data + tokenizer -> $DATA"
python examples/make_tiny_data.py --out "$DATA" --train-pairs "$TRAIN_PAIRS" --test-pairs "$TEST_PAIRS"

echo "== 2/3 train a tiny Q-RM (2 layers, hidden 64; $ITERS steps of $GLOBAL_BATCH pairs; TP=$TP PP=$PP DP=$DP) -> $CKPT"
"${QRM[@]}" train-rm \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --train-data "$DATA/train.jsonl" --tokenizer "$DATA/tokenizer.model" --seq-length 64 \
    --reward-loss qrm \
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --train-iters "$ITERS" \
    --lr 3e-4 --log-interval 50 \
    --save "$CKPT" --save-interval 500 --keep-last 2

echo "== 3/3 evaluate on held-out pairs -> $EVAL"
"${QRM[@]}" eval-rm \
    --load "$CKPT" --data "$DATA/test.jsonl" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --output "$EVAL/metrics.json" --dump-token-scores "$EVAL/token_scores.jsonl"

python - "$EVAL/metrics.json" "$EVAL/token_scores.jsonl" <<'PY'
import json, sys

m = json.load(open(sys.argv[1]))
print(f"\nheld-out pairwise accuracy: {m['pairwise_accuracy']:.3f} on {m['valid_pairs']} pairs "
      f"(mean margin of mean token credit: {m['mean_margin']:.2f})")
rows = [json.loads(line) for line in open(sys.argv[2])][:2]  # the chosen and rejected side of pair 0
print(f"token credits Z of pair 0 (prompt: {rows[0]['prompt']!r}):")
for r in rows:
    cells = " ".join(f"{t.strip() or t!s}:{z:+.1f}" for t, z in zip(r["tokens"], r["scores"]))
    print(f"  {r['side']:>8}  mean {r['mean_score']:+.2f}  {cells}")
PY

echo
echo "done in $((SECONDS - start)) s. Outputs:"
echo "  data + tokenizer   $DATA/{train,test}.jsonl, $DATA/tokenizer.model"
echo "  checkpoints        $CKPT (latest: $(cat "$CKPT/latest" 2>/dev/null || echo '?'))"
echo "  training metrics   $CKPT/metrics.jsonl, TensorBoard: $CKPT/tensorboard"
echo "  eval metrics       $EVAL/metrics.json"
echo "  token credits      $EVAL/token_scores.jsonl"
