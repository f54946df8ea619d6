"""Pick next tokens from vocabulary-parallel logits without gathering the vocabulary when it is not needed.

Each TP rank holds the logits of its slice of the (padded) vocabulary, ``[B, V/tp]``. Sampling is
Gumbel-max: ``argmax_v(logits_v / T + G_v)`` with ``G_v = -log(E_v)``, ``E_v ~ Exp(1)`` i.i.d., is a
sample of ``softmax(logits / T)``. So:

* greedy (``T = 0``) and plain temperature sampling: every rank takes the max of its own slice and the
  ranks merge ``(value, id, logit, logsumexp)`` -- 4 numbers per row, not ``V``;
* top-k (with or without top-p): every rank sends its own top-k, the merged ``tp x k`` candidates hold
  the global top-k, and top-p applies within them (as :func:`filter_logits` does after top-k);
* top-p alone: the nucleus can be any size, so the slices are gathered (the only full gather).

The noise ``E`` is drawn for the whole REAL vocabulary ``[B, vocab_size]`` from the caller's generator
on every rank, and each rank reads its slice: the same seed samples the same tokens whatever the TP size,
the KV-cache and the recompute paths. The behaviour log-prob of the chosen token is taken from the
untempered, unfiltered logits (the policy itself): ``logit - logsumexp`` over the real vocabulary.
Padded vocabulary columns (global id >= ``vocab_size``) are never chosen.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

NEG_INF = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and the top-p nucleus with -inf (vectorised)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def gumbel_noise(rows: int, vocab_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """[rows, vocab_size] i.i.d. Gumbel(0, 1) noise."""
    return -torch.empty(rows, vocab_size, device=device).exponential_(generator=generator).log()


def _tp() -> tuple[int, int]:
    size = ps.get_tensor_model_parallel_world_size()
    return size, (ps.get_tensor_model_parallel_rank() if size > 1 else 0)


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """[B, n] on each TP rank -> [tp, B, n] (rank order)."""
    parts = [torch.empty_like(x) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.stack(parts)


def select_tokens(local_logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, vocab_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """local_logits [B, V/tp] (this TP rank's slice) -> (token ids [B] long, behaviour log-probs [B] fp32).

    Every rank of the TP group returns the same result. Collective over the TP group when TP > 1.
    """
    tp, rank = _tp()
    logits = local_logits.float()
    b, width = logits.shape
    start = rank * width
    if start + width > vocab_size:  # padded vocabulary columns of this slice
        ids = torch.arange(start, start + width, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, NEG_INF)
    lse = torch.logsumexp(logits, -1)  # [B]
    noise = None
    if temperature > 0:
        noise = gumbel_noise(b, vocab_size, generator, logits.device)
        real = max(0, min(width, vocab_size - start))
        local_noise = torch.zeros(b, width, device=logits.device)
        local_noise[:, :real] = noise[:, start:start + real]

    if temperature > 0 and top_p < 1.0 and not top_k:  # the nucleus needs the whole distribution
        full = logits if tp == 1 else torch.cat(list(_all_gather(logits)), dim=-1)  # [B, V_padded]
        scores = filter_logits(full / temperature, 0, top_p)
        full_noise = torch.zeros_like(full)
        full_noise[:, :vocab_size] = noise
        token = (scores + full_noise).argmax(-1)
        logp = full.gather(-1, token[:, None]).squeeze(-1) - torch.logsumexp(full, -1)
        return token, logp

    if temperature > 0 and top_k:
        k = min(top_k, width)
        vals, idx = logits.topk(k, dim=-1)  # [B, k]
        if tp == 1:
            cand_vals, cand_ids, total_lse = vals, idx + start, lse
        else:
            packed = torch.cat([vals.double(), (idx + start).double(), lse.double()[:, None]], dim=-1)  # [B, 2k+1]
            g = _all_gather(packed)  # [tp, B, 2k+1]
            cand_vals = g[:, :, :k].permute(1, 0, 2).reshape(b, tp * k).float()
            cand_ids = g[:, :, k:2 * k].permute(1, 0, 2).reshape(b, tp * k).long()
            total_lse = torch.logsumexp(g[:, :, 2 * k], dim=0).float()
        scores = filter_logits(cand_vals / temperature, top_k, top_p)
        cand_noise = noise.gather(-1, cand_ids.clamp(max=vocab_size - 1))
        win = (scores + cand_noise).argmax(-1, keepdim=True)
        token = cand_ids.gather(-1, win).squeeze(-1)
        logp = cand_vals.gather(-1, win).squeeze(-1) - total_lse
        return token, logp

    # greedy, or plain temperature sampling: per-slice max, then a merge of 4 numbers per row
    scores = logits if temperature <= 0 else logits / temperature + local_noise
    best, idx = scores.max(-1)
    chosen = logits.gather(-1, idx[:, None]).squeeze(-1)
    if tp == 1:
        return idx + start, chosen - lse
    packed = torch.stack([best.double(), (idx + start).double(), chosen.double(), lse.double()], dim=-1)  # [B, 4]
    g = _all_gather(packed)  # [tp, B, 4]
    win = g[:, :, 0].argmax(0)  # first max: the lowest rank, i.e. the lowest id, as a full argmax would pick
    pick = g.gather(0, win.view(1, b, 1).expand(1, b, 4)).squeeze(0)  # [B, 4]
    return pick[:, 1].long(), (pick[:, 2] - torch.logsumexp(g[:, :, 3], dim=0)).float()


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Full-vocabulary logits [B, V] on one process (no TP) -> token ids [B]; the same rule as
    :func:`select_tokens` (``-inf`` logits never chosen)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = filter_logits(logits.float() / temperature, top_k, top_p)
    return (scores + gumbel_noise(logits.shape[0], logits.shape[1], generator, logits.device)).argmax(-1)
