"""Per-token quantities of a rollout, computed with megatron-core's forward-only schedule.

Every tensor is [N, L] and indexed by the position of the token it describes (see
:mod:`megatron_qrm.rl.rollout`): ``logp[:, p] = log pi(tokens[:, p] | tokens[:, :p])``; the Q-RM credit
Z(s_t, a_t) is the reward head's output AT the action's position p; the critic's V(s_t) is its head
output at p - 1 (the state before the action). Results exist on the last pipeline stage (``None``
elsewhere), which is also where the update's loss functions run.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_qrm.rl.kl import vocab_parallel_full_kl
from megatron_qrm.training.engine import run_global_batch, to_device

PADDED_VOCAB_LOGIT = -1e9  # padded vocabulary entries never get probability mass


def mask_padded_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Local logits [b, s, V/tp] (fp32) with the TP-padding columns (global id >= vocab_size) masked."""
    per_rank = local_logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * per_rank
    if start + per_rank <= vocab_size:
        return local_logits
    ids = torch.arange(start, start + per_rank, device=local_logits.device)
    return local_logits.masked_fill(ids >= vocab_size, PADDED_VOCAB_LOGIT)


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """[b, s] values about the NEXT token (computed at p) -> indexed by that token's position (p+1)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def token_logprobs(local_logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Position-aligned log-probs [b, s] of ``tokens`` from vocab-parallel logits [b, s, V/tp]."""
    logits = mask_padded_vocab(local_logits.float(), vocab_size)
    labels = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)
    # megatron's kernel works on [s, b, v] and modifies nothing we keep
    nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels.t().contiguous()).t()
    return shift_right(-nll)


def _batches(exp: dict[str, torch.Tensor], micro_batch_size: int, keys=("tokens", "position_ids")) -> list[dict]:
    n = exp["tokens"].shape[0]
    return [{k: exp[k][i:i + micro_batch_size] for k in keys} | {"rows": torch.arange(i, min(i + micro_batch_size, n))}
            for i in range(0, n, micro_batch_size)]


def forward_collect(model, batches: list[dict], compute: Callable[[torch.Tensor, dict], dict]) -> list[dict]:
    """Forward-only pass over ``batches``; ``compute(output, batch)`` runs on the last stage and its
    dicts (detached tensors) are returned there (an empty list elsewhere)."""

    def forward_step(data_iterator, m):
        batch = to_device(next(data_iterator))
        out = m(batch["tokens"], batch["position_ids"], attention_mask=None)

        def loss_func(output):
            with torch.no_grad():
                res = compute(output, batch)
            return torch.zeros((), device=output.device), torch.zeros((), dtype=torch.int), res

        return out, loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        outs = run_global_batch(model, forward_step, batches, forward_only=True)
    if was_training:
        model.train()
    return outs


def _assemble(outs: list[dict], key: str, n: int, length: int) -> Optional[torch.Tensor]:
    if not outs:
        return None
    full = torch.zeros(n, length, dtype=torch.float32)
    for o in outs:
        full[o["rows"].cpu()] = o[key].float().cpu()
    return full


def policy_logprobs(model, exp: dict, micro_batch_size: int, vocab_size: int) -> Optional[torch.Tensor]:
    """Teacher-forced log-probs [N, L] of the rollout tokens under ``model``."""
    n, length = exp["tokens"].shape
    outs = forward_collect(model, _batches(exp, micro_batch_size),
                           lambda out, b: {"logp": token_logprobs(out, b["tokens"], vocab_size), "rows": b["rows"]})
    return _assemble(outs, "logp", n, length)


def policy_logprobs_and_full_kl(actor, reference, exp: dict, micro_batch_size: int, vocab_size: int):
    """(actor log-probs, reference log-probs, KL(pi_actor(.|s_t) || pi_ref(.|s_t))), each [N, L].

    The KL of the state before the action at p uses both models' full next-token distributions at
    p - 1, over vocab-parallel logits (never gathered). One micro-batch at a time: the actor's local
    logits are kept only until the reference's arrive.
    """
    n, length = exp["tokens"].shape
    tp_group = ps.get_tensor_model_parallel_group()
    logp, logp_ref, kl = [], [], []
    for batch in _batches(exp, micro_batch_size):
        stash = {}

        def actor_fn(out, b):
            stash["logits"] = mask_padded_vocab(out.float(), vocab_size)
            return {"logp": token_logprobs(out, b["tokens"], vocab_size), "rows": b["rows"]}

        def ref_fn(out, b):
            ref_logits = mask_padded_vocab(out.float(), vocab_size)
            kl_next = vocab_parallel_full_kl(stash.pop("logits"), ref_logits, tp_group)
            return {"logp": token_logprobs(out, b["tokens"], vocab_size), "kl": shift_right(kl_next),
                    "rows": b["rows"]}

        logp += forward_collect(actor, [batch], actor_fn)
        ref_out = forward_collect(reference, [batch], ref_fn)
        logp_ref += ref_out
        kl += ref_out
    return _assemble(logp, "logp", n, length), _assemble(logp_ref, "logp", n, length), _assemble(kl, "kl", n, length)


def head_scores(model, exp: dict, micro_batch_size: int, shift_to_state: bool) -> Optional[torch.Tensor]:
    """Token-head outputs [N, L]: at the action's own position (Q-RM credit Z, ``shift_to_state``
    False) or at the position before it (critic V(s_t), ``shift_to_state`` True)."""
    n, length = exp["tokens"].shape

    def fn(out, b):
        s = out.squeeze(-1).float()
        return {"v": shift_right(s) if shift_to_state else s, "rows": b["rows"]}

    return _assemble(forward_collect(model, _batches(exp, micro_batch_size), fn), "v", n, length)
