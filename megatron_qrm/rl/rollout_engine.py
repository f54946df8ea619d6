"""Where rollouts are sampled: the project's own decoder or vLLM (``--rollout-engine {megatron,vllm}``).

One small interface, used by the RL trainer and ``qrm eval-policy``:

* ``generate(prompts, sampling, *, seed, max_length) -> Rollout`` -- one response per prompt (the trainer
  repeats prompts for several samples, so both engines see the same rows);
* ``refit(model, version)`` -- make the engine sample from ``model``'s current weights, recorded as
  ``version`` (the trainer passes its iteration); ``generate`` then refuses to run on another version
  (:class:`megatron_qrm.rl.vllm_engine.StaleWeightsError`).

:class:`MegatronRolloutEngine` wraps :func:`megatron_qrm.rl.rollout.generate` on the policy itself (refit
only records the version: it always samples the live weights). :class:`VLLMRolloutEngine` keeps an
in-process vLLM engine (:mod:`megatron_qrm.rl.vllm_engine`) refitted from the policy with
:func:`megatron_qrm.conversion.streaming.iter_hf_weights`.

Layout: the vLLM engine lives on the first rank of the policy's model-parallel group (where the streamed
weights land) and samples for it; the Rollout is broadcast to the other ranks of the group (one engine per
data-parallel replica). In a single-process run the engine is in-process; in a multi-process run (whose
torch.distributed world vLLM cannot join) its engine core is a child process of that rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import parallel
from megatron_qrm.config import ModelConfig
from megatron_qrm.rl.rollout import Rollout, SamplingConfig, generate
from megatron_qrm.rl.vllm_engine import StaleWeightsError

ENGINES = ("megatron", "vllm")
__all__ = ["ENGINES", "MegatronRolloutEngine", "StaleWeightsError", "VLLMRolloutEngine", "build_rollout_engine"]


class MegatronRolloutEngine:
    """The project's KV-cache decoder on the live policy (collective over its TP/PP group)."""

    name = "megatron"

    def __init__(self, model, *, eos_id: int, pad_id: int, vocab_size: int):
        self.model, self.eos_id, self.pad_id, self.vocab_size = model, eos_id, pad_id, vocab_size
        self.weight_version: Optional[int] = None

    def refit(self, model, version: int) -> None:
        self.model, self.weight_version = model, int(version)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int, max_length: int,
                 expected_version: Optional[int] = None) -> Rollout:
        if expected_version is not None and self.weight_version != expected_version:
            raise StaleWeightsError(f"rollout engine at weight version {self.weight_version}, expected "
                                    f"{expected_version} (refit skipped)")
        from megatron_qrm.conversion.streaming import unwrap

        return generate(unwrap(self.model), prompts, sampling, eos_id=self.eos_id, pad_id=self.pad_id,
                        vocab_size=self.vocab_size, max_length=max_length, seed=seed)

    def sleep(self) -> None:
        pass

    def close(self) -> None:
        pass


class VLLMRolloutEngine:
    """vLLM on the model-parallel group's first rank; refit streams the policy's weights to it."""

    name = "vllm"

    def __init__(self, model_cfg: ModelConfig, *, eos_id: int, pad_id: int, max_length: int,
                 dtype: torch.dtype = torch.float32, engine_cfg=None):
        from megatron.core import parallel_state as ps

        from megatron_qrm.rl.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise RuntimeError("--rollout-engine vllm: vLLM is not installed in this environment; run "
                               "tools/install_vllm.sh (see docs/vllm.md) or use --rollout-engine megatron")
        self.model_cfg = model_cfg
        self.owner = dist.get_rank(ps.get_model_parallel_group()) == 0
        single = dist.get_world_size() == 1  # else the engine core runs in a child process (VLLMEngine)
        self.engine = (VLLMEngine(model_cfg, max_model_len=max_length, eos_id=eos_id, pad_id=pad_id, dtype=dtype,
                                  cfg=engine_cfg, in_process=single) if self.owner else None)
        self.weight_version: Optional[int] = None

    def refit(self, model, version: int) -> None:
        """Collective over the model-parallel group (the weights are gathered from every shard)."""
        from megatron_qrm.conversion.streaming import iter_hf_weights

        stream = iter_hf_weights(model, self.model_cfg)
        if self.engine is not None:
            self.engine.wake_for_refit()
            self.engine.refit(stream, version)
            self.engine.wake_kv_cache()
        else:
            for _ in stream:  # the other ranks only take part in the gathers
                pass
        self.weight_version = int(version)

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, seed: int, max_length: int,
                 expected_version: Optional[int] = None) -> Rollout:
        rollout = None
        if self.engine is not None:
            rollout = self.engine.generate(prompts, sampling, seed=seed, max_length=max_length,
                                           expected_version=expected_version)
        return _broadcast_rollout(rollout)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _broadcast_rollout(rollout: Optional[Rollout]) -> Rollout:
    """The owner's Rollout on every rank of its model-parallel group (a no-op in a group of one)."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group() if dist.is_initialized() else None
    if group is None or dist.get_world_size(group) == 1:
        return rollout
    box = [rollout]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[0], group=group)
    return box[0]


def build_rollout_engine(kind: str, model, model_cfg: ModelConfig, *, eos_id: int, pad_id: int, vocab_size: int,
                         max_length: int, dtype: torch.dtype = torch.float32, engine_cfg=None, version: int = 0):
    """``kind`` megatron | vllm, refitted from ``model`` (as weight ``version``) before it returns."""
    if kind == "megatron":
        eng = MegatronRolloutEngine(model, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size)
    elif kind == "vllm":
        eng = VLLMRolloutEngine(model_cfg, eos_id=eos_id, pad_id=pad_id, max_length=max_length, dtype=dtype,
                                engine_cfg=engine_cfg)
    else:
        raise ValueError(f"--rollout-engine {kind!r}: expected one of {', '.join(ENGINES)}")
    eng.refit(model, version)
    return eng


def logprob_mismatch(exp) -> dict[str, float]:
    """Mean and max ``|behaviour log-prob (rollout engine) - recomputed logp_old (trainer)|`` over the response
    tokens of every data-parallel rank (``exp``: an :class:`~megatron_qrm.rl.batch.Experience`; computed on the
    last pipeline stage, where ``logp_old`` exists: ``{}`` elsewhere). The training-inference mismatch metric."""
    if exp.get("logp_old") is None:
        return {}
    m = exp["action_mask"] > 0
    d = (exp["behaviour_logp"] - exp["logp_old"]).abs()[m].double()
    t = torch.tensor([float(d.sum()), float(m.sum())], dtype=torch.float64)
    mx = torch.tensor([float(d.max()) if d.numel() else 0.0], dtype=torch.float64)
    if ps.get_data_parallel_world_size() > 1:
        parallel.all_reduce_host(t, group=ps.get_data_parallel_group())
        parallel.all_reduce_host(mx, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    return {"rollout_logp_diff_mean": float(t[0] / t[1].clamp(min=1)), "rollout_logp_diff_max": float(mx[0])}
