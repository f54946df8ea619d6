"""Sequence packing: no compute on padding.

A global batch's samples are packed into micro-batches of at most ``capacity`` tokens by first-fit
decreasing (a sample -- a preference pair, an SFT example, an RL sequence -- is one item and never split:
a pair's chosen and rejected stay together, which the pairwise loss needs). Each micro-batch is one
packed stream in megatron-core's THD layout: ``tokens [1, T]`` with the sequences one after the other,
``cu_seqlens`` delimiting them, position ids restarting at 0 at every sequence, and only a few padding
tokens at the end (``T`` rounded up to ``pad_to_multiple``; the padding is a sequence of its own, so it
attends only to itself). The model runs it with ``PackedSeqParams`` (:func:`packed_seq_params`):
Transformer Engine's fused varlen attention on a GPU, :mod:`megatron_qrm.models.packed_attention` on the
local spec; RoPE restarts per sequence inside megatron-core.

Exactness: the loss never sees the packed layout. :func:`unpack` gathers the model's per-token output back
to the ``[N, S]`` right-padded layout of :func:`~megatron_qrm.data.preference.collate_sequences` (a
per-sequence segment index), and the batch carries that layout's masks, so the per-sequence masked means,
last-token scores and log-prob sums are computed by the very functions the unpacked path uses, and the
loss/metric sums are counted per pair / per token exactly as before (the schedule sums them over
micro-batches and data-parallel ranks and divides once).

Data-parallel ranks get balanced token counts: the global batch is dealt to the ranks longest-first, each
item to the rank with the fewest tokens so far (:func:`balance_across_ranks`). Ranks may then run different
numbers of micro-batches; with per-token loss averaging that changes nothing in the result.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
import torch

from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qrm.errors import UserError

PACKED_KEYS = ("cu_seqlens", "max_seqlen", "unpack_index", "unpack_valid", "segment_parent")


# --------------------------------------------------------------------------------------------------
# bin packing
# --------------------------------------------------------------------------------------------------


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items of ``sizes`` into bins of ``capacity``: longest first, each into the first bin it fits.

    Deterministic (ties by index). Returns the bins as lists of item indices, in bin-creation order.
    Raises ValueError for an item larger than ``capacity``.
    """
    sizes = [int(s) for s in sizes]
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1 token, got {capacity}")
    if sizes and max(sizes) > capacity:
        raise UserError(f"a sample of {max(sizes)} tokens does not fit in a packed micro-batch of {capacity} "
                        "tokens; raise --pack-tokens")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if sizes[i] <= r:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def balance_across_ranks(sizes: Sequence[int], n_ranks: int) -> list[list[int]]:
    """Deal items to ``n_ranks`` ranks with near-equal token totals (longest first, to the lightest rank;
    ties: fewer items, then lower rank). Every rank gets at least one item when there are enough.
    Returns each rank's item indices in ascending order."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    heap = [(0, 0, r) for r in range(n_ranks)]
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        tokens, count, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (tokens + int(sizes[i]), count + 1, r))
    return [sorted(o) for o in out]


def plan_microbatches(sizes: Sequence[int], capacity: int, dp_rank: int = 0, dp_size: int = 1) -> list[list[int]]:
    """This data-parallel rank's packed micro-batches of one global batch: item positions (into
    ``sizes``) per micro-batch. The same on every rank of a data-parallel replica (TP/PP ranks agree)."""
    mine = balance_across_ranks(sizes, dp_size)[dp_rank]
    return [[mine[j] for j in sorted(b)] for b in first_fit_decreasing([sizes[i] for i in mine], capacity)]


# --------------------------------------------------------------------------------------------------
# one packed micro-batch
# --------------------------------------------------------------------------------------------------


def pack_collated(batch: dict[str, torch.Tensor], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Turn a right-padded batch of ``N`` sequences into one packed stream.

    Args:
        batch: a :func:`~megatron_qrm.data.preference.collate_sequences` batch -- ``tokens``, ``labels``
            (optional) ``[N, S]`` and the masks -- plus any per-sample or ``[N, S]`` entries (kept as they are,
            for the loss). The sequence
            length of row ``i`` is taken from ``seq_lengths`` ``[N]`` when present, else from the masks
            (the last response position + 1).
        pad_id: id of the padding tokens appended to reach a multiple of ``pad_to_multiple``.

    Returns:
        the same dict with ``tokens``, ``labels``, ``position_ids`` replaced by packed ``[1, T]`` versions
        (positions restart at 0 per sequence), the ``[N, S]`` masks kept for the loss, and
        ``cu_seqlens`` int32 ``[n + 1]`` (n = N, plus one padding segment when ``T`` exceeds the real
        tokens), ``max_seqlen`` long ``[]``, ``unpack_index`` long ``[N, S]`` (packed position of each
        (row, column); 0 on padding) and ``unpack_valid`` bool ``[N, S]``.
    """
    tokens = batch["tokens"]
    n, s = tokens.shape
    if "seq_lengths" in batch:
        lengths = batch["seq_lengths"].long()
    else:  # every sequence ends with its last response token (collate_sequences' layout)
        resp = batch["response_mask"].bool()
        cols = torch.arange(1, s + 1).expand(n, s)
        lengths = torch.where(resp, cols, torch.zeros_like(cols)).amax(dim=1)
    if bool((lengths < 1).any()):
        raise ValueError("every packed sequence needs at least one token")
    cols = torch.arange(s)
    valid = cols[None, :] < lengths[:, None]  # [N, S]
    real = int(lengths.sum())
    total = max(1, math.ceil(real / pad_to_multiple)) * pad_to_multiple
    extra = total - real
    unpack_index = torch.zeros(n, s, dtype=torch.long)
    unpack_index[valid] = torch.arange(real)

    def stream(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([x[valid], torch.full((extra,), fill, dtype=x.dtype)])[None]

    bounds = [0] + lengths.cumsum(0).tolist() + ([total] if extra else [])
    out = dict(batch)
    if "labels" in batch:
        out["labels"] = stream(batch["labels"], pad_id)
    out.update(
        tokens=stream(tokens, pad_id),
        position_ids=torch.cat([cols.expand(n, s)[valid], torch.arange(extra)])[None],
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=torch.tensor(max(int(lengths.max()), extra), dtype=torch.long),
        unpack_index=unpack_index,
        unpack_valid=valid,
    )
    out.pop("seq_lengths", None)
    return out


def check_pack_capacity(capacity: int | None, longest: int, what: str) -> None:
    """Fail before training when the longest sample (``what``: e.g. "pair of --train-data (... tokens, chosen
    + rejected)") cannot fit in a packed micro-batch of ``capacity`` tokens (None: packing off)."""
    if capacity is not None and capacity < longest:
        raise UserError(f"--pack-tokens {capacity} is smaller than the longest {what.format(longest=longest)}; "
                        "raise it or leave it unset")


def shared_prompt_pair_tokens(sequence_lengths: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
    """``[N]`` tokens of each pair packed by :func:`pack_pairs_shared_prompt`: both sequences
    (``sequence_lengths`` ``[N, 2]``) less the shared ``prompt[:-1]`` (``prompt_lengths`` ``[N]``)."""
    return np.asarray(sequence_lengths).sum(axis=1) - np.maximum(np.asarray(prompt_lengths) - 1, 0)


def pack_pairs_shared_prompt(batch: dict[str, torch.Tensor], pad_id: int,
                             pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Pack a pair batch into one stream that computes each pair's prompt once (a prefix tree).

    Each pair ``i`` becomes up to three segments: ``prompt[:-1]``, then ``prompt[-1] + chosen`` and
    ``prompt[-1] + rejected``, both continuing the first (``segment_parent``); each branch attends to the shared
    prefix and to itself only, with positions continuing the prefix's, so every token sees exactly what it sees
    in its own unpacked row. The last prompt token is in both branches because its next-token log-prob (DPO-RM)
    predicts each side's first response token. Scores of a shared-prefix token serve both rows in
    :func:`unpack` (Q-RM / ORM read response positions only, DPO-RM the branch positions).

    Args:
        batch: a :func:`~megatron_qrm.data.preference.collate_pairs` batch (``[2B, S]``; rows ``i`` and ``B + i``
            share their prompt), any extra entries kept as they are.
        pad_id: id of the padding appended to reach a multiple of ``pad_to_multiple``.

    Returns:
        what :func:`pack_collated` returns (``tokens``, ``labels``, ``position_ids`` ``[1, T]``, ``cu_seqlens``
        over the segments, ``max_seqlen`` = the longest row, ``unpack_index`` / ``unpack_valid`` ``[2B, S]``:
        a rejected row's prompt columns point at the shared prefix), plus ``segment_parent`` long ``[n_seg]``
        (-1: a root segment).
    """
    tokens = batch["tokens"]
    n, s = tokens.shape
    if n % 2:
        raise ValueError(f"shared-prompt packing needs chosen/rejected row pairs, got {n} rows")
    b = n // 2
    resp = batch["response_mask"].bool()
    if not bool(resp.any(dim=1).all()):
        raise ValueError("shared-prompt packing needs a response token in every sequence")
    cols = torch.arange(s)
    prompt_len = torch.where(resp, cols.expand(n, s), torch.full_like(tokens, s)).amin(dim=1)  # [2B]
    lengths = torch.where(resp, cols.expand(n, s) + 1, torch.zeros_like(tokens)).amax(dim=1)  # [2B]
    if not torch.equal(prompt_len[:b], prompt_len[b:]) or not torch.equal(tokens[:b].masked_fill(
            cols >= prompt_len[:b, None], 0), tokens[b:].masked_fill(cols >= prompt_len[b:, None], 0)):
        raise ValueError("shared-prompt packing: a pair's chosen and rejected rows have different prompts")
    shared = (prompt_len[:b] - 1).clamp(min=0)  # [B] tokens of prompt[:-1]
    pair = torch.arange(b)
    # segments of pair i: (prefix, chosen branch, rejected branch) as (row, first column, length)
    seg_row = torch.stack([pair, pair, pair + b], dim=1).reshape(-1)
    seg_col = torch.stack([torch.zeros_like(shared), shared, shared], dim=1).reshape(-1)
    seg_len = torch.stack([shared, lengths[:b] - shared, lengths[b:] - shared], dim=1).reshape(-1)
    keep = seg_len > 0  # pairs without a prompt to share (a 1-token prompt) have no prefix segment
    new_index = keep.long().cumsum(0) - 1
    prefix = torch.arange(b) * 3
    parent = torch.stack([torch.full_like(pair, -1), *(torch.where(keep[prefix], new_index[prefix], -1),) * 2],
                         dim=1).reshape(-1)
    seg_row, seg_col, seg_len, parent = seg_row[keep], seg_col[keep], seg_len[keep], parent[keep]

    real = int(seg_len.sum())
    total = max(1, math.ceil(real / pad_to_multiple)) * pad_to_multiple
    extra = total - real
    seg_of_token = torch.repeat_interleave(torch.arange(seg_len.numel()), seg_len, output_size=real)
    starts = seg_len.cumsum(0) - seg_len
    row = seg_row[seg_of_token]
    col = seg_col[seg_of_token] + torch.arange(real) - starts[seg_of_token]
    unpack_index = torch.zeros(n, s, dtype=torch.long)
    unpack_index[row, col] = torch.arange(real)
    in_prefix = cols[None, :] < shared[:, None]  # [B, S]: a rejected row's prompt[:-1] is the chosen row's
    unpack_index[b:][in_prefix] = unpack_index[:b][in_prefix]

    def stream(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([x[row, col], torch.full((extra,), fill, dtype=x.dtype)])[None]

    out = dict(batch)
    if "labels" in batch:
        out["labels"] = stream(batch["labels"], pad_id)
    out.update(
        tokens=stream(tokens, pad_id),
        position_ids=torch.cat([col, torch.arange(extra)])[None],
        cu_seqlens=torch.tensor([0] + seg_len.cumsum(0).tolist() + ([total] if extra else []), dtype=torch.int32),
        max_seqlen=torch.tensor(max(int(lengths.max()), extra), dtype=torch.long),
        unpack_index=unpack_index,
        unpack_valid=cols[None, :] < lengths[:, None],
        segment_parent=torch.cat([parent, torch.full((1 if extra else 0,), -1, dtype=torch.long)]),
    )
    out.pop("seq_lengths", None)
    return out


def is_packed(batch: dict) -> bool:
    return "cu_seqlens" in batch


def packed_seq_params(batch: dict) -> PackedSeqParams | None:
    """megatron-core's THD parameters of a packed micro-batch (None for an unpacked one); with shared prompts
    (:func:`pack_pairs_shared_prompt`) the local spec's prefix-tree variant."""
    if not is_packed(batch):
        return None
    cu = batch["cu_seqlens"].to(torch.int32)
    m = int(batch["max_seqlen"])
    if "segment_parent" in batch:
        from megatron_qrm.models.packed_attention import PrefixSharingPackedSeqParams

        return PrefixSharingPackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m,
                                            max_seqlen_kv=m, segment_parent=batch["segment_parent"],
                                            position_ids=batch["position_ids"].reshape(-1))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m, max_seqlen_kv=m)


def unpack(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Packed per-token values ``[1, T, ...]`` -> ``[N, S, ...]`` in the unpacked row layout (0 on padding).
    Differentiable (a gather); an unpacked batch's values are returned as they are."""
    if not is_packed(batch):
        return values
    index, valid = batch["unpack_index"], batch["unpack_valid"]
    out = values[0][index]  # [N, S, ...]
    mask = valid.reshape(valid.shape + (1,) * (out.dim() - 2))
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))


def padding_share(batches: Sequence[dict]) -> float:
    """Share of the tokens fed to the model that are padding (packed: the tail segments; unpacked: every
    position beyond a row's last real token)."""
    computed = padded = 0
    for b in batches:
        computed += b["tokens"].numel()
        if is_packed(b):  # the stream's tokens that no row reads back (a shared prompt is one token, read twice)
            padded += b["tokens"].numel() - int(b["unpack_index"][b["unpack_valid"]].unique().numel())
        else:
            resp = b["response_mask"].bool()
            s = resp.shape[1]
            last = torch.where(resp, torch.arange(1, s + 1).expand_as(resp), torch.zeros_like(resp, dtype=torch.long))
            padded += int((s - last.amax(dim=1)).sum())
    return padded / max(computed, 1)


def group_by_length(indices: np.ndarray, sizes: np.ndarray, micro_batch_size: int) -> list[np.ndarray]:
    """Length-grouped micro-batches (the fallback without packing): the samples sorted by length, cut
    into consecutive micro-batches of ``micro_batch_size`` (so each pads to a similar length)."""
    order = np.argsort(-np.asarray(sizes), kind="stable")
    ranked = np.asarray(indices)[order]
    return [ranked[i:i + micro_batch_size] for i in range(0, len(ranked), micro_batch_size)]


def rank_microbatches(global_indices: np.ndarray, sizes: np.ndarray, *, micro_batch_size: int, dp_rank: int,
                      dp_size: int, pack_capacity: int | None, group_by_length_: bool = False) -> list[np.ndarray]:
    """This data-parallel rank's micro-batches (dataset indices) of one global batch.

    * ``pack_capacity`` set: packed micro-batches of at most that many tokens (:func:`plan_microbatches`);
    * else ``group_by_length_``: length-sorted micro-batches of ``micro_batch_size``, dealt to the ranks
      round-robin (each rank gets the same number);
    * else: the rank's contiguous slice cut into ``micro_batch_size`` (as :class:`GlobalBatchSampler`).

    ``sizes`` ``[len(global_indices)]``: tokens of each sample (a pair: both sequences).
    """
    global_indices, sizes = np.asarray(global_indices), np.asarray(sizes)
    if pack_capacity is not None:
        return [global_indices[np.asarray(mb)] for mb in plan_microbatches(sizes.tolist(), pack_capacity,
                                                                             dp_rank, dp_size)]
    if group_by_length_:
        return group_by_length(global_indices, sizes, micro_batch_size)[dp_rank::dp_size]
    per_rank = len(global_indices) // dp_size
    mine = global_indices[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
