"""Per-GPU memory and FLOPs of a training job, before it is queued.

Pure Python (no torch). :func:`estimate` turns a :class:`PlanInput` into a :class:`Plan`: the per-GPU
:class:`MemoryBreakdown` of the worst pipeline stage (weights, gradients, optimizer state, activations,
KV cache, logits, workspace, reserve), whether it fits the GPU, FLOPs per step, and -- through
:func:`make_plan` -- the smallest (TP, PP) layout that fits. The formulas and their derivation are in
``docs/scale-out.md``; the activation terms of the local spec are checked against the tensors autograd
actually saves on CPU (``tests/test_scaleout.py``).

Units: bytes; ``GB`` = 1e9 bytes, ``GiB`` = 2**30 bytes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_qrm.errors import UserError
from megatron_qrm.config import ModelConfig, padded_vocab_size
from megatron_qrm.planning.params import (
    LORA_TARGETS,
    SCORED_ROLES,
    StageParams,
    layer_matrix_params,
    stage_parameters,
)

#: rl/kl.py's ENTROPY_CHUNK_TOKENS (not imported: this package stays free of torch; tests/test_planning.py
#: checks they agree)
ENTROPY_CHUNK_TOKENS = 512

GiB = 1 << 30
GB = 10**9

ROLES = ("policy", "reward", "critic", "ppo", "reinforce")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int  # what CUDA reports as total memory (nvidia-smi's "Total", MiB * 2**20)
    peak_bf16_flops: float  # dense tensor-core peak
    hbm_bytes_per_s: float


GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("NVIDIA A100-SXM4-40GB", 40536 * 2**20, 312e12, 1.555e12),
    "a100-80gb": GPUSpec("NVIDIA A100-SXM4-80GB", 81920 * 2**20, 312e12, 2.039e12),
    "h100-80gb": GPUSpec("NVIDIA H100 80GB HBM3 (SXM)", 81559 * 2**20, 989e12, 3.35e12),
    "h200-141gb": GPUSpec("NVIDIA H200 (SXM)", 143771 * 2**20, 989e12, 4.8e12),
}
GPUS_PER_NODE = 8
DEFAULT_RESERVE = 3 * GiB  # CUDA context, NCCL communicators, cuBLAS workspaces, allocator slack


# ----------------------------------------------------------------------------- inputs and outputs
@dataclass
class PlanInput:
    """One job: a model, its role, the layout and the batch. ``micro_batch_size`` is in the trainer's unit:
    preference pairs for ``reward`` (two sequences each), sequences otherwise."""

    model: ModelConfig
    role: str = "reward"  # policy (SFT) | reward (train-rm) | critic | ppo | reinforce
    model_name: str = "custom"
    lora_rank: int = 0  # policy/reward/critic: 0 = full fine-tune
    lora_targets: tuple[str, ...] = LORA_TARGETS
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    num_gpus: Optional[int] = None  # default TP * PP (data-parallel size 1)
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # default: enough micro-batches to fill the pipeline
    seq_length: int = 1024
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    transformer_impl: str = "te"  # te | local
    attention: str = "auto"  # auto | flash | unfused (te, and local on a GPU: flash/SDPA; unfused: DotProductAttention)
    bf16: bool = True
    distributed_optimizer: bool = True
    fused_activation: bool = True  # fused SwiGLU (the builder enables it on a GPU)
    gpu: str = "a100-80gb"
    gpu_memory_bytes: Optional[int] = None  # overrides the GPU table
    reserve_bytes: int = DEFAULT_RESERVE
    mfu: float = 0.4  # for the time estimate only
    # --- RL (role ppo / reinforce): ``model`` is the actor
    reward_model: Optional[ModelConfig] = None  # default: the actor's architecture
    reward_model_name: Optional[str] = None
    reward_lora_rank: int = 0  # the reward model's (frozen, unmerged) adapters
    critic_model: Optional[ModelConfig] = None  # default: the reward model (--critic-init reward)
    critic_lora_rank: int = 0
    reference: bool = True  # PPO with kl_coef > 0 keeps a frozen copy of the initial actor
    offload: bool = False  # --offload: frozen models on the GPU only while they are used
    generation_batch_size: int = 64
    forward_micro_batch_size: int = 8
    prompt_length: Optional[int] = None  # prefill length (default seq_length // 2)
    rollout_batch_size: int = 3072
    samples_per_prompt: int = 1
    ppo_epochs: int = 1
    #: the actor update's entropy bonus (``--entropy-coef``): > 0 adds the entropy's gradient of the logits; 0
    #: computes the logged entropy under no_grad (either way a chunk of tokens at a time)
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"--role {self.role!r}: expected one of {', '.join(ROLES)}")
        if self.recompute not in RECOMPUTE:
            raise UserError(f"--recompute-granularity {self.recompute!r}: expected one of {', '.join(RECOMPUTE)}")
        if self.transformer_impl not in ("te", "local"):
            raise UserError(f"--transformer-impl {self.transformer_impl!r}: expected te or local")
        if self.attention not in ("auto", "flash", "unfused"):
            raise UserError(f"--attention {self.attention!r}: expected auto, flash or unfused")
        if self.num_gpus is None:
            self.num_gpus = self.tensor_parallel * self.pipeline_parallel
        if self.gpu_memory_bytes is None and self.gpu not in GPUS:
            raise UserError(f"--gpu {self.gpu!r}: expected one of {', '.join(GPUS)} (or --gpu-memory-gb)")

    # derived
    @property
    def tp(self) -> int:
        return self.tensor_parallel

    @property
    def pp(self) -> int:
        return self.pipeline_parallel

    @property
    def dp(self) -> int:
        return self.num_gpus // (self.tp * self.pp)

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def capacity(self) -> int:
        return self.gpu_memory_bytes if self.gpu_memory_bytes is not None else GPUS[self.gpu].memory_bytes

    @property
    def flash(self) -> bool:
        return self.transformer_impl == "te" or self.attention in ("auto", "flash")

    @property
    def sequences_per_micro_batch(self) -> int:
        return 2 * self.micro_batch_size if self.role == "reward" else self.micro_batch_size

    def validate_layout(self) -> None:
        """Raise ValueError (naming the flag) when this layout cannot shard the model(s)."""
        tp, pp = self.tp, self.pp
        if tp < 1 or pp < 1:
            raise UserError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.num_gpus % (tp * pp):
            raise UserError(f"--num-gpus {self.num_gpus} is not a multiple of TP {tp} x PP {pp}")
        for m in self.models().values():
            if m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp:
                raise UserError(f"TP {tp} does not divide the heads ({m.num_attention_heads}), query groups "
                                f"({m.num_query_groups}) or FFN size ({m.ffn_hidden_size})")
            if m.num_layers % pp:
                raise UserError(f"PP {pp} does not divide the {m.num_layers} layers")
        if self.global_batch_size is not None and self.role not in ("ppo", "reinforce"):
            if self.global_batch_size % (self.micro_batch_size * self.dp):
                raise UserError(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {self.dp}")

    def models(self) -> dict[str, ModelConfig]:
        if self.role == "ppo":
            rm = self.reward_model or self.model
            return {"actor": self.model, "reward": rm, "critic": self.critic_model or rm}
        if self.role == "reinforce":
            return {"actor": self.model, "reward": self.reward_model or self.model}
        return {self.role: self.model}

    def n_microbatches(self) -> Optional[int]:
        if self.global_batch_size is None:
            return None
        return max(1, self.global_batch_size // (self.micro_batch_size * self.dp))


@dataclass
class MemoryBreakdown:
    """Bytes per GPU (the worst pipeline stage, in the peak phase for RL)."""

    weights: int = 0  # every resident model's parameters (bf16: 2 B each; fp32: 4)
    grads: int = 0  # fp32 main gradients of the trainable parameters (grad_reduce_in_fp32)
    optimizer: int = 0  # Adam: fp32 master copy + 2 moments (12 B; 8 B when params are fp32), / DP if distributed
    activations: int = 0  # tensors saved for backward, all micro-batches in flight on the stage
    kv_cache: int = 0  # rollout KV cache (RL)
    logits: int = 0  # vocabulary-sized outputs (LM head logits, softmax, KL), peak
    workspace: int = 0  # transient: one layer's backward / recompute working set, attention buffers
    reserve: int = DEFAULT_RESERVE  # CUDA context, NCCL, allocator slack

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, int]:
        d = {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["total"] = int(self.total)
        return d

    def __add__(self, other: "MemoryBreakdown") -> "MemoryBreakdown":
        return MemoryBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                                  for f in dataclasses.fields(self) if f.name != "reserve"}, reserve=self.reserve)


@dataclass
class Plan:
    input: PlanInput
    memory: MemoryBreakdown
    stage: int  # the pipeline stage that needs the most memory
    phase: str  # training, or the RL phase with the peak
    flops_per_step: float
    tokens_per_step: int
    params_total: dict[str, int]  # whole-model parameters per model (padded vocabulary)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # RL: per-GPU breakdown of each phase
    notes: list[str] = field(default_factory=list)
    proposal: Optional[dict[str, Any]] = None  # smallest fitting layout (make_plan)
    min_gpus: Optional[int] = None  # fewest GPUs of this kind on which some layout fits (when this does not)

    @property
    def per_gpu_bytes(self) -> int:
        return self.memory.total

    @property
    def capacity_bytes(self) -> int:
        return self.input.capacity

    @property
    def fits(self) -> bool:
        return self.per_gpu_bytes <= self.capacity_bytes

    def seconds_per_step(self) -> Optional[float]:
        """Training roles only: RL iterations are dominated by decoding, which memory bandwidth bounds."""
        peak = GPUS[self.input.gpu].peak_bf16_flops if self.input.gpu in GPUS else None
        if not peak or not self.flops_per_step or self.input.role in ("ppo", "reinforce"):
            return None
        return self.flops_per_step / (self.input.num_gpus * peak * self.input.mfu)

    def to_dict(self) -> dict[str, Any]:
        i = self.input
        return {
            "fits": self.fits,
            "per_gpu_bytes": int(self.per_gpu_bytes),
            "per_gpu_gib": round(self.per_gpu_bytes / GiB, 2),
            "gpu_memory_bytes": int(self.capacity_bytes),
            "gpu": i.gpu,
            "model": i.model_name,
            "role": i.role,
            "layout": {"tensor_model_parallel_size": i.tp, "pipeline_model_parallel_size": i.pp,
                       "data_parallel_size": i.dp, "num_gpus": i.num_gpus, "sequence_parallel": i.sp},
            "micro_batch_size": i.micro_batch_size,
            "global_batch_size": i.global_batch_size,
            "seq_length": i.seq_length,
            "recompute_granularity": i.recompute,
            "transformer_impl": i.transformer_impl,
            "attention": "flash" if i.flash else "unfused",
            "lora_rank": i.lora_rank,
            "dtype": "bf16" if i.bf16 else "fp32",
            "distributed_optimizer": i.distributed_optimizer,
            "memory": self.memory.to_dict(),
            "stage": self.stage,
            "phase": self.phase,
            "phases": self.phases,
            "params": self.params_total,
            "flops_per_step": self.flops_per_step,
            "tokens_per_step": self.tokens_per_step,
            "seconds_per_step_at_mfu": self.seconds_per_step(),
            "mfu_assumed": i.mfu,
            "notes": self.notes,
            "proposal": self.proposal,
            "min_gpus": self.min_gpus,
        }


# ----------------------------------------------------------------------------- activations
def layer_activation_bytes_per_token(m: ModelConfig, i: PlanInput, *, lora_rank: int = 0,
                                     recompute: Optional[str] = None) -> float:
    """Bytes one transformer layer keeps for backward, per token of a micro-batch (training).

    Element counts per token (e = bytes per activation element, t = TP; "R" terms are replicated over TP
    unless sequence parallelism splits them, "T" terms are split over TP):

    * norms (R): local spec (torch RMSNorm) keeps input, ``x * rstd`` and the output for each of the two
      norms: ``6h`` (``4h`` when the norms are frozen, as under LoRA); TE's fused LayerNormLinear keeps
      input and normalised output: ``4h``;
    * attention (T): flash / SDPA / TE keep Q (h), K after RoPE (kv), the fused QKV output that V is a view of
      (h + 2kv) and the output (h): ``3h + 3kv`` (+ fp32 log-sum-exp, ``4a`` bytes); megatron's unfused
      DotProductAttention keeps Q, K and V expanded to every head, the output (``4h``) and the softmax
      ``a * s`` in fp32 (4 B; bf16 adds its bf16 copy: 6 B);
    * MLP (T): fc1's output (2f) and fc2's input (f) with the fused SwiGLU: ``3f``; the project's SwiGLU
      function (CPU, ``cpu/swiglu.py``) also keeps ``silu(gate)``: ``4f``;
    * LoRA: each adapter keeps its rank-r intermediate: ``4r`` per token, not split (TE: the adapters of qkv
      and fc1 re-normalise their input in fp32: + ``2 * (8h/t_sp + e*h)`` bytes);
    * selective recompute: the unfused core's saved tensors become the checkpoint inputs (``3h + 3kv``);
      a flash core is unchanged; full recompute: the layer input only (``h``, R).
    """
    e = i.act_bytes
    t = i.tp
    sp_div = t if i.sp else 1
    h, a = m.hidden_size, m.num_attention_heads
    kv = m.num_query_groups * m.kv_channels
    f = m.ffn_hidden_size
    recompute = recompute if recompute is not None else i.recompute
    if recompute == "full":
        return h * e / sp_div
    # local spec: torch RMSNorm keeps x * rstd only to form its weight's gradient: not for a frozen norm (LoRA)
    norms = (4 if i.transformer_impl == "te" or lora_rank > 0 else 6) * h * e
    if i.flash or recompute == "selective":
        attn = (3 * h + 3 * kv) * e + (4 * a if i.flash else 0)
    else:
        softmax_bytes = 4 if e == 4 else 6
        attn = 4 * h * e + a * i.seq_length * softmax_bytes
    mlp = (3 if i.fused_activation else 4) * f * e
    total = norms / sp_div + (attn + mlp) / t
    if lora_rank > 0:
        total += 4 * lora_rank * e
        if i.transformer_impl == "te":
            total += 2 * (8 * h / sp_div + e * h)
    return total


def final_activation_bytes_per_token(m: ModelConfig, i: PlanInput, role: str) -> float:
    """Last stage, outside the layers: the final norm (R) and the head's input; the vocabulary-sized terms
    are in :func:`logits_bytes_per_token`."""
    e = i.act_bytes
    sp_div = i.tp if i.sp else 1
    return (2 if i.transformer_impl == "te" else 3) * m.hidden_size * e / sp_div


def logits_bytes_per_token(m: ModelConfig, i: PlanInput, role: str) -> float:
    """Policy head, per token: the logits the model outputs (e), the one fp32 copy megatron-core's
    vocab-parallel cross-entropy works on and keeps (4 B: its softmax, which backward turns into the gradient
    in place; :func:`megatron_qrm.models.logits.next_token_nll`) and, at the backward peak, the logits'
    gradient (e): ``(4 + 2e) V / t``. The RL update computes these on the packed stream (no gathered
    ``[N, S, V/t]`` copy, rl/update_batching.py); an entropy bonus (``entropy_coef > 0``) keeps nothing of
    vocabulary size for backward (its backward recomputes the softmax a chunk at a time, rl/kl.py) but adds its
    own gradient of the logits before autograd sums the two: ``+ e V / t``.
    Reward/critic heads: negligible."""
    if role in SCORED_ROLES:
        return 0.0
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, i.tp)
    entropy = i.act_bytes if role == "policy" and i.role in ("ppo", "reinforce") and i.entropy_coef > 0 else 0
    return (4 + 2 * i.act_bytes + entropy) * vocab / i.tp


def training_activations(m: ModelConfig, i: PlanInput, role: str, lora_rank: int, stage: int,
                         sequences: int) -> tuple[float, float, float]:
    """(activations, logits, workspace) bytes of ``stage`` for a training step with ``sequences`` per
    micro-batch. 1F1B keeps ``min(PP - stage, micro-batches)`` micro-batches in flight on a stage."""
    pp = i.pp
    layers = m.num_layers // pp
    tokens = sequences * i.seq_length
    n_micro = i.n_microbatches()
    in_flight = pp - stage if n_micro is None else min(pp - stage, n_micro)
    per_layer = layer_activation_bytes_per_token(m, i, lora_rank=lora_rank)
    acts = in_flight * layers * per_layer * tokens
    last = stage == pp - 1
    logits = 0.0
    if last:
        acts += final_activation_bytes_per_token(m, i, role) * tokens
        logits = logits_bytes_per_token(m, i, role) * tokens
    # workspace: the gradient of one layer's activations while it runs backward (about the size of what it
    # saved), plus -- under full recompute -- that layer's recomputed activations
    one_layer = layer_activation_bytes_per_token(m, i, lora_rank=lora_rank, recompute="none") * tokens
    workspace = one_layer * (2 if i.recompute == "full" else 1)
    if last and role == "policy" and i.role in ("ppo", "reinforce"):
        # the entropy (logged, or a bonus whose backward recomputes): 2 fp32 temporaries (+ a bool mask) of one
        # chunk of tokens at a time (rl/kl.py)
        vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, i.tp)
        workspace = max(workspace, 9 * min(ENTROPY_CHUNK_TOKENS, tokens) * vocab / i.tp)
    if not i.flash and i.recompute != "selective":
        # megatron's global buffer for the [b*a/t, s, s] scores of the unfused attention
        workspace += sequences * (m.num_attention_heads // i.tp) * i.seq_length ** 2 * i.act_bytes
    return acts, logits, workspace


def _forward_workspace(m: ModelConfig, i: PlanInput, tokens: int) -> float:
    """Transient working set of one layer in a no-grad forward: QKV out, attention out, fc1 out, fc2 in."""
    kv = m.num_query_groups * m.kv_channels
    h, f = m.hidden_size, m.ffn_hidden_size
    return (2 * h + 2 * kv + 3 * f + 2 * h) * i.act_bytes / i.tp * tokens


# ----------------------------------------------------------------------------- static state
def state_bytes(p: StageParams, i: PlanInput) -> MemoryBreakdown:
    """Weights, fp32 main grads and Adam state of one model on one GPU."""
    w = p.total * i.act_bytes
    grads = p.trainable * 4
    per_param_opt = 12 if i.bf16 else 8  # fp32 master + exp_avg + exp_avg_sq (no master copy in fp32)
    opt = p.trainable * per_param_opt / (i.dp if i.distributed_optimizer else 1)
    return MemoryBreakdown(weights=int(w), grads=int(grads), optimizer=int(math.ceil(opt)), reserve=0)


# ----------------------------------------------------------------------------- FLOPs
def forward_flops_per_token(m: ModelConfig, role: str, seq: int) -> float:
    """2 FLOPs per multiply-add of every matmul weight (layers + LM head for a policy) plus attention
    scores and the weighted sum, 2 * 2 * s * h per layer (full s x s, Megatron's convention)."""
    vocab_head = 0 if role in SCORED_ROLES else m.vocab_size * m.hidden_size
    weights = m.num_layers * layer_matrix_params(m) + vocab_head
    attn = m.num_layers * 4 * seq * m.num_attention_heads * m.kv_channels
    return 2 * weights + attn


def training_flops_per_token(m: ModelConfig, role: str, seq: int, lora_rank: int, full: bool) -> float:
    """Forward + backward: input gradients always (2x forward), weight gradients only for trained weights
    (full fine-tune: 3x forward; LoRA: the frozen base costs 2x forward, the adapters 6 FLOPs/param)."""
    fwd = forward_flops_per_token(m, role, seq)
    if lora_rank <= 0 and full:
        return 3 * fwd
    split, repl = (0, 0)
    if lora_rank > 0:
        from megatron_qrm.planning.params import lora_layer_params

        split, repl = lora_layer_params(m, lora_rank)
    return 2 * fwd + 6 * m.num_layers * (split + repl)


# ----------------------------------------------------------------------------- single-model training
def _train_plan(i: PlanInput) -> Plan:
    m, role = i.model, i.role
    seqs = i.sequences_per_micro_batch
    best: Optional[tuple[int, MemoryBreakdown]] = None
    for stage in range(i.pp):
        p = stage_parameters(m, role, i.tp, i.pp, stage, i.lora_rank, i.lora_targets)
        mem = state_bytes(p, i)
        acts, logits, work = training_activations(m, i, role, i.lora_rank, stage, seqs)
        mem = MemoryBreakdown(weights=mem.weights, grads=mem.grads, optimizer=mem.optimizer, activations=int(acts),
                              logits=int(logits), workspace=int(work), reserve=i.reserve_bytes)
        if best is None or mem.total > best[1].total:
            best = (stage, mem)
    stage, mem = best
    n_micro = i.n_microbatches() or i.pp
    gbs = i.global_batch_size or i.micro_batch_size * i.dp * n_micro
    tokens = gbs * (2 if role == "reward" else 1) * i.seq_length
    flops = tokens * training_flops_per_token(m, role, i.seq_length, i.lora_rank, full=True)
    notes = []
    if i.global_batch_size is None and i.pp > 1:
        notes.append(f"no --global-batch-size: assumed >= {i.pp} micro-batches per step (the first stage "
                     f"holds {i.pp} in flight)")
    plan = Plan(i, mem, stage, "training", flops, tokens,
                params_total={role: _params_all_gpus(m, role, i)}, notes=notes)
    return plan


def _params_all_gpus(m: ModelConfig, role: str, i: PlanInput, lora_rank: Optional[int] = None) -> int:
    """Whole-model parameters as laid out (padded vocabulary, LoRA counted once)."""
    r = i.lora_rank if lora_rank is None else lora_rank
    p1 = [stage_parameters(m, role, 1, i.pp, s, r) for s in range(i.pp)]
    return sum(p.total for p in p1)


# ----------------------------------------------------------------------------- RL
def _rl_plan(i: PlanInput) -> Plan:
    """PPO: actor (full fine-tune) + critic (trained, LoRA optional) + frozen reference + frozen reward model;
    REINFORCE: actor + reward model. All share one TP/PP layout (as ``qrm train-ppo``).

    Phases of an iteration and what is resident in each (worst pipeline stage):
    ``startup`` (the trainer builds every model on the GPU before the first offload), ``rollout``
    (KV cache, prefill logits), ``scoring`` (no-grad forwards; actor + reference logits for the full KL),
    ``actor_update`` and ``critic_update`` (training activations). Trained models keep weights, grads and
    optimizer state resident throughout; with ``--offload`` a frozen model is resident only while used.
    """
    ppo = i.role == "ppo"
    actor_m = i.model
    rm_m = i.reward_model or i.model
    critic_m = i.critic_model or rm_m
    e = i.act_bytes
    phases: dict[str, tuple[int, MemoryBreakdown]] = {}
    notes: list[str] = []
    seq = i.seq_length
    prompt = i.prompt_length or seq // 2
    for stage in range(i.pp):
        actor = stage_parameters(actor_m, "policy", i.tp, i.pp, stage, 0)
        actor_state = state_bytes(actor, i)
        ref_w = stage_parameters(actor_m, "policy", i.tp, i.pp, stage, 0, trainable=False).total * e \
            if ppo and i.reference else 0
        rm_w = stage_parameters(rm_m, "reward", i.tp, i.pp, stage, i.reward_lora_rank, trainable=False).total * e
        critic_state = MemoryBreakdown(reserve=0)
        if ppo:
            critic = stage_parameters(critic_m, "critic", i.tp, i.pp, stage, i.critic_lora_rank)
            critic_state = state_bytes(critic, i)
        static = actor_state + critic_state
        frozen_all = ref_w + rm_w
        last = stage == i.pp - 1
        vocab = padded_vocab_size(actor_m.vocab_size, actor_m.make_vocab_size_divisible_by, i.tp)

        def with_(extra_weights: int = 0, **kw) -> MemoryBreakdown:
            mem = MemoryBreakdown(weights=static.weights + extra_weights, grads=static.grads,
                                  optimizer=static.optimizer, reserve=i.reserve_bytes)
            for k, v in kw.items():
                setattr(mem, k, int(getattr(mem, k) + v))
            return mem

        # startup: every model built on the GPU; fp32 master copies exist, Adam moments not yet
        master = (4 if i.bf16 else 0) / (i.dp if i.distributed_optimizer else 1)
        startup = MemoryBreakdown(weights=static.weights + frozen_all, grads=static.grads,
                                  optimizer=int((actor.trainable + (critic.trainable if ppo else 0)) * master),
                                  reserve=i.reserve_bytes)
        resident_frozen = 0 if i.offload else frozen_all
        # rollout: KV cache of the generation batch over the full length; the static inference context
        # materialises only the last position's logits, gathered over TP (full vocabulary, then fp32 copies
        # for sampling and log-probs); one layer's prefill working set
        b = i.generation_batch_size
        layers = actor_m.num_layers // i.pp
        kv_heads = max(actor_m.num_query_groups // i.tp, 1)
        kv = 2 * layers * kv_heads * actor_m.kv_channels * seq * b * e
        prefill_logits = b * vocab * (e + 3 * 4) if last else 0
        rollout = with_(resident_frozen, kv_cache=kv, logits=prefill_logits,
                        workspace=_forward_workspace(actor_m, i, b * prompt))
        # scoring: no-grad forwards of forward_micro_batch_size sequences; the full KL holds actor and
        # reference logits with fp32 working copies
        fb = i.forward_micro_batch_size
        score_logits = fb * seq * vocab / i.tp * (2 * e + 12) if last else 0
        score_work = max(_forward_workspace(mm, i, fb * seq) for mm in (actor_m, rm_m, critic_m))
        scoring_frozen = max(ref_w, rm_w) if i.offload else frozen_all
        scoring = with_(scoring_frozen, logits=score_logits, workspace=score_work)
        # updates
        a_acts, a_logits, a_work = training_activations(actor_m, i, "policy", 0, stage, i.micro_batch_size)
        actor_update = with_(resident_frozen, activations=a_acts, logits=a_logits, workspace=a_work)
        stage_phases = {"startup": startup, "rollout": rollout, "scoring": scoring, "actor_update": actor_update}
        if ppo:
            c_acts, c_logits, c_work = training_activations(critic_m, i, "critic", i.critic_lora_rank, stage,
                                                            i.micro_batch_size)
            stage_phases["critic_update"] = with_(resident_frozen, activations=c_acts, logits=c_logits,
                                                  workspace=c_work)
        for name, mem in stage_phases.items():
            if name not in phases or mem.total > phases[name][1].total:
                phases[name] = (stage, mem)
    peak_phase = max(phases, key=lambda k: phases[k][1].total)
    stage, mem = phases[peak_phase]
    if i.offload and peak_phase == "startup":
        notes.append("peak at start-up: qrm train-ppo builds every model on the GPU before --offload first "
                     "moves the frozen ones off")
    if i.offload:
        notes.append("with --offload the frozen models are copied host<->GPU every iteration")

    # FLOPs of one iteration (rollout batch of sequences of seq tokens, prompts of `prompt` tokens)
    n_seq = i.rollout_batch_size * i.samples_per_prompt
    gen = seq - prompt
    ctx = (prompt + seq) / 2
    f_actor_gen = forward_flops_per_token(actor_m, "policy", int(ctx))
    flops = n_seq * (prompt * forward_flops_per_token(actor_m, "policy", prompt) + gen * f_actor_gen)
    score_models = [(actor_m, "policy"), (rm_m, "reward")] + ([(actor_m, "policy")] if ppo and i.reference else [])
    if ppo:
        score_models.append((critic_m, "critic"))
    flops += n_seq * seq * sum(forward_flops_per_token(mm, r, seq) for mm, r in score_models)
    flops += i.ppo_epochs * n_seq * seq * training_flops_per_token(actor_m, "policy", seq, 0, full=True)
    if ppo:
        flops += i.ppo_epochs * n_seq * seq * training_flops_per_token(critic_m, "critic", seq, i.critic_lora_rank,
                                                                       full=True)
    params = {"actor": _params_all_gpus(actor_m, "policy", i, 0),
              "reward": _params_all_gpus(rm_m, "reward", i, i.reward_lora_rank)}
    if ppo:
        params["critic"] = _params_all_gpus(critic_m, "critic", i, i.critic_lora_rank)
        if i.reference:
            params["reference"] = params["actor"]
    return Plan(i, mem, stage, peak_phase, flops, n_seq * seq, params_total=params,
                phases={k: dict(v[1].to_dict(), stage=v[0]) for k, v in phases.items()}, notes=notes)


# ----------------------------------------------------------------------------- entry points
def estimate(i: PlanInput) -> Plan:
    """The memory/FLOPs estimate of exactly this layout (no search)."""
    i.validate_layout()
    return _rl_plan(i) if i.role in ("ppo", "reinforce") else _train_plan(i)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(i: PlanInput, num_gpus: Optional[int] = None) -> list[tuple[int, int]]:
    """(TP, PP) with TP in {1, 2, 4, 8}, PP dividing every model's layers, TP*PP dividing the GPU count and
    the model's heads / groups / FFN divisible by TP; ordered by TP*PP, then PP (fewer pipeline bubbles)."""
    n = num_gpus or i.num_gpus
    models = list(i.models().values())
    out = []
    for tp in (1, 2, 4, 8):
        if any(m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp for m in models):
            continue
        layers = math.gcd(*[m.num_layers for m in models]) if len(models) > 1 else models[0].num_layers
        for pp in _divisors(layers):
            if tp * pp <= n and n % (tp * pp) == 0:
                out.append((tp, pp))
    return sorted(out, key=lambda x: (x[0] * x[1], x[1]))


def _with_layout(i: PlanInput, tp: int, pp: int, num_gpus: Optional[int] = None, **kw) -> PlanInput:
    j = dataclasses.replace(i, tensor_parallel=tp, pipeline_parallel=pp,
                            num_gpus=num_gpus if num_gpus is not None else i.num_gpus, **kw)
    if j.global_batch_size is not None and j.role not in ("ppo", "reinforce"):
        unit = j.micro_batch_size * j.dp
        if j.global_batch_size % unit:  # keep the global batch a multiple of micro x DP
            j.global_batch_size = unit * max(1, round(j.global_batch_size / unit))
    return j


def smallest_fitting_layout(i: PlanInput, num_gpus: Optional[int] = None) -> Optional[Plan]:
    for tp, pp in candidate_layouts(i, num_gpus):
        try:
            p = estimate(_with_layout(i, tp, pp, num_gpus))
        except ValueError:
            continue
        if p.fits:
            return p
    return None


def make_plan(i: PlanInput, search: bool = True, max_gpus: int = 4096) -> Plan:
    """:func:`estimate` plus the smallest fitting layout on ``num_gpus`` GPUs (``plan.proposal``); when nothing
    fits there as given, the same with full recomputation (and sequence parallelism); when nothing fits on
    ``num_gpus`` GPUs at all, the fewest GPUs (whole nodes of 8 beyond 4) on which some layout fits
    (``plan.min_gpus``, and the proposal is that layout)."""
    plan = estimate(i)
    if not search:
        return plan
    found = smallest_fitting_layout(i)
    how = "same batch and recomputation"
    if found is None and (i.recompute != "full" or not i.sequence_parallel):
        found = smallest_fitting_layout(dataclasses.replace(i, recompute="full", sequence_parallel=True))
        how = "with --recompute-granularity full --sequence-parallel"
    if found is not None:
        plan.proposal = _proposal(found, how)
    else:  # nothing fits on these GPUs: the fewest GPUs (whole nodes beyond 4) on which something does
        for n in [g for g in (1, 2, 4) if g > i.num_gpus] + list(range(GPUS_PER_NODE, max_gpus + 1, GPUS_PER_NODE)):
            if n <= i.num_gpus:
                continue
            p = smallest_fitting_layout(i, n) or smallest_fitting_layout(
                dataclasses.replace(i, recompute="full", sequence_parallel=True), n)
            if p is not None:
                plan.min_gpus = n
                plan.proposal = _proposal(p, f"on {n} GPUs" + (
                    " with --recompute-granularity full --sequence-parallel" if p.input.recompute == "full"
                    and i.recompute != "full" else ""))
                break
    return plan


def _proposal(p: Plan, how: str) -> dict[str, Any]:
    j = p.input
    return {"tensor_model_parallel_size": j.tp, "pipeline_model_parallel_size": j.pp, "data_parallel_size": j.dp,
            "num_gpus": j.num_gpus, "recompute_granularity": j.recompute, "sequence_parallel": j.sp,
            "per_gpu_bytes": int(p.per_gpu_bytes), "per_gpu_gib": round(p.per_gpu_bytes / GiB, 2), "how": how}


def format_plan(plan: Plan) -> str:
    """Human-readable report."""
    i = plan.input
    m = plan.memory
    lines = []
    mdl = i.model_name + (f" + reward {i.reward_model_name}" if i.role in ("ppo", "reinforce") and
                          i.reward_model_name else "")
    lines.append(f"qrm plan: {mdl}, role {i.role}" + (f", LoRA r={i.lora_rank}" if i.lora_rank else "") +
                 f", {'bf16' if i.bf16 else 'fp32'}, seq {i.seq_length}, micro-batch {i.micro_batch_size}"
                 + (f", global batch {i.global_batch_size}" if i.global_batch_size else ""))
    lines.append(f"layout: TP={i.tp} PP={i.pp} DP={i.dp} on {i.num_gpus} x {i.gpu} "
                 f"({plan.capacity_bytes / GiB:.1f} GiB each); SP={'on' if i.sp else 'off'}, recompute={i.recompute}, "
                 f"{i.transformer_impl} spec, {'flash' if i.flash else 'unfused'} attention, "
                 f"{'distributed' if i.distributed_optimizer else 'replicated'} optimizer")
    lines.append("parameters: " + ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in plan.params_total.items()))
    where = f"pipeline stage {plan.stage}" + (f", phase {plan.phase}" if plan.phase != "training" else "")
    lines.append(f"per-GPU memory ({where}):")
    for name, v in m.to_dict().items():
        if name == "total":
            continue
        lines.append(f"  {name:<12}{v / GiB:>9.2f} GiB  {v / GB:>8.2f} GB")
    lines.append(f"  {'total':<12}{m.total / GiB:>9.2f} GiB  {m.total / GB:>8.2f} GB   "
                 f"of {plan.capacity_bytes / GiB:.1f} GiB -> {'FITS' if plan.fits else 'DOES NOT FIT'}")
    if plan.phases:
        lines.append("  RL phases: " + ", ".join(f"{k} {v['total'] / GiB:.1f} GiB" for k, v in plan.phases.items()))
    t = plan.seconds_per_step()
    lines.append(f"FLOPs per {'iteration' if i.role in ('ppo', 'reinforce') else 'step'}: "
                 f"{plan.flops_per_step:.3e} ({plan.tokens_per_step:,} tokens)"
                 + (f"; ~{t:.1f} s at {i.mfu:.0%} MFU" if t else ""))
    for n in plan.notes:
        lines.append(f"note: {n}")
    if plan.proposal:
        p = plan.proposal
        lines.append(f"smallest layout that fits ({p['how']}): TP={p['tensor_model_parallel_size']} "
                     f"PP={p['pipeline_model_parallel_size']} DP={p['data_parallel_size']} on {p['num_gpus']} GPUs, "
                     f"recompute={p['recompute_granularity']}, SP={'on' if p['sequence_parallel'] else 'off'}: "
                     f"{p['per_gpu_gib']:.1f} GiB per GPU")
    elif not plan.fits:
        lines.append("no layout fits on at most 4096 GPUs of this kind")
    if not plan.fits and plan.min_gpus:
        lines.append(f"fewest {i.gpu} GPUs on which a layout fits: {plan.min_gpus}")
    return "\n".join(lines)
