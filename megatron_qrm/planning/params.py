"""Parameter counts of a Llama/Qwen-style decoder: whole model (as published) and per GPU of a TP/PP layout.

Pure Python: no torch import. Shapes follow megatron-core's GPTModel as :mod:`megatron_qrm.models.builder`
builds it (the derivation is in ``docs/scale-out.md``):

* embedding ``V x h`` (vocabulary padded to a multiple of ``128 * TP`` per GPU, split over TP), first stage;
* per layer: ``linear_qkv`` ``h x (q + 2 kv)`` (+ bias ``q + 2 kv`` for Qwen2), ``linear_proj`` ``q x h``,
  ``linear_fc1`` ``h x 2f`` (SwiGLU gate and up), ``linear_fc2`` ``f x h``, all split over TP; two RMSNorm
  weights ``h`` replicated on every TP rank; ``q = heads * d``, ``kv = groups * d``, ``d = h / heads``;
* final RMSNorm ``h`` and the head on the last stage: the untied LM head ``V x h`` (policy), nothing extra
  for a tied head when PP = 1 (megatron keeps a copy on the last stage when PP > 1), or the token head
  ``h -> 1`` (reward / critic, replicated over TP);
* LoRA adapters (rank r) on qkv, proj, fc1, fc2, sharded like the layer they adapt
  (:mod:`megatron_qrm.models.lora`): column-parallel target ``A [r, in]`` replicated + ``B [out/TP, r]``;
  row-parallel target ``A [r, in/TP]`` + ``B [out, r]`` replicated.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qrm.errors import UserError
from megatron_qrm.config import ModelConfig, padded_vocab_size

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
SCORED_ROLES = ("reward", "critic")


def _dims(m: ModelConfig) -> tuple[int, int, int, int]:
    d = m.kv_channels
    return m.hidden_size, m.num_attention_heads * d, m.num_query_groups * d, m.ffn_hidden_size


def layer_matrix_params(m: ModelConfig) -> int:
    """Weights (and Qwen2's qkv bias) of one layer's four linears, unsplit."""
    h, q, kv, f = _dims(m)
    qkv = h * (q + 2 * kv) + ((q + 2 * kv) if m.qkv_bias else 0)
    return qkv + q * h + h * 2 * f + f * h


def layer_params(m: ModelConfig) -> int:
    """One transformer layer, unsplit: the linears plus its two RMSNorm weights."""
    return layer_matrix_params(m) + 2 * m.hidden_size


def head_params(m: ModelConfig, role: str, vocab: int) -> int:
    """Parameters of the output head, unsplit (0 for a tied LM head)."""
    if role in SCORED_ROLES:
        return m.hidden_size  # token head h -> 1, no bias
    return 0 if m.tie_word_embeddings else vocab * m.hidden_size


def total_parameters(m: ModelConfig, role: str = "policy") -> int:
    """All parameters with the published (unpadded) vocabulary: the number model cards quote for
    ``role="policy"`` (Llama-3-8B 8.03B, Llama-3-70B 70.55B, Qwen2.5-7B 7.62B)."""
    v = m.vocab_size
    return v * m.hidden_size + m.num_layers * layer_params(m) + m.hidden_size + head_params(m, role, v)


def lora_layer_params(m: ModelConfig, rank: int, tp: int = 1, targets=LORA_TARGETS) -> tuple[int, int]:
    """(TP-split, TP-replicated) LoRA parameters of one layer on one TP rank (split part already / tp)."""
    if rank <= 0:
        return 0, 0
    h, q, kv, f = _dims(m)
    split = repl = 0
    if "qkv" in targets:  # column: A [r, h] replicated, B [(q + 2kv)/tp, r]
        repl += rank * h
        split += (q + 2 * kv) * rank // tp
    if "proj" in targets:  # row: A [r, q/tp], B [h, r] replicated
        split += rank * q // tp
        repl += h * rank
    if "fc1" in targets:  # column: A [r, h], B [2f/tp, r]
        repl += rank * h
        split += 2 * f * rank // tp
    if "fc2" in targets:  # row: A [r, f/tp], B [h, r]
        split += rank * f // tp
        repl += h * rank
    return split, repl


@dataclass(frozen=True)
class StageParams:
    """Parameters held by ONE GPU of pipeline stage ``stage`` (TP rank of a TP group)."""

    stage: int
    layers: int
    total: int  # every parameter on this GPU (frozen + trainable)
    trainable: int
    lora: int  # LoRA adapter parameters among ``total``


def stage_parameters(m: ModelConfig, role: str, tp: int, pp: int, stage: int, lora_rank: int = 0,
                     lora_targets=LORA_TARGETS, trainable: bool = True) -> StageParams:
    """Per-GPU parameters of one pipeline stage. ``trainable=False`` marks a frozen model (RL reference,
    reward model); otherwise a LoRA model trains its adapters (+ the token head), a full model everything."""
    if m.num_layers % pp:
        raise UserError(f"--pipeline-model-parallel-size {pp} does not divide the {m.num_layers} layers")
    h = m.hidden_size
    layers = m.num_layers // pp
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    per_layer = layer_matrix_params(m) // tp + 2 * h
    total = layers * per_layer
    first, last = stage == 0, stage == pp - 1
    head = 0
    if first:
        total += vocab * h // tp
    if last:
        total += h  # final norm
        if role in SCORED_ROLES:
            head = h
        elif not m.tie_word_embeddings or pp > 1:
            head = vocab * h // tp
        total += head
    split, repl = lora_layer_params(m, lora_rank, tp, lora_targets)
    lora = layers * (split + repl)
    total += lora
    if not trainable:
        train = 0
    elif lora_rank > 0:
        train = lora + (head if role in SCORED_ROLES and last else 0)
    else:
        train = total
    return StageParams(stage, layers, total, train, lora)
