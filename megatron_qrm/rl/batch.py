"""The experience of one RL iteration on one data-parallel rank: :class:`Experience`, filled in stages.

1. rollout (:meth:`Experience.from_rollouts`): the sampled sequences and the sampler's log-probs;
2. scoring (the trainer's ``score``, last pipeline stage): ``logp_old``, ``logp_ref``, ``kl``, ``credits``,
   ``values``;
3. advantages (the run's estimator, :mod:`megatron_qrm.rl.estimators`): ``advantages``, ``returns``;
4. the update (:mod:`megatron_qrm.rl.update_batching`) cuts :data:`UPDATE_FIELDS` into micro-batches.

Every per-token tensor is ``[N, L]`` (``N`` sequences of this rank, right-padded to ``L`` columns) and indexed by
the POSITION of the token it describes: ``logp_old[b, p] = log pi(tokens[b, p] | tokens[b, :p])``,
``action_mask[b, p] = 1`` where ``tokens[b, p]`` was generated (the stop token included). Scores exist on the
last pipeline stage only: elsewhere they stay None (nothing there reads them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from megatron.core import parallel_state as ps

from megatron_qrm import parallel
from megatron_qrm.rl.rollout import Rollout

#: the fields the actor / critic updates read (those that are None are left out of the micro-batches)
UPDATE_FIELDS = ("tokens", "position_ids", "action_mask", "logp_old", "advantages", "returns", "values",
                 "behaviour_logp")


@dataclass
class Experience:
    """One rank's rollout batch and what is computed from it (see the module docstring).

    A read-only mapping view (``exp["tokens"]``, ``exp.get("values")``) serves code written against rows of
    named tensors: rule-based reward functions, the scoring passes, micro-batching.
    """

    tokens: torch.Tensor
    """``[N, L]`` long: prompt + response, right-padded with the tokenizer's pad id."""
    position_ids: torch.Tensor
    """``[N, L]`` long: 0..L-1 per row."""
    action_mask: torch.Tensor
    """``[N, L]`` float: 1.0 at generated tokens."""
    behaviour_logp: torch.Tensor
    """``[N, L]`` float: the rollout engine's log-prob of each generated token (0 elsewhere)."""
    prompt_lens: torch.Tensor
    """``[N]`` long."""
    response_lens: torch.Tensor
    """``[N]`` long: generated tokens, the stop token included."""
    finished: torch.Tensor
    """``[N]`` bool: the response ended with a stop token (else it was cut)."""
    prompt_index: torch.Tensor
    """``[N]`` long: each row's prompt in the prompt dataset."""
    logp_old: Optional[torch.Tensor] = None
    """``[N, L]``: the actor's log-probs recomputed by the trainer (PPO's pi_old)."""
    logp_ref: Optional[torch.Tensor] = None
    """``[N, L]``: the reference model's log-probs (PPO with a KL term)."""
    kl: Optional[torch.Tensor] = None
    """``[N, L]``: KL(pi || pi_ref) at the state before each action."""
    credits: Optional[torch.Tensor] = None
    """``[N, L]``: the reward model's token credits (ORM: its score on the last token)."""
    values: Optional[torch.Tensor] = None
    """``[N, L]``: the critic's V(s_t) for the action at t."""
    advantages: Optional[torch.Tensor] = None
    """``[N, L]``: the estimator's advantages."""
    returns: Optional[torch.Tensor] = None
    """``[N, L]``: the critic's targets (REINFORCE: the token returns)."""

    @classmethod
    def from_rollouts(cls, parts: Sequence[Rollout], prompt_index: torch.Tensor, pad_id: int) -> "Experience":
        """Concatenate generation calls' rollouts (each right-padded to its own length) into one batch."""
        length = max(r.tokens.shape[1] for r in parts)

        def cat(tensors, value):
            return torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value) for t in tensors])

        tokens = cat([r.tokens for r in parts], pad_id)
        return cls(tokens=tokens, position_ids=torch.arange(length).expand(tokens.shape[0], length).contiguous(),
                   action_mask=cat([r.action_mask for r in parts], 0.0),
                   behaviour_logp=cat([r.logprobs for r in parts], 0.0),
                   prompt_lens=torch.cat([r.prompt_lens for r in parts]),
                   response_lens=torch.cat([r.response_lens for r in parts]),
                   finished=torch.cat([r.finished for r in parts]), prompt_index=torch.as_tensor(prompt_index))

    # ---- the mapping view
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in _FIELD_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name, default) if name in _FIELD_NAMES else default

    def keys(self) -> Iterator[str]:
        return (name for name in _FIELD_NAMES if getattr(self, name) is not None)

    def __contains__(self, name: object) -> bool:
        return name in _FIELD_NAMES and getattr(self, name) is not None


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Experience))


def gather_rows_over_dp(t: torch.Tensor) -> torch.Tensor:
    """All rows of a per-rank ``[n, L]`` tensor from every data-parallel rank, ``[sum n, max L]`` (rows padded
    with zeros to the longest rank's columns). Collective over the data-parallel group."""
    group = ps.get_data_parallel_group()
    size = ps.get_data_parallel_world_size()
    if size == 1:
        return t
    shape = torch.tensor([t.shape[0], t.shape[1]])
    shapes = parallel.all_gather_host(shape, group=group)
    n_max, l_max = int(max(s[0] for s in shapes)), int(max(s[1] for s in shapes))
    padded = torch.zeros(n_max, l_max, dtype=t.dtype)
    padded[: t.shape[0], : t.shape[1]] = t
    out = parallel.all_gather_host(padded, group=group)
    return torch.cat([o[: int(s[0])] for o, s in zip(out, shapes)])
