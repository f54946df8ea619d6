"""Causal self-attention over packed sequences (megatron-core's THD layout) for the local layer spec.

With ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...)`` megatron-core squeezes the batch dimension
away and hands the core attention ``query [t, np, hn]``, ``key``/``value [t, ng, hn]``: the tokens of
every sequence of the micro-batch one after the other (RoPE is already applied per sequence, positions
restarting at each ``cu_seqlens`` boundary). Transformer Engine runs that layout with its fused varlen
kernels; megatron-core's own ``DotProductAttention`` refuses it. :func:`packed_causal_attention` is the
local spec's answer (called from :class:`~megatron_qrm.models.attention.SDPAttention`).

How: the packed stream is scattered into a zero ``[n_seq, max_seqlen]`` view (each sequence
left-aligned, right padding; ``index_copy`` at distinct positions), fused ``scaled_dot_product_attention``
runs causal on it, and the real positions are gathered back (``index_select``). Right padding is exact under a causal mask: a real query at position ``i``
only sees keys ``0..i``, all real; the padded rows are discarded (their gradient is zero). Compared with
one SDPA over a block-diagonal ``[t, t]`` boolean mask this costs ``n_seq * max_seqlen^2`` instead of
``t^2`` score entries and uses the causal fast path (no mask tensor); compared with a Python loop over
sequences it is one kernel call per layer. See ``benchmarks/bench_packing.py`` for the measurements.

The gather layout depends only on ``cu_seqlens``; it is built once per micro-batch and cached on the
``PackedSeqParams`` object, so the layers share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams

_LAYOUT_ATTR = "_qrm_varlen_layout"


@dataclass
class VarlenLayout:
    """Where each packed token goes in the padded ``[n_seq, max_seqlen]`` view.

    Attributes:
        n_seq, max_seqlen: the padded view's shape.
        padded_position: LongTensor ``[t]``: flat index (``seq * max_seqlen + pos``) of each packed token in
            the padded view; distinct, so scattering with ``index_copy`` and gathering back with
            ``index_select`` are both plain copies (their backward passes too; no accumulation).
    """

    n_seq: int
    max_seqlen: int
    padded_position: Tensor

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, device) -> "VarlenLayout":
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]  # [n]
        if bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
        n = lengths.numel()
        max_len = max(int(lengths.max()), 1) if n else 1
        seq_of_token = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # [t]
        pos_in_seq = torch.arange(int(cu[-1]), device=device) - cu[:-1][seq_of_token]  # [t]
        return cls(n_seq=n, max_seqlen=max_len, padded_position=seq_of_token * max_len + pos_in_seq)


def varlen_layout(packed_seq_params: PackedSeqParams, device) -> VarlenLayout:
    """The (cached) layout of ``packed_seq_params.cu_seqlens_q`` (self-attention: q and kv agree)."""
    layout = getattr(packed_seq_params, _LAYOUT_ATTR, None)
    if layout is None or layout.padded_position.device != torch.device(device):
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q.cpu(), cu_kv.cpu()):
            raise ValueError("packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if packed_seq_params.cu_seqlens_q_padded is not None and not torch.equal(
                packed_seq_params.cu_seqlens_q_padded.cpu(), cu_q.cpu()):
            raise ValueError("the local spec's packed attention does not support cu_seqlens_q_padded "
                             "(pad inside the packed stream with a padding segment instead)")
        layout = VarlenLayout.from_cu_seqlens(cu_q, device)
        setattr(packed_seq_params, _LAYOUT_ATTR, layout)
    return layout


def packed_causal_attention(query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams,
                            softmax_scale: float, dropout_p: float = 0.0, enable_gqa: Optional[bool] = None) -> Tensor:
    """Causal attention within each packed sequence.

    Args:
        query: ``[t, np, hn]``; key, value: ``[t, ng, hn]`` (``np`` a multiple of ``ng``).
        packed_seq_params: THD parameters; ``cu_seqlens_q`` ``[n_seq + 1]`` int, ending at ``t``.
        softmax_scale: scale applied to ``q . k``.
        enable_gqa: pass SDPA's ``enable_gqa`` (torch >= 2.5) when ``ng < np``; None: expand K/V instead.

    Returns:
        ``[t, np * hn]``.
    """
    if packed_seq_params.qkv_format not in (None, "thd"):
        raise ValueError(f"packed attention expects qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
    t, np_, hn = query.shape
    layout = varlen_layout(packed_seq_params, query.device)
    if layout.padded_position.numel() != t:
        raise ValueError(f"cu_seqlens cover {layout.padded_position.numel()} tokens but the packed stream has {t}")
    n, length, where = layout.n_seq, layout.max_seqlen, layout.padded_position

    def padded(x: Tensor) -> Tensor:  # [t, heads, hn] -> [n, heads, L, hn], zeros beyond each sequence
        buf = x.new_zeros(n * length, x.shape[1], hn).index_copy(0, where, x)
        return buf.view(n, length, x.shape[1], hn).transpose(1, 2)

    q, k, v = padded(query), padded(key), padded(value)
    kwargs = {}
    if k.shape[1] != np_:
        if enable_gqa:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(np_ // k.shape[1], dim=1)
            v = v.repeat_interleave(np_ // v.shape[1], dim=1)
    context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale,
                                             **kwargs)  # [n, np, L, hn]
    context = context.transpose(1, 2).reshape(n * length, np_ * hn)
    return context.index_select(0, where)
