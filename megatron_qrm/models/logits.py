"""Log-probabilities from vocab-parallel LM logits, over the REAL vocabulary.

Megatron pads the vocabulary to a multiple of 128 x TP; the padding columns are not tokens (zero rows
when imported, random rows when initialised here), so every log-softmax masks them. Sampling
(:mod:`megatron_qrm.rl.rollout`), RL scoring, SFT and the DPO-RM then agree on one distribution.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

PADDED_VOCAB_LOGIT = -1e9  # exp() underflows to 0: padded entries never get probability mass


def real_vocab_size(model) -> int:
    """The tokenizer's vocabulary size recorded on a model built by :func:`build_model` (DDP or not)."""
    return getattr(model, "module", model).real_vocab_size


def mask_padded_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Local logits [b, s, V/tp] (fp32) with the TP-padding columns (global id >= vocab_size) masked."""
    per_rank = local_logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank <= vocab_size:
        return local_logits
    ids = torch.arange(start, start + per_rank, device=local_logits.device)
    return local_logits.masked_fill(ids >= vocab_size, PADDED_VOCAB_LOGIT)


def fp32_masked_copy(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A private fp32 copy of ``local_logits [..., V/tp]`` with the TP-padding columns masked: exactly one copy
    (the up-cast of bf16 logits, or a clone of fp32 ones), masked in place. Differentiable."""
    logits = local_logits.float()
    if logits.data_ptr() == local_logits.data_ptr():
        logits = logits.clone()
    per_rank = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank > vocab_size:
        ids = torch.arange(start, start + per_rank, device=logits.device)
        logits.masked_fill_(ids >= vocab_size, PADDED_VOCAB_LOGIT)
    return logits


def next_token_nll(local_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-log p(labels | prefix) ``[...]`` from vocab-parallel logits ``[..., V/tp]`` (never gathered).

    Any leading shape: ``[b, s]`` rows or a packed stream ``[1, T]``. megatron-core's vocab-parallel kernel
    works in place on its input (shift, exp, normalise; the result is what it keeps for backward), so it is
    given one private fp32 copy (:func:`fp32_masked_copy`) and the caller's logits stay intact: the logits a
    micro-batch holds are the model output plus that one copy.
    """
    return vocab_parallel_cross_entropy(fp32_masked_copy(local_logits, vocab_size), labels)
