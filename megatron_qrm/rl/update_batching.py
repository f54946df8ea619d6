"""Micro-batches of the PPO / REINFORCE actor and critic updates, padded or packed.

The rollout rows ``exp[k]`` are right-padded ``[n, L]`` (prompt + response). An optimizer step takes
``rows`` (this rank's share of one global batch) and cuts them into micro-batches:

* padded (``pack_capacity`` None): ``micro_batch_size`` rows each, as they lie;
* packed: first-fit-decreasing by real length (prompt + response) into micro-batches of at most
  ``pack_capacity`` tokens, each one THD stream (:func:`megatron_qrm.data.packing.pack_collated`) whose
  per-token rollout tensors (``action_mask``, ``logp_old``, ``advantages``, ...) stay in the row layout
  ``[N, S]``.

The loss sees the model output in the layout the model produced it (packed ``[1, T, V/tp]`` or padded
``[N, S, V/tp]``): the per-token log-probs (:func:`token_logprobs_rows`) and entropies
(:func:`token_entropy_rows`) are computed on it with megatron-core's vocab-parallel cross-entropy, and only
the per-token results are unpacked to ``[N, S]``, where the actor / critic losses are the unpacked functions on
the same numbers. At a 128k vocabulary a gathered ``[N, S, V/tp]`` copy of the logits (what the update held
before) is gigabytes per rank; the logits a micro-batch holds are now the model output and the one fp32 copy
the cross-entropy kernel keeps for backward (:func:`megatron_qrm.models.logits.next_token_nll`).

Losses return token sums and counts (``calculate_per_token_loss``), so the global batch's mean is the same
whichever way its rows are grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_qrm.data.packing import first_fit_decreasing, pack_collated, packed_seq_params, unpack
from megatron_qrm.models.logits import next_token_nll
from megatron_qrm.rl.experience import shift_right
from megatron_qrm.rl.kl import vocab_parallel_entropy_no_grad, vocab_parallel_entropy_recomputed
from megatron_qrm.training.engine import to_device


def update_microbatches(exp: dict[str, torch.Tensor], rows: Sequence[int], keys: Sequence[str], micro_batch_size: int,
                        pad_id: int, pack_capacity: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Micro-batches of ``rows`` of ``exp`` (see the module docstring). ``exp`` needs ``prompt_lens`` and
    ``response_lens`` ``[n]`` for packing."""
    rows = np.asarray(rows)
    if pack_capacity is None:
        return [{k: exp[k][torch.as_tensor(rows[m:m + micro_batch_size])] for k in keys if exp.get(k) is not None}
                for m in range(0, len(rows), micro_batch_size)]
    lengths = (exp["prompt_lens"] + exp["response_lens"]).long()[torch.as_tensor(rows)]  # [len(rows)]
    out = []
    for group in first_fit_decreasing(lengths.tolist(), pack_capacity):
        idx = torch.as_tensor(rows[sorted(group)])
        mb = {k: exp[k][idx] for k in keys if exp.get(k) is not None}
        s = int(lengths[sorted(group)].max())
        mb = {k: (v[:, :s] if v.dim() == 2 and v.shape[1] >= s else v) for k, v in mb.items()}  # trim column padding
        mb["seq_lengths"] = lengths[sorted(group)]
        out.append(pack_collated(mb, pad_id, pad_multiple))
    return out


def update_forward_step(loss_fn: Callable[[torch.Tensor, dict], tuple]):
    """megatron-core forward step for an update: ``loss_fn(output, batch)`` gets the model output as the model
    produced it (packed: the ``[1, T, ...]`` stream, ``batch["tokens"]`` the stream's tokens; padded:
    ``[N, S, ...]``) and takes its per-token results to the row layout with :func:`token_logprobs_rows`,
    :func:`token_entropy_rows` or :func:`megatron_qrm.data.packing.unpack`."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        out = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                    packed_seq_params=packed_seq_params(batch))
        return out, lambda output: loss_fn(output, batch)

    return forward_step


def token_logprobs_rows(local_logits: torch.Tensor, batch: dict, vocab_size: int) -> torch.Tensor:
    """``log pi(a_t | s_t)`` ``[N, S]`` (column t: the token at t; column 0 and padding: 0 or unused) from the
    vocab-parallel logits in the model's layout, ``[1, T, V/tp]`` (packed) or ``[N, S, V/tp]``.

    The label of position p is the token at p + 1 of the same layout; in a packed stream the last token of a
    sequence is then labelled with the next sequence's first token, a value that lands one column past the
    row's end, where no action is (``action_mask`` is 0 there). Differentiable in the logits."""
    tokens = batch["tokens"]
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    return shift_right(-unpack(next_token_nll(local_logits, labels, vocab_size), batch))


def token_entropy_rows(local_logits: torch.Tensor, batch: dict, vocab_size: int, group, grad: bool) -> torch.Tensor:
    """Entropy of ``pi(. | prefix up to p)`` ``[N, S]`` (column p: the distribution the logits at p give; not
    shifted) from the logits in the model's layout, a chunk of tokens at a time: ``grad`` False (an entropy that
    is only logged) under ``no_grad``; ``grad`` True (an entropy bonus) with a backward that recomputes the
    softmax, so no fp32 copy of the logits is kept for it (:func:`megatron_qrm.rl.kl.vocab_parallel_entropy_recomputed`)."""
    if grad:
        ent = vocab_parallel_entropy_recomputed(local_logits, vocab_size, group)
    else:
        ent = vocab_parallel_entropy_no_grad(local_logits, vocab_size, group)
    return unpack(ent, batch)
