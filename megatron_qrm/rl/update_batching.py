"""Micro-batches of the PPO / REINFORCE actor and critic updates, padded or packed.

The rollout rows ``exp[k]`` are right-padded ``[n, L]`` (prompt + response). An optimizer step takes
``rows`` (this rank's share of one global batch) and cuts them into micro-batches:

* padded (``pack_capacity`` None): ``micro_batch_size`` rows each, as they lie;
* packed: first-fit-decreasing by real length (prompt + response) into micro-batches of at most
  ``pack_capacity`` tokens, each one THD stream (:func:`megatron_qrm.data.packing.pack_collated`) whose
  per-token rollout tensors (``action_mask``, ``logp_old``, ``advantages``, ...) stay in the row layout
  ``[N, S]``; :func:`update_forward_step` gathers the model output (and the tokens) back to that layout
  before the loss, so the actor / critic losses are the unpacked functions on the same numbers.

Losses return token sums and counts (``calculate_per_token_loss``), so the global batch's mean is the same
whichever way its rows are grouped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_qrm.data.packing import first_fit_decreasing, pack_collated, packed_seq_params, unpack
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
    """megatron-core forward step for an update: ``loss_fn(output [N, S, ...], batch)`` sees the row layout
    (for a packed batch: the output and ``tokens`` gathered back from the stream)."""

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        out = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                    packed_seq_params=packed_seq_params(batch))
        if packed_seq_params(batch) is None:
            return out, lambda output: loss_fn(output, batch)
        rows = dict(batch, tokens=unpack(batch["tokens"], batch))
        return out, lambda output: loss_fn(unpack(output, batch), rows)

    return forward_step
