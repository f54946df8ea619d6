"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for megatron-core's local spec.

megatron-core's local spec uses :class:`~megatron.core.transformer.dot_product_attention.DotProductAttention`,
which materialises the ``[b, heads, s, s]`` score and probability matrices (and, under GQA, copies K and V
to every query head). Without Transformer Engine on a GPU that is the memory and speed bottleneck of long
sequences. :class:`SDPAttention` has the same constructor and ``forward`` signature (megatron-core 0.16.1)
and calls PyTorch's fused SDPA, which picks a FlashAttention / memory-efficient kernel on a GPU (bf16/fp16,
causal, no explicit mask): no ``s x s`` matrix is kept for backward, and GQA is served without copying K/V
(``enable_gqa``, torch >= 2.5; older torch expands K/V like DotProductAttention).

Masking follows what DotProductAttention does for a causal self-attention layer:

* no ``attention_mask`` and ``sq == sk``: causal (``is_causal=True``);
* ``sq == 1`` (KV-cache decoding: the query is the newest position): attend to every cached key;
* ``1 < sq < sk`` (a chunk of queries after cached keys): causal aligned to the bottom right, i.e. query i
  sees keys ``0 .. sk - sq + i`` (DotProductAttention asserts ``sq == sk`` here);
* ``attn_mask_type`` ``no_mask`` (what megatron-core passes once a static inference context is past its
  prefill) or ``padding`` without a mask: no masking;
* an explicit ``attention_mask`` (megatron convention: ``True`` = masked out): used as given, like
  DotProductAttention does.

Not supported (raises): sliding-window attention, softmax types other than ``vanilla``, packed sequences,
attention bias, context parallelism -- the local spec does not support them either (except windows), and the
Transformer Engine spec is the path for those.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megatron_qrm.errors import UserError
from megatron_qrm.models import packed_attention, rope

def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (IndexError, ValueError):
        return False


_SDPA_HAS_GQA = _torch_at_least(2, 5)  # scaled_dot_product_attention(..., enable_gqa=) is new in torch 2.5


class SDPAttention(MegatronModule):
    """Drop-in replacement for megatron-core's ``DotProductAttention`` (same constructor and forward).

    Inputs ``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` (this TP rank's heads and groups);
    output ``[sq, b, np * hn]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        if self.config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the Transformer Engine spec")
        if getattr(self.config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type 'vanilla' only, not {self.config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("SDPAttention does not support sliding-window attention")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()

        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores back
        # inside the softmax: the net scale is the plain one, which is what SDPA applies.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        )
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_offset = None

    def _mask(self, sq: int, sk: int, attention_mask: Optional[Tensor], mask_type: AttnMaskType, device):
        """(attn_mask for SDPA or None, is_causal)."""
        if attention_mask is not None:
            # megatron: True = masked out; SDPA: True = may attend
            if attention_mask.dtype == torch.bool:
                return ~attention_mask, False
            return attention_mask, False  # an additive float mask
        if mask_type not in (AttnMaskType.causal, AttnMaskType.causal_bottom_right) or sq == 1:
            return None, False
        if sq == sk:
            return None, True
        if sq > sk:
            raise ValueError(f"causal attention with more queries ({sq}) than keys ({sk})")
        # bottom-right aligned causal mask: query i (of the last sq positions) sees keys 0 .. sk - sq + i
        q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
        k_pos = torch.arange(sk, device=device).unsqueeze(0)
        return k_pos <= q_pos, False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if packed_seq_params is not None:  # THD: [t, heads, hn], causal within each cu_seqlens segment
            if attention_bias is not None or attention_mask is not None:
                raise ValueError("packed sequences take no attention mask or bias (cu_seqlens delimit them)")
            return packed_attention.packed_causal_attention(query, key, value, packed_seq_params, self.softmax_scale,
                                           self.dropout_p if self.training else 0.0, enable_gqa=_SDPA_HAS_GQA)
        if attention_bias is not None:
            raise ValueError("attention bias is not supported by SDPAttention")
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        attn_mask, is_causal = self._mask(sq, sk, attention_mask, mask_type, query.device)

        # [s, b, heads, hn] -> [b, heads, s, hn]
        # contiguous [b, heads, s, hn]: torch's CPU flash kernel runs forward + backward ~15 % faster on it than
        # on the strided views of megatron's [s, b, heads, hn] (b=16, s=512, 8/2 heads: 173 vs 206 ms a layer),
        # more than the copies cost
        q = query.permute(1, 2, 0, 3).contiguous()
        k = key.permute(1, 2, 0, 3).contiguous()
        v = value.permute(1, 2, 0, 3).contiguous()
        groups = k.shape[1]
        kwargs = {}
        if groups != np_:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:  # older torch: expand K/V to every query head (as DotProductAttention does)
                k = k.repeat_interleave(np_ // groups, dim=1)
                v = v.repeat_interleave(np_ // groups, dim=1)

        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                         is_causal=is_causal, scale=self.softmax_scale, **kwargs)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal, scale=self.softmax_scale, **kwargs)
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters (vanilla softmax)


class RopeSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` with RoPE applied by :mod:`megatron_qrm.models.rope`.

    Same constructor, forward and parameters. In training and full-sequence forwards (no inference context)
    the rotary table is held back from megatron-core's forward and applied right after the Q/K/V projection
    (:meth:`get_query_key_value_tensors`): no ``cat``, cos/sin once per forward, packed sequences without a
    per-sequence Python loop, and for :class:`SDPAttention` the rotated query and key are written straight
    into the ``[b, heads, s, hn]`` layout it wants. Everything else (inference contexts, interleaved RoPE,
    YaRN, TE's fused RoPE, context parallelism, cross attention) goes through megatron-core unchanged.
    """

    _pending_rope = None  # (freqs_q, freqs_k, packed_seq_params) for the forward in progress

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, packed_seq_params=None,
                inference_context=None, inference_params=None, **kwargs):
        take_over = (
            rotary_pos_emb is not None and not args and inference_context is None and inference_params is None
            and rope.supported(self.config, self.pg_collection.cp.size()) is None
            and not getattr(self.config, "fused_single_qkv_rope", False)
            and (packed_seq_params is None or packed_seq_params.qkv_format == "thd")
        )
        if packed_seq_params is not None and packed_attention.shares_prefixes(packed_seq_params) and (
                not isinstance(self.core_attention, SDPAttention) or (rotary_pos_emb is not None and not take_over)):
            raise UserError("shared-prompt packing (--pack-shared-prompts) runs only on the local spec's SDPA "
                            "attention with standard RoPE; this layer cannot mask a prefix tree")
        if not take_over:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                                   packed_seq_params=packed_seq_params, inference_context=inference_context,
                                   inference_params=inference_params, **kwargs)
        q_freqs, k_freqs = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        self._pending_rope = (q_freqs, k_freqs, packed_seq_params)
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None,
                                   packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._pending_rope = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                  split_qkv=split_qkv)
        if self._pending_rope is None:
            return out
        if not split_qkv:
            raise RuntimeError("RopeSelfAttention: an unsplit QKV tensor cannot be rotated here")
        q_freqs, k_freqs, packed = self._pending_rope
        query, key = out[0], out[-2]
        dtype = query.dtype
        if packed is None:
            heads_first = isinstance(self.core_attention, SDPAttention)
            q_cos, q_sin = rope.half_cos_sin(q_freqs, dtype)
            k_cos, k_sin = rope.half_cos_sin(k_freqs, dtype)
        else:  # THD: positions restart at every sequence of the packed stream
            heads_first = False
            cu_q = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
            cu_k = packed.cu_seqlens_kv_padded if packed.cu_seqlens_kv_padded is not None else packed.cu_seqlens_kv
            q_cos, q_sin = rope.packed_cos_sin(q_freqs, cu_q, packed, dtype)
            k_cos, k_sin = rope.packed_cos_sin(k_freqs, cu_k, packed, dtype)
        query = rope.apply_rope(query, q_cos, q_sin, heads_first)
        key = rope.apply_rope(key, k_cos, k_sin, heads_first)
        return (query,) + tuple(out[1:-2]) + (key, out[-1])


def with_sdpa_attention(spec):
    """A copy of a (local) GPT layer spec whose self-attention is :class:`RopeSelfAttention` around
    :class:`SDPAttention`."""
    spec = copy.deepcopy(spec)
    spec.submodules.self_attention.module = RopeSelfAttention
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def get_gpt_layer_local_sdpa_spec(normalization: str = "RMSNorm"):
    """megatron-core's local GPT layer spec with :class:`SDPAttention` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return with_sdpa_attention(get_gpt_layer_local_spec(normalization=normalization))
