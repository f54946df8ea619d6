"""Causal self-attention over packed sequences (megatron-core's THD layout) for the local layer spec.

With ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=...)`` megatron-core squeezes the batch dimension
away and hands the core attention ``query [t, np, hn]``, ``key``/``value [t, ng, hn]``: the tokens of
every sequence of the micro-batch one after the other (RoPE is already applied per sequence, positions
restarting at each ``cu_seqlens`` boundary). Transformer Engine runs that layout with its fused varlen
kernels; megatron-core's own ``DotProductAttention`` refuses it. :func:`packed_causal_attention` is the
local spec's answer (called from :class:`~megatron_qrm.models.attention.SDPAttention`).

How: the sequences are sorted into a few length buckets (a sequence joins a bucket when it is at least
:data:`BUCKET_RATIO` of the bucket's longest); the packed stream is scattered into one zero buffer holding a
``[n_b, L_b]`` view per bucket (each sequence left-aligned, right-padded to its bucket's longest;
``index_copy`` at distinct positions), fused ``scaled_dot_product_attention`` runs causal on each view, and
the real positions are gathered back (``index_select``). Right padding is exact under a causal mask: a
real query at position ``i`` only sees keys ``0..i``, all real; the padded rows are discarded (their
gradient is zero). Compared with one SDPA over a block-diagonal ``[t, t]`` boolean mask this costs at most
about twice ``sum(len_i^2)`` instead of ``t^2`` score entries and uses the causal fast path (no mask
tensor); compared with a Python loop over sequences it is a few kernel calls per layer (one per length
bucket). ``benchmarks/bench_packing.py`` measures the packed training step.

Shared prefixes (:class:`PrefixSharingPackedSeqParams`, what shared-prompt packing of preference pairs
builds): a segment may continue another one. Each leaf segment's row then holds its ancestors' tokens and its
own, gathered from the stream (``index_select``; a prefix feeds every row that continues it), so every branch
attends causally to its prefix and itself, exactly as in its own unpacked sequence, at the cost of the
unpacked attention, while the projections and MLPs run once over the prefix. A prefix token's output is
taken from the first row holding it.

The gather layout depends only on ``cu_seqlens`` (and ``segment_parent``); it is built once per micro-batch
and cached on the ``PackedSeqParams`` object, so the layers share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.packed_seq_params import PackedSeqParams

_LAYOUT_ATTR = "_qrm_varlen_layout"


#: A sequence joins the current length bucket when it is at least this share of the bucket's longest one:
#: each bucket pads to its own longest sequence, so no score matrix is more than (1 / 0.7)^2 ~ 2x its
#: sequence's own, and a micro-batch of lengths spanning 5x needs about 5 SDPA calls per layer.
BUCKET_RATIO = 0.7


@dataclass
class PrefixSharingPackedSeqParams(PackedSeqParams):
    """THD parameters of a packed stream whose segments may continue another segment (a prefix tree).

    ``cu_seqlens_q`` delimits the segments as usual; ``segment_parent`` ``[n_seg]`` long gives, per segment,
    the segment it continues (-1: none). A token of a segment attends causally to its own segment and to all
    of its ancestors' tokens, and its RoPE position is ``position_ids`` ``[t]`` (its column in the sequence it
    belongs to: ancestors' lengths + offset). Shared-prompt packing (:func:`megatron_qrm.data.packing.
    pack_pairs_shared_prompt`) lays a preference pair out as ``prompt[:-1]``, then ``prompt[-1] + chosen``
    and ``prompt[-1] + rejected``, both continuing the first: the prompt is computed once, and each response
    sees the prompt and itself only. Only the local spec's :class:`~megatron_qrm.models.attention.SDPAttention`
    (with :class:`~megatron_qrm.models.attention.RopeSelfAttention`) runs it; ``max_seqlen_q`` is the longest
    root-to-leaf sequence (the RoPE table's length).
    """

    segment_parent: Optional[Tensor] = None
    position_ids: Optional[Tensor] = None


def shares_prefixes(packed_seq_params: Optional[PackedSeqParams]) -> bool:
    return isinstance(packed_seq_params, PrefixSharingPackedSeqParams) and \
        packed_seq_params.segment_parent is not None


@dataclass
class VarlenLayout:
    """Where each packed token goes in the padded views, one ``[n_b, L_b]`` view per length bucket.

    Attributes:
        buckets: ``(offset, n_b, L_b)`` per bucket: its rows start at ``offset`` of the concatenated flat
            buffer (``sum n_b * L_b`` rows); each of its ``n_b`` sequences is left-aligned, right-padded to ``L_b``.
        padded_position: LongTensor ``[t]``: row of the flat buffer each packed token's output is taken from.
            Without shared prefixes it is also where the token's input goes; the rows are distinct, so
            scattering with ``index_copy`` and gathering back with ``index_select`` are plain copies (their
            backward passes too; no accumulation).
        size: rows of the flat buffer.
        source: None, or (shared prefixes) LongTensor ``[size]``: the packed token each flat row is filled
            from (``index_select``; a prefix feeds the row of every sequence continuing it; padding rows take
            token 0, which no real query sees under the causal mask and whose gradient is therefore zero).
    """

    buckets: list[tuple[int, int, int]]
    padded_position: Tensor
    size: int
    source: Optional[Tensor] = None
    #: (shared prefixes) the rows that repeat a token whose output row is elsewhere, and those tokens: their
    #: gradients are added to the token's on the way back (:class:`_GatherRows`)
    repeat_rows: Optional[Tensor] = None
    repeat_tokens: Optional[Tensor] = None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, device, ratio: float = BUCKET_RATIO,
                        segment_parent: Optional[Sequence[int]] = None) -> "VarlenLayout":
        """Layout of the segments delimited by ``cu_seqlens``; with ``segment_parent`` (one entry per segment,
        -1 = none, a parent before its children) each leaf segment's row holds its ancestors, then itself."""
        cu = cu_seqlens.to(dtype=torch.long, device="cpu")
        lengths = (cu[1:] - cu[:-1]).tolist()  # host copy: the bucket shapes are Python ints anyway
        if any(n < 0 for n in lengths):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
        if segment_parent is None:
            return cls._bucketed(lengths, cu, ratio, device)
        return cls._prefix_tree(lengths, [int(p) for p in segment_parent], cu, ratio, device)

    @staticmethod
    def _buckets(lengths: list[int], ratio: float) -> tuple[list[tuple[int, int, int]], list[int], int]:
        """Length buckets of rows of ``lengths``: (buckets, first flat row of each row, flat size)."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        buckets, members, row_start = [], [], [0] * len(lengths)
        offset = 0
        for i in order:  # longest first; a new bucket when a sequence is much shorter than the bucket's first
            if not members or lengths[i] < ratio * lengths[members[0]]:
                if members:
                    buckets.append((offset, len(members), max(lengths[members[0]], 1)))
                    offset += len(members) * max(lengths[members[0]], 1)
                members = []
            row_start[i] = offset + len(members) * max(lengths[members[0]] if members else lengths[i], 1)
            members.append(i)
        if members:
            buckets.append((offset, len(members), max(lengths[members[0]], 1)))
            offset += len(members) * max(lengths[members[0]], 1)
        return buckets, row_start, offset

    @classmethod
    def _bucketed(cls, lengths: list[int], cu: Tensor, ratio: float, device) -> "VarlenLayout":
        buckets, row_start, size = cls._buckets(lengths, ratio)
        starts = torch.tensor(row_start, dtype=torch.long)
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        pos_in_seq = torch.arange(int(cu[-1])) - cu[:-1][seq_of_token]
        return cls(buckets=buckets, padded_position=(starts[seq_of_token] + pos_in_seq).to(device), size=size)

    @classmethod
    def _prefix_tree(cls, lengths: list[int], parent: list[int], cu: Tensor, ratio: float,
                     device) -> "VarlenLayout":
        n = len(lengths)
        if len(parent) != n or any(not -1 <= p < i for i, p in enumerate(parent)):
            raise ValueError(f"segment_parent must name an earlier segment (or -1) for each of the {n} segments, "
                             f"got {parent}")
        has_child = [False] * n
        for p in parent:
            if p >= 0:
                has_child[p] = True
        leaves = [i for i in range(n) if not has_child[i]]
        chains = []  # per leaf: its segments, root first
        for leaf in leaves:
            chain = [leaf]
            while parent[chain[-1]] >= 0:
                chain.append(parent[chain[-1]])
            chains.append(chain[::-1])
        row_lengths = [sum(lengths[s] for s in chain) for chain in chains]
        buckets, row_start, size = cls._buckets(row_lengths, ratio)
        source = torch.zeros(size, dtype=torch.long)
        repeat = torch.zeros(size, dtype=torch.bool)
        output_row = torch.full((int(cu[-1]),), -1, dtype=torch.long)
        for chain, start in zip(chains, row_start):  # one pass per leaf segment (a few per micro-batch)
            offset = start
            for s in chain:
                a, b = int(cu[s]), int(cu[s + 1])
                source[offset:offset + b - a] = torch.arange(a, b)
                span = output_row[a:b]
                if b > a and span[0] < 0:  # a shared prefix's output comes from the first row holding it
                    span.copy_(torch.arange(offset, offset + b - a))
                else:
                    repeat[offset:offset + b - a] = True
                offset += b - a
        rows = repeat.nonzero().flatten()
        return cls(buckets=buckets, padded_position=output_row.to(device), size=size, source=source.to(device),
                   repeat_rows=rows.to(device), repeat_tokens=source[rows].to(device))


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
        parent = packed_seq_params.segment_parent.tolist() if shares_prefixes(packed_seq_params) else None
        layout = VarlenLayout.from_cu_seqlens(cu_q, device, segment_parent=parent)
        setattr(packed_seq_params, _LAYOUT_ATTR, layout)
    return layout


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, layout.source)`` whose backward gathers each token's gradient from its own output
    row and adds only the repeated rows' (a shared prefix's other copies) -- instead of zero-filling the
    gradient and scatter-adding every row. Padding rows are skipped: no real query attends to them and their
    own outputs are discarded, so their gradients are zero."""

    @staticmethod
    def forward(ctx, x: Tensor, layout: "VarlenLayout") -> Tensor:
        ctx.layout = layout
        return x.index_select(0, layout.source)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        out = grad.index_select(0, layout.padded_position)
        if layout.repeat_rows.numel():
            out.index_add_(0, layout.repeat_tokens, grad.index_select(0, layout.repeat_rows))
        return out, None


# --------------------------------------------------------------------------------------------------
# torch's library kernels (the GPU path without Transformer Engine)
# --------------------------------------------------------------------------------------------------


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """LongTensor ``[total]``: the segment each packed token belongs to."""
    cu = cu_seqlens.to(torch.long)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1],
                                   output_size=total)


def ancestor_matrix(segment_parent: Tensor) -> Tensor:
    """Bool ``[n_seg, n_seg]``: entry ``(a, b)`` is True when segment ``b`` is ``a`` or one of its ancestors
    (parents come before their children, so one pass in order closes the relation)."""
    parent = [int(p) for p in segment_parent.tolist()]
    n = len(parent)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parent):  # a few segments per micro-batch
        if p >= 0:
            anc[i] |= anc[p]
    return anc.to(segment_parent.device)


def flex_block_mask(packed_seq_params: PackedSeqParams, total: int, device):
    """FlexAttention ``BlockMask`` of a packed stream: causal within each segment (the document mask), and with
    shared prefixes (:class:`PrefixSharingPackedSeqParams`) every key of an ancestor segment too (the prefix
    tree): a token sees exactly what it sees in its own unpacked sequence. Cached on ``packed_seq_params``."""
    cached = getattr(packed_seq_params, "_qrm_flex_mask", None)
    if cached is not None and cached[0] == (total, str(device)):
        return cached[1]
    from torch.nn.attention.flex_attention import create_block_mask

    seg = segment_ids(packed_seq_params.cu_seqlens_q.to(device), total)
    if shares_prefixes(packed_seq_params):
        anc = ancestor_matrix(packed_seq_params.segment_parent).to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            same = (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)
            return same | ((seg[q_idx] != seg[kv_idx]) & anc[seg[q_idx], seg[kv_idx]])
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)

    # on a GPU the mask is built by a compiled kernel block by block (eager evaluation materialises t x t)
    mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device,
                             _compile=torch.device(device).type == "cuda")
    setattr(packed_seq_params, "_qrm_flex_mask", ((total, str(device)), mask))
    return mask


_COMPILED_FLEX = None


def flex_packed_attention(query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams,
                          softmax_scale: float, compiled: bool = True) -> Tensor:
    """Packed causal (or prefix-tree) attention with FlexAttention: ``query [t, np, hn]``, ``key``/``value
    [t, ng, hn]`` -> ``[t, np * hn]``. ``compiled``: through ``torch.compile`` (FlexAttention's fused kernel;
    eager FlexAttention materialises the ``t x t`` scores and is for reference only)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    t, np_, hn = query.shape
    fn = flex_attention
    if compiled:
        if _COMPILED_FLEX is None:
            # automatic dynamic shapes: the stream length changes every micro-batch; a static compile would
            # recompile for each new length until dynamo's cache limit, then fall back to the eager kernel
            _COMPILED_FLEX = torch.compile(flex_attention)
        fn = _COMPILED_FLEX
    mask = flex_block_mask(packed_seq_params, t, query.device)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, hn]
    out = fn(q, k, v, block_mask=mask, scale=softmax_scale, enable_gqa=key.shape[1] != np_)
    return out[0].transpose(0, 1).reshape(t, np_ * hn)


def varlen_packed_attention(query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams,
                            softmax_scale: float) -> Tensor:
    """Packed causal attention with torch's ``varlen_attn`` (FlashAttention's varlen kernel; CUDA, fp16/bf16
    only in torch 2.13): ``[t, np, hn]`` -> ``[t, np * hn]``."""
    from torch.nn.attention.varlen import varlen_attn

    t, np_, hn = query.shape
    cu = packed_seq_params.cu_seqlens_q.to(device=query.device, dtype=torch.int32)
    m = int(packed_seq_params.max_seqlen_q) if packed_seq_params.max_seqlen_q is not None else int((cu[1:] - cu[:-1]).max())
    # FlashAttention wants unit-stride rows; V is a strided slice of the fused QKV projection (a no-op otherwise)
    query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    out = varlen_attn(query, key, value, cu, cu, m, m, scale=softmax_scale, window_size=(-1, 0),
                      enable_gqa=key.shape[1] != np_)
    return out.reshape(t, np_ * hn)


def library_kernel(query: Tensor, packed_seq_params: PackedSeqParams, dropout_p: float) -> Optional[str]:
    """Which library kernel runs this packed attention: ``"varlen"`` (CUDA, fp16/bf16, no shared prefixes),
    ``"flex"`` (CUDA otherwise), or None (CPU: the bucketed SDPA below measured faster there,
    docs/benchmarks.md; or attention dropout, which neither library kernel applies)."""
    if query.device.type != "cuda" or dropout_p > 0.0:
        return None
    if not shares_prefixes(packed_seq_params) and query.dtype in (torch.float16, torch.bfloat16):
        return "varlen"
    return "flex"


def packed_causal_attention(query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams,
                            softmax_scale: float, dropout_p: float = 0.0, enable_gqa: Optional[bool] = None) -> Tensor:
    """Causal attention within each packed sequence (or along each branch of a prefix tree).

    On a GPU (the local spec without Transformer Engine) torch's library kernels run it (:func:`library_kernel`:
    ``varlen_attn``, FlexAttention); on CPU, and with attention dropout, the bucketed SDPA of this module.

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
    kernel = library_kernel(query, packed_seq_params, dropout_p)
    if kernel == "varlen":
        return varlen_packed_attention(query, key, value, packed_seq_params, softmax_scale)
    if kernel == "flex":
        return flex_packed_attention(query, key, value, packed_seq_params, softmax_scale)
    return bucketed_packed_attention(query, key, value, packed_seq_params, softmax_scale, dropout_p, enable_gqa)


def bucketed_packed_attention(query: Tensor, key: Tensor, value: Tensor, packed_seq_params: PackedSeqParams,
                              softmax_scale: float, dropout_p: float = 0.0, enable_gqa: Optional[bool] = None) -> Tensor:
    """:func:`packed_causal_attention` as length-bucketed SDPA (the module docstring); any device."""
    t, np_, hn = query.shape
    layout = varlen_layout(packed_seq_params, query.device)
    if layout.padded_position.numel() != t:
        raise ValueError(f"cu_seqlens cover {layout.padded_position.numel()} tokens but the packed stream has {t}")
    where = layout.padded_position

    def flat(x: Tensor) -> Tensor:  # [t, heads, hn] -> [rows, heads, hn]
        if layout.source is not None:  # shared prefixes: a prefix token fills several rows
            return _GatherRows.apply(x, layout)
        return x.new_zeros(layout.size, x.shape[1], hn).index_copy(0, where, x)  # zeros on the padding

    q_all, k_all, v_all = flat(query), flat(key), flat(value)
    kwargs = {}
    groups = key.shape[1]
    if groups != np_ and enable_gqa:
        kwargs["enable_gqa"] = True
    contexts = []
    for offset, n, length in layout.buckets:  # a few length buckets per micro-batch, not one call per sequence
        def view(x: Tensor) -> Tensor:  # -> [n, heads, L, hn]
            return x[offset:offset + n * length].view(n, length, x.shape[1], hn).transpose(1, 2)

        q, k, v = view(q_all), view(k_all), view(v_all)
        if groups != np_ and not enable_gqa:
            k = k.repeat_interleave(np_ // groups, dim=1)
            v = v.repeat_interleave(np_ // groups, dim=1)
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=softmax_scale,
                                                 **kwargs)  # [n, np, L, hn]
        contexts.append(context.transpose(1, 2).reshape(n * length, np_ * hn))
    return torch.cat(contexts).index_select(0, where)
