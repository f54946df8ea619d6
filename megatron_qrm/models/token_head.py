"""The token head: a linear map hidden -> 1 (no bias) applied at every position.

It stands in GPTModel's ``output_layer`` slot on the last pipeline stage, so GPTModel's own
post-processing returns ``[b, s, 1]`` scores instead of ``[b, s, vocab]`` logits. For a Q-RM the score
at the position of response token a_t is the token credit Z(s_t, a_t); for a critic it is V.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

TOKEN_HEAD_KEY = "token_head.weight"


class TokenHead(MegatronModule):
    """Replicated on every TP rank; ``weight`` is [1, hidden].

    With sequence parallelism the final hidden states arrive split along the sequence, so they are
    gathered first; every rank then holds the full sequence and computes the same scores, and the
    backward only keeps the local slice (``tensor_parallel_output_grad=False``) because the gradient
    is already complete on each rank.
    """

    def __init__(self, config, hidden_size: int, seed: int = 1234):
        super().__init__(config=config)
        # Same init as torch.nn.Linear (what the reference's v_head uses): U(-1/sqrt(h), 1/sqrt(h)),
        # from its own generator so every TP/PP layout starts from the same head.
        bound = hidden_size**-0.5
        gen = torch.Generator().manual_seed(seed)
        init = (torch.rand(1, hidden_size, generator=gen) * 2 - 1) * bound
        self.weight = torch.nn.Parameter(init.to(dtype=config.params_dtype, device=_init_device(config)))
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        """hidden_states [s, b, h] (or [s/tp, b, h] under SP) -> (scores [s, b, 1], None)."""
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        scores = torch.nn.functional.linear(hidden_states, self.weight.to(hidden_states.dtype))
        return scores, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        # Saved under its own key (not output_layer.weight) so a policy's LM head and a reward head
        # can never be confused when a checkpoint is loaded into the other role.
        key_prefix = prefix[: -len("output_layer.")] if prefix.endswith("output_layer.") else prefix
        sharded = make_sharded_tensors_for_checkpoint({"token_head.weight": self.weight}, key_prefix, {},
                                                      sharded_offsets)
        # GPTModel looks the entry up as `output_layer.weight`; only the checkpoint key differs.
        return {f"{prefix}weight": sharded[f"{key_prefix}token_head.weight"]}


def _init_device(config) -> torch.device:
    return torch.device("cpu") if config.use_cpu_initialization else torch.device("cuda", torch.cuda.current_device())
