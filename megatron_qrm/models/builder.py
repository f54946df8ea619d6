"""One builder for every model role.

* ``policy``: GPTModel with its LM head (logits over the padded vocabulary, vocab-parallel).
* ``reward`` / ``critic``: the same backbone with a :class:`TokenHead` (hidden -> 1) in place of the
  output layer; present only on the last pipeline stage, replicated across TP.

The layer spec is Transformer Engine's when TE imports and CUDA is present, megatron-core's local
spec otherwise; the choice and its reason are logged (once per process and choice). The local spec's core
attention is :class:`~megatron_qrm.models.attention.SDPAttention` (fused ``scaled_dot_product_attention``:
no ``s x s`` matrix, no K/V copied per query head under GQA) on every device, for training and inference;
megatron-core's ``DotProductAttention`` stays selectable (``local_attention="unfused"``,
``--local-attention unfused``) for parity tests. On a CPU run the local spec gets the CPU kernels
(:mod:`megatron_qrm.models.backend`, the one place the GPU path meets :mod:`megatron_qrm.cpu`; docs/gpu.md).
Activation recomputation (``recompute_granularity`` full/selective) is passed to megatron-core.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_qrm.errors import UserError
from megatron_qrm.config import ROLES, ModelConfig, padded_vocab_size
from megatron_qrm.models import backend
from megatron_qrm.models.lora import LoRAConfig, apply_lora
from megatron_qrm.models.token_head import TokenHead

log = logging.getLogger("megatron_qrm")


@dataclass
class PrecisionConfig:
    bf16: bool = False

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


def transformer_impl_available() -> tuple[bool, str]:
    """Whether the Transformer Engine spec can be used here, and why (logged)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:  # a partial TE install raises RuntimeError/OSError, not only ImportError
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401  (loads TE's CUDA libraries)
        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401
        from megatron.core.models.gpt import gpt_layer_specs
    except Exception as e:  # noqa: BLE001
        return False, f"transformer_engine not importable ({type(e).__name__}: {e})"
    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        return False, "megatron-core did not load its Transformer Engine spec (gpt_layer_specs.HAVE_TE is False)"
    return True, "transformer_engine importable and CUDA present"


def layer_spec(transformer_impl: str = "auto", local_attention: str = "auto"):
    """The transformer layer spec: 'te', 'local', or 'auto' (TE when available).

    ``local_attention`` (local spec only): 'sdpa' (:class:`SDPAttention`), 'unfused' (megatron-core's
    DotProductAttention), or 'auto' (= sdpa, on every device).
    """
    use_te, reason = transformer_impl_available()
    if transformer_impl == "te" and not use_te:
        raise RuntimeError(f"--transformer-impl te requested but unavailable: {reason}")
    if transformer_impl == "local":
        use_te, reason = False, "--transformer-impl local"
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        _log_once("layer spec: Transformer Engine (%s)", reason)
        return get_gpt_layer_with_transformer_engine_spec(), "te"
    if local_attention not in ("auto", "sdpa", "unfused"):
        raise ValueError(f"local attention {local_attention!r}: expected auto, sdpa or unfused")
    sdpa = local_attention in ("auto", "sdpa")
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if sdpa:
        from megatron_qrm.models.attention import with_sdpa_attention

        spec = with_sdpa_attention(spec)
    _log_once("layer spec: megatron-core local, %s attention (%s)",
              "SDPA" if sdpa else "unfused DotProductAttention", reason)
    return spec, "local"


_LOGGED: set = set()


def _log_once(fmt: str, *args) -> None:
    """``log.info`` a message the first time this process builds a model with it (every role logs it otherwise)."""
    msg = fmt % args
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def transformer_config(model: ModelConfig, precision: PrecisionConfig, *, sequence_parallel: bool = False,
                       calculate_per_token_loss: bool = True, recompute_granularity: str | None = None,
                       recompute_num_layers: int = 1) -> TransformerConfig:
    """``recompute_granularity``: None, 'selective' (the attention core is recomputed in backward) or
    'full' (every layer keeps only its input; ``recompute_num_layers`` layers per uniform chunk)."""
    on_cpu = backend.is_cpu_run()  # CPU kernels instead of the fused CUDA ones (models/backend.py)
    if recompute_granularity not in (None, "none", "selective", "full"):
        raise UserError(f"--recompute-granularity {recompute_granularity!r}: expected full or selective")
    recompute = None if recompute_granularity in (None, "none") else recompute_granularity
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        bf16=precision.bf16,
        params_dtype=precision.params_dtype,
        pipeline_dtype=precision.params_dtype,
        autocast_dtype=precision.params_dtype,
        # micro-batches are padded to their own longest sequence, so PP stages exchange shapes.
        variable_seq_lengths=pp > 1,
        moe_token_dispatcher_type="alltoall",  # (dense model) the default one rejects variable_seq_lengths
        calculate_per_token_loss=calculate_per_token_loss,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        # fused kernels that need CUDA/apex
        bias_dropout_fusion=not on_cpu,
        bias_activation_fusion=not on_cpu,  # fused SwiGLU: keeps only fc1's output for backward (3f, not 5f)
        masked_softmax_fusion=not on_cpu,
        # apex's persistent LayerNorm kernel; megatron-core's torch-norm fallback (no apex) asserts it is off
        persist_layer_norm=not on_cpu and _have_apex_norm(),
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=recompute_num_layers if recompute == "full" else None,
    )


def build_model(model: ModelConfig, role: str, *, precision: PrecisionConfig | None = None,
                lora: LoRAConfig | None = None, sequence_parallel: bool = False,
                transformer_impl: str = "auto", seed: int = 1234, recompute_granularity: str | None = None,
                recompute_num_layers: int = 1, local_attention: str = "auto") -> GPTModel:
    """Build this rank's pipeline stage of a model for ``role`` (see module docstring).

    Parameters are created on the current device. With LoRA, base weights are frozen and only the
    adapters (and, for reward/critic, the token head) train.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    precision = precision or PrecisionConfig()
    tcfg = transformer_config(model, precision, sequence_parallel=sequence_parallel,
                              recompute_granularity=recompute_granularity, recompute_num_layers=recompute_num_layers)
    spec, impl = layer_spec(transformer_impl, local_attention)
    if impl == "local" and not tcfg.bias_activation_fusion:
        # CPU run (no fused SwiGLU kernel): the CPU kernels' spec (models/backend.py is where the paths part)
        spec = backend.cpu_layer_spec(spec, tcfg)
    if tcfg.sequence_parallel and impl == "local" and not _have_apex_norm():
        raise UserError("--sequence-parallel needs Transformer Engine (or apex) norms; megatron-core's "
                        "local spec falls back to torch norms, which cannot split the sequence. Drop the flag.")
    tp = ps.get_tensor_model_parallel_world_size()
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    scored = role in ("reward", "critic")
    gpt = GPTModel(
        config=tcfg,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings and not scored,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )
    gpt.transformer_impl = impl
    gpt.real_vocab_size = model.vocab_size  # padded columns beyond it are masked (models/logits.py)
    if scored and gpt.post_process:
        # the head replaces the LM head: GPTModel's post-processing then returns [b, s, 1] scores
        gpt.output_layer = TokenHead(tcfg, model.hidden_size, seed=seed)
    if lora is not None and lora.enabled:
        for p in gpt.parameters():
            p.requires_grad_(False)
        apply_lora(gpt, lora, seed=seed)
        if scored and gpt.post_process:
            gpt.output_layer.weight.requires_grad_(True)
        if tcfg.recompute_granularity == "full" and gpt.pre_process:
            # megatron-core's (reentrant) full-layer checkpoint back-propagates into a chunk only when its
            # input requires grad; behind a frozen embedding it does not, and the adapters would get no
            # gradient at all. Mark the embedding output as requiring grad (as PEFT does).
            gpt.embedding.register_forward_hook(_output_requires_grad)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def _output_requires_grad(module, args, output):
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        output.requires_grad_(True)
    return output


def _have_apex_norm() -> bool:
    try:
        import apex  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters of this rank's shard."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
