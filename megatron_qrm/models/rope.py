"""Rotary position embedding (RoPE) applied without concatenations, its cos/sin computed once per forward.

megatron-core's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) recomputes ``cos`` and ``sin`` of the
frequency table for every query and key of every layer, builds ``rotate_half(x)`` with a ``torch.cat`` and
then concatenates the (usually empty) pass-through channels with a second ``torch.cat``; in backward each
``cat`` becomes slices and copies. On packed (THD) micro-batches it also loops in Python over the sequences of
the micro-batch to slice the table, per query and key and layer. Profiled on a CPU Q-RM step (4 layers, hidden
512) the two ``cat`` calls cost about as much as the rest of the attention's elementwise work.

Here the rotation is one autograd function, :func:`apply_rope`: the output is written half by half
(``x1 cos - x2 sin``, ``x2 cos + x1 sin``), backward is the inverse rotation of the gradient, and ``cos`` /
``sin`` of the half-width table come from :func:`half_cos_sin` (cached on the frequency tensor, which
megatron-core's ``RotaryEmbedding`` itself caches per sequence length, so all layers and steps share them).
For packed sequences :func:`packed_cos_sin` gathers one row per token (positions restart at every
``cu_seqlens`` boundary) once per micro-batch, cached on its ``PackedSeqParams``.

Only the non-interleaved layout (Llama, Qwen, Mistral: the two halves of each head are rotated against each
other) without YaRN's magnitude scale is handled; callers fall back to megatron-core otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_COS_SIN_ATTR = "_qrm_half_cos_sin"
_PACKED_ATTR = "_qrm_packed_cos_sin"


def half_cos_sin(freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` ``[s, 1, 1, rot/2]`` (in ``dtype``) of megatron-core's table ``freqs [s, 1, 1, rot]``.

    megatron-core's non-interleaved table is ``cat(f, f)`` (both halves rotate by the same angle), so the
    first half is all there is. Cached on ``freqs`` per dtype.
    """
    cache = getattr(freqs, _COS_SIN_ATTR, None)
    if cache is None:
        cache = {}
        setattr(freqs, _COS_SIN_ATTR, cache)
    if dtype not in cache:
        half = freqs[..., : freqs.shape[-1] // 2]
        cache[dtype] = (torch.cos(half).to(dtype), torch.sin(half).to(dtype))
    return cache[dtype]


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """LongTensor ``[total]``: each token's position within its own sequence (0 at every boundary).

    ``cu_seqlens`` ``[n + 1]`` (int) are the sequences' start offsets in the packed stream, last = ``total``.
    """
    cu = cu_seqlens.to(torch.long)
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


def packed_cos_sin(freqs: Tensor, cu_seqlens: Tensor, holder, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos``, ``sin`` ``[t, 1, 1, rot/2]`` for a packed stream of ``t = cu_seqlens[-1]`` tokens.

    Follows megatron-core's THD convention (``_apply_rotary_pos_emb_thd``, context parallel size 1): when the
    table has exactly ``t`` rows it already holds one row per packed token; otherwise token ``j`` of a sequence
    takes row ``j``. A stream with shared prefixes (``holder.position_ids`` ``[t]``, see
    :class:`~megatron_qrm.models.packed_attention.PrefixSharingPackedSeqParams`) takes the rows it names: a
    segment continuing a prefix continues its positions. Cached on ``holder`` (the micro-batch's
    ``PackedSeqParams``) for every layer.
    """
    key = (id(freqs), id(cu_seqlens), dtype)
    cache = getattr(holder, _PACKED_ATTR, None)
    if cache is None:
        cache = {}
        setattr(holder, _PACKED_ATTR, cache)
    if key not in cache:
        total = int(cu_seqlens[-1])
        cos, sin = half_cos_sin(freqs, dtype)
        explicit = getattr(holder, "position_ids", None)
        if explicit is not None:
            pos = explicit.reshape(-1).to(device=freqs.device, dtype=torch.long)
            if pos.numel() != total:
                raise ValueError(f"position_ids has {pos.numel()} entries for a packed stream of {total} tokens")
            cos, sin = cos.index_select(0, pos), sin.index_select(0, pos)
        elif freqs.shape[0] != total:
            pos = packed_positions(cu_seqlens.to(freqs.device), total)
            cos, sin = cos.index_select(0, pos), sin.index_select(0, pos)
        # the tensors are kept alive with the entry, so their ids cannot be reused while it exists
        cache[key] = (cos, sin, freqs, cu_seqlens)
    return cache[key][:2]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float, heads_first: bool = False) -> Tensor:
    """A new tensor: ``x``'s first ``2 * cos.shape[-1]`` channels rotated by ``sign * angle``.

    Contiguous, or with ``heads_first`` (``x [s, b, heads, hn]``) a ``[s, b, heads, hn]`` view of contiguous
    ``[b, heads, s, hn]`` memory, the layout fused attention kernels want (the copy into it is then free).
    """
    half = cos.shape[-1]
    rot = 2 * half
    if heads_first:
        s, b, h, d = x.shape
        out = torch.empty((b, h, s, d), dtype=x.dtype, device=x.device).permute(2, 0, 1, 3)
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = x[..., :half], x[..., half:rot]
    o1, o2 = out[..., :half], out[..., half:rot]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)
    if rot < x.shape[-1]:
        out[..., rot:].copy_(x[..., rot:])
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, heads_first: bool) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0, heads_first)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        # the rotation is orthogonal: its transpose is the rotation by the opposite angle
        return _rotate(grad, cos, sin, -1.0), None, None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, heads_first: bool = False) -> Tensor:
    """RoPE of ``x [s, b, heads, hn]`` (any strides): a new tensor of the same shape.

    ``cos``/``sin`` ``[s or 1, b or 1, 1, rot/2]`` are the half-width tables (:func:`half_cos_sin`), ``rot <=
    hn``; channels past ``rot`` pass through. The result is contiguous, or with ``heads_first`` laid out as
    contiguous ``[b, heads, s, hn]`` memory (what :class:`~megatron_qrm.models.attention.SDPAttention` copies
    its inputs into). Differentiable in ``x`` (not in the tables).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin, heads_first)
    return _rotate(x, cos, sin, 1.0, heads_first)


def supported(config, cp_size: int = 1) -> Optional[str]:
    """None when :func:`apply_rope` computes what megatron-core's RoPE would for ``config``, else why not."""
    if getattr(config, "rotary_interleaved", False):
        return "interleaved rotary layout"
    if getattr(config, "multi_latent_attention", False):
        return "multi-latent attention"
    if getattr(config, "rope_type", "rope") == "yarn" or getattr(config, "mrope_section", None) is not None:
        return "YaRN / mRoPE"
    if getattr(config, "apply_rope_fusion", False):
        return "Transformer Engine's fused RoPE is on"
    if cp_size != 1:
        return "context parallelism"
    return None
