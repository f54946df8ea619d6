#!/usr/bin/env bash
# A 70B token-level reward model (Q-RM) and PPO against it, with the paper's settings:
#
#   convert  Llama-3-70B-Instruct and Llama-3.2-3B-Instruct (Hugging Face) -> Megatron checkpoints
#   rm       Q-RM on Llama-3-70B-Instruct: TP=8, LoRA r=128, seq 1024, bf16, beta 0.2, gamma 2.0,
#            lr 1e-5 constant, 2 preference pairs per step, one epoch in file order
#   ppo      PPO of Llama-3.2-3B-Instruct with the Q-RM's token credits: rollout batch 3072, lr 5e-6,
#            clip 0.2, KL 0.01 (full-distribution KL), critic = the Q-RM backbone with LoRA r=128
#            (no sequence parallelism: PPO_SEQUENCE_PARALLEL=1 turns it on)
#
# on NNODES x 8 A100-80GB. Before each training stage the memory plan (`qrm plan`) runs; a plan that
# does not fit stops the script (SKIP_MEMORY_CHECK=1 overrides).
#
#   examples/run_qrm_70b.sh --dry-run             # print the resolved commands and memory plans only
#   examples/run_qrm_70b.sh convert               # once (node 0); the other stages read its output
#   examples/run_qrm_70b.sh rm                    # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 examples/run_qrm_70b.sh rm   # on every node (NODE_RANK 0..1)
#   examples/run_qrm_70b.sh ppo
#   examples/run_qrm_70b.sh                       # all three
#
# Every path and size below is an environment variable; the defaults are the paper's. Re-running a
# stage resumes from its latest checkpoint (the same command with --save DIR resumes from DIR/latest,
# docs/reliability.md), so a killed or requeued job loses at most the steps since its last save. examples/slurm/ submits the same stages with sbatch.
set -euo pipefail

usage() {
    sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
STAGES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        convert|rm|ppo|all) STAGES+=("$arg") ;;
        *) echo "run_qrm_70b.sh: unknown argument '$arg' (stages: convert rm ppo all; --dry-run)" >&2; exit 2 ;;
    esac
done
if (( ${#STAGES[@]} == 0 )) || [[ " ${STAGES[*]} " == *" all "* ]]; then
    STAGES=(convert rm ppo)
fi

QRM_HOME="${QRM_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$QRM_HOME"
PYTHON="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"

# ---- cluster (SLURM's variables when launched by examples/slurm/*.sbatch)
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-}"                  # set: c10d rendezvous at MASTER_ADDR:MASTER_PORT (node ranks by torchrun)
TORCHRUN_LOG_DIR="${TORCHRUN_LOG_DIR:-}" # set: per-rank logs there (torchrun --log-dir, --tee 3)
GPU="${GPU:-a100-80gb}"                 # for the memory plan: a100-40gb | a100-80gb | h100-80gb | h200-141gb
PLAN_TRANSFORMER_IMPL="${PLAN_TRANSFORMER_IMPL:-te}"   # te in NGC containers; local without Transformer Engine
SKIP_MEMORY_CHECK="${SKIP_MEMORY_CHECK:-0}"  # 1: go on when the plan does not fit (+ trainers' --skip-memory-check)
WORLD=$(( NNODES * GPUS_PER_NODE ))

# ---- models and outputs
HF_RM="${HF_RM:-/models/Meta-Llama-3-70B-Instruct}"
HF_ACTOR="${HF_ACTOR:-/models/Llama-3.2-3B-Instruct}"
RM_PRESET="${RM_PRESET:-llama3-70b}"        # architecture of HF_RM (for the memory plan)
ACTOR_PRESET="${ACTOR_PRESET:-llama3.2-3b}" # architecture of HF_ACTOR
WORK="${WORK:-runs/qrm70b}"
RM_BASE="${RM_BASE:-$WORK/ckpt/llama3-70b-instruct-reward}"  # converted RM backbone
ACTOR_BASE="${ACTOR_BASE:-$WORK/ckpt/llama3.2-3b-instruct}"  # converted actor (and PPO reference)
RM_SAVE="${RM_SAVE:-$WORK/qrm}"
PPO_SAVE="${PPO_SAVE:-$WORK/ppo}"

# ---- data ({"instruction", "chosen", "rejected"} pairs; {"instruction", "label"} prompts)
RM_DATA="${RM_DATA:-data/gsm8k/train/pairwise.jsonl}"
RM_TEST_DATA="${RM_TEST_DATA:-}"        # set: eval-rm on it after training (pairwise accuracy)
PPO_PROMPTS="${PPO_PROMPTS:-data/gsm8k/train/ppo.jsonl}"
EVAL_DATA="${EVAL_DATA:-}"              # set: greedy Pass@1 of the policy after each PPO iteration
TASK="${TASK:-gsm8k}"

# ---- Q-RM training
TP="${TP:-8}"
PP="${PP:-1}"
SEQ="${SEQ:-1024}"
LORA_RANK="${LORA_RANK:-128}"
QRM_BETA="${QRM_BETA:-0.2}"
QRM_GAMMA="${QRM_GAMMA:-2.0}"
RM_LR="${RM_LR:-1e-5}"
RM_MICRO_BATCH="${RM_MICRO_BATCH:-1}"   # preference pairs per micro-batch (2 sequences each)
SEQUENCE_PARALLEL="${SEQUENCE_PARALLEL:-1}"
RECOMPUTE="${RECOMPUTE:-}"              # '' | selective | full: --recompute-granularity for plan and trainers
RM_SAVE_INTERVAL="${RM_SAVE_INTERVAL:-1000}"
RM_KEEP_LAST="${RM_KEEP_LAST:-2}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"

# ---- PPO
PPO_TP="${PPO_TP:-$TP}"
PPO_PP="${PPO_PP:-$PP}"
ROLLOUT_BATCH="${ROLLOUT_BATCH:-3072}"
PPO_LR="${PPO_LR:-5e-6}"
CLIP_EPS="${CLIP_EPS:-0.2}"
KL_COEF="${KL_COEF:-0.01}"
PPO_ITERS="${PPO_ITERS:-12}"            # one pass over GSM8K's 37,365 prompts in chunks of 3072
CRITIC_LORA_RANK="${CRITIC_LORA_RANK:-128}"
CRITIC_LR="${CRITIC_LR:-1e-5}"
PPO_MICRO_BATCH="${PPO_MICRO_BATCH:-1}"  # sequences per update micro-batch (the 70B critic's update is the peak)
PPO_SEQUENCE_PARALLEL="${PPO_SEQUENCE_PARALLEL:-0}"  # off: the KV-cache sampler feeds 1-token steps
GEN_BATCH="${GEN_BATCH:-64}"            # sequences per generation call per data-parallel rank
FORWARD_MICRO_BATCH="${FORWARD_MICRO_BATCH:-8}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-$SEQ}" # prompt + response <= SEQ in any case
PPO_OFFLOAD="${PPO_OFFLOAD:-0}"

die() { echo "run_qrm_70b.sh: $*" >&2; exit 2; }

(( WORLD % (TP * PP) == 0 )) || die "NNODES x GPUS_PER_NODE = $WORLD is not a multiple of TP x PP = $((TP * PP))"
(( WORLD % (PPO_TP * PPO_PP) == 0 )) || die "$WORLD GPUs are not a multiple of PPO_TP x PPO_PP"
RM_DP=$(( WORLD / (TP * PP) ))
PPO_DP=$(( WORLD / (PPO_TP * PPO_PP) ))
# the reference's 2 pairs per optimizer step, or one micro-batch per data-parallel rank if that is more
RM_GLOBAL_BATCH="${RM_GLOBAL_BATCH:-$(( RM_MICRO_BATCH * RM_DP > 2 ? RM_MICRO_BATCH * RM_DP : 2 ))}"
(( RM_GLOBAL_BATCH % (RM_MICRO_BATCH * RM_DP) == 0 )) \
    || die "RM_GLOBAL_BATCH=$RM_GLOBAL_BATCH is not a multiple of RM_MICRO_BATCH x data-parallel size ($RM_MICRO_BATCH x $RM_DP)"
# 16 sequences per PPO optimizer step (the reference's 10 does not divide 3072), more if DP needs it
unit=$(( PPO_MICRO_BATCH * PPO_DP ))
PPO_GLOBAL_BATCH="${PPO_GLOBAL_BATCH:-$(( unit * ((16 + unit - 1) / unit) ))}"
(( PPO_GLOBAL_BATCH % unit == 0 )) || die "PPO_GLOBAL_BATCH=$PPO_GLOBAL_BATCH is not a multiple of PPO_MICRO_BATCH x DP = $unit"
(( ROLLOUT_BATCH % PPO_GLOBAL_BATCH == 0 )) || die "ROLLOUT_BATCH=$ROLLOUT_BATCH is not a multiple of PPO_GLOBAL_BATCH=$PPO_GLOBAL_BATCH"
(( ROLLOUT_BATCH % PPO_DP == 0 )) || die "ROLLOUT_BATCH=$ROLLOUT_BATCH is not a multiple of the PPO data-parallel size $PPO_DP"

# one epoch over the pairs (the reference): count them when the file is plain JSONL
if [[ -z "${RM_ITERS:-}" ]]; then
    if [[ -f "$RM_DATA" && "$RM_DATA" == *.jsonl ]]; then
        pairs=$(grep -c . "$RM_DATA" || true)
        RM_ITERS=$(( (pairs + RM_GLOBAL_BATCH - 1) / RM_GLOBAL_BATCH ))
    else
        RM_ITERS=22682  # GSM8K: 45,364 pairs / 2 per step
    fi
fi
(( RM_ITERS > 0 )) || die "RM_ITERS=$RM_ITERS: no training steps (is $RM_DATA empty?)"

# ---- launch helpers
show() {  # print a command line, shell-quoted so it can be pasted
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    echo "${out% }"
}

run() {  # show, then execute unless --dry-run
    show "$@"
    if (( DRY_RUN == 0 )); then "$@"; fi
}

TORCHRUN_ARGS=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE")
if [[ -n "$RDZV_ID" ]]; then
    TORCHRUN_ARGS+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
else
    TORCHRUN_ARGS+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
if [[ -n "$TORCHRUN_LOG_DIR" ]]; then
    TORCHRUN_ARGS+=(--log-dir "$TORCHRUN_LOG_DIR" --tee 3)
fi

COMMON=(--bf16)
PLAN_EXTRA=(--gpu "$GPU" --transformer-impl "$PLAN_TRANSFORMER_IMPL")
if [[ -n "$RECOMPUTE" ]]; then
    COMMON+=(--recompute-granularity "$RECOMPUTE")
    PLAN_EXTRA+=(--recompute-granularity "$RECOMPUTE")
fi
[[ "$SKIP_MEMORY_CHECK" == 1 ]] && COMMON+=(--skip-memory-check)
RM_SP=()
[[ "$SEQUENCE_PARALLEL" == 1 ]] && RM_SP=(--sequence-parallel)
PPO_SP=()
[[ "$PPO_SEQUENCE_PARALLEL" == 1 ]] && PPO_SP=(--sequence-parallel)

plan() {  # the memory plan; stops the script when it does not fit (unless SKIP_MEMORY_CHECK=1)
    local rc=0
    show "$PYTHON" -m megatron_qrm.planning "$@"
    "$PYTHON" -m megatron_qrm.planning "$@" | sed 's/^/    /' || rc=$?
    if (( rc == 3 )); then
        if [[ "$SKIP_MEMORY_CHECK" == 1 ]]; then
            echo "# the plan does not fit; SKIP_MEMORY_CHECK=1: going on"
        elif (( DRY_RUN == 0 )); then
            die "the memory plan does not fit $GPU (see above); change the layout or set SKIP_MEMORY_CHECK=1"
        else
            echo "# the plan does not fit: a real run would stop here"
        fi
    elif (( rc != 0 )); then
        die "qrm plan failed (exit $rc)"
    fi
}

echo "# run_qrm_70b.sh: stages ${STAGES[*]}; $NNODES node(s) x $GPUS_PER_NODE GPUs (node rank $NODE_RANK)$( (( DRY_RUN )) && echo '; dry run: nothing is launched')"

stage_convert() {
    echo "# == convert (Hugging Face -> Megatron)"
    if (( NODE_RANK != 0 )); then
        echo "# node rank $NODE_RANK: conversion runs on node 0 only"
        return
    fi
    if [[ -f "$RM_BASE/latest" ]]; then
        echo "# $RM_BASE exists: skipping"
    else
        run "$PYTHON" tools/convert_hf.py import --hf-path "$HF_RM" --out "$RM_BASE" \
            --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --role reward --dtype bf16
    fi
    if [[ -f "$ACTOR_BASE/latest" ]]; then
        echo "# $ACTOR_BASE exists: skipping"
    else
        run "$PYTHON" tools/convert_hf.py import --hf-path "$HF_ACTOR" --out "$ACTOR_BASE" \
            --tensor-model-parallel-size "$PPO_TP" --pipeline-model-parallel-size "$PPO_PP" --role policy --dtype bf16
    fi
}

stage_rm() {
    echo "# == Q-RM: $RM_PRESET, TP=$TP PP=$PP DP=$RM_DP, LoRA r=$LORA_RANK, $RM_ITERS steps of $RM_GLOBAL_BATCH pairs"
    plan --model "$RM_PRESET" --role reward --lora-rank "$LORA_RANK" \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --num-gpus "$WORLD" \
        --seq-length "$SEQ" --micro-batch-size "$RM_MICRO_BATCH" --global-batch-size "$RM_GLOBAL_BATCH" \
        "${RM_SP[@]}" "${PLAN_EXTRA[@]}"
    run "$TORCHRUN" "${TORCHRUN_ARGS[@]}" -m megatron_qrm train-rm \
        --pretrained-checkpoint "$RM_BASE" --save "$RM_SAVE" \
        --tokenizer "$HF_RM" --train-data "$RM_DATA" --chat-template --seq-length "$SEQ" --skip-long-prompts \
        --reward-loss qrm --qrm-beta "$QRM_BETA" --qrm-gamma "$QRM_GAMMA" \
        --lora-rank "$LORA_RANK" \
        --micro-batch-size "$RM_MICRO_BATCH" --global-batch-size "$RM_GLOBAL_BATCH" --train-iters "$RM_ITERS" \
        --no-shuffle --lr "$RM_LR" --lr-decay-style constant --clip-grad 0 --weight-decay 0 \
        --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 \
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "${RM_SP[@]}" "${COMMON[@]}" \
        --save-interval "$RM_SAVE_INTERVAL" --keep-last "$RM_KEEP_LAST" --log-interval "$LOG_INTERVAL"
    if [[ -n "$RM_TEST_DATA" ]]; then
        run "$TORCHRUN" "${TORCHRUN_ARGS[@]}" -m megatron_qrm eval-rm \
            --load "$RM_SAVE" --data "$RM_TEST_DATA" \
            --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --bf16 --micro-batch-size 4
    fi
}

stage_ppo() {
    echo "# == PPO: actor $ACTOR_PRESET vs the Q-RM, TP=$PPO_TP PP=$PPO_PP DP=$PPO_DP, rollout $ROLLOUT_BATCH, $PPO_ITERS iterations"
    local offload=()
    [[ "$PPO_OFFLOAD" == 1 ]] && offload=(--offload)
    plan --model "$ACTOR_PRESET" --role ppo --reward-model "$RM_PRESET" --reward-lora-rank "$LORA_RANK" \
        --critic-lora-rank "$CRITIC_LORA_RANK" \
        --tensor-model-parallel-size "$PPO_TP" --pipeline-model-parallel-size "$PPO_PP" --num-gpus "$WORLD" \
        --seq-length "$SEQ" --micro-batch-size "$PPO_MICRO_BATCH" --generation-batch-size "$GEN_BATCH" \
        --forward-micro-batch-size "$FORWARD_MICRO_BATCH" --rollout-batch-size "$ROLLOUT_BATCH" \
        "${offload[@]}" "${PPO_SP[@]}" "${PLAN_EXTRA[@]}"
    local evaluation=()
    [[ -n "$EVAL_DATA" ]] && evaluation=(--eval-data "$EVAL_DATA" --task "$TASK")
    run "$TORCHRUN" "${TORCHRUN_ARGS[@]}" -m megatron_qrm train-ppo \
        --actor-checkpoint "$ACTOR_BASE" --reward-model "$RM_SAVE" --tokenizer "$HF_ACTOR" \
        --prompt-data "$PPO_PROMPTS" --chat-template --seq-length "$SEQ" --skip-long-prompts \
        --rollout-batch-size "$ROLLOUT_BATCH" --samples-per-prompt 1 --generation-batch-size "$GEN_BATCH" \
        --max-new-tokens "$MAX_NEW_TOKENS" --temperature 1.0 --top-p 1.0 \
        --advantage qrm --kl-coef "$KL_COEF" --kl-estimator full --clip-eps "$CLIP_EPS" \
        --critic-init reward --critic-lora-rank "$CRITIC_LORA_RANK" --critic-lr "$CRITIC_LR" \
        --lr "$PPO_LR" --clip-grad 0 --weight-decay 0 --ppo-epochs 1 \
        --micro-batch-size "$PPO_MICRO_BATCH" --global-batch-size "$PPO_GLOBAL_BATCH" \
        --forward-micro-batch-size "$FORWARD_MICRO_BATCH" --train-iters "$PPO_ITERS" \
        --tensor-model-parallel-size "$PPO_TP" --pipeline-model-parallel-size "$PPO_PP" "${PPO_SP[@]}" "${COMMON[@]}" \
        "${offload[@]}" "${evaluation[@]}" \
        --save "$PPO_SAVE" --save-interval 1 --log-interval 1
}

for stage in "${STAGES[@]}"; do
    "stage_$stage"
done
