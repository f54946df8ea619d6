"""Checkpoints: megatron-core dist_checkpointing, written atomically, with a ``latest`` marker.

Layout of a save directory::

    SAVE/latest                   text file naming the newest complete checkpoint ("iter_0000020")
    SAVE/iter_0000020/            dist_checkpointing directory (any TP/PP can load it) plus
        qrm_config.json           model config, role, tokenizer, LoRA, run settings (needs no size flags)
    SAVE/iter_0000030.tmp/        a save in progress: never loaded, removed by the next save

A checkpoint is written under ``<name>.tmp`` and renamed only after every rank finished writing, then
``latest`` is replaced with ``os.replace``; a run killed at any moment leaves the previous checkpoint
as latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

CONFIG_FILE = "qrm_config.json"
# Optimizer state as per-bucket shards: parallel save/load; resuming with another DP size works, with
# another TP/PP it does not (model weights reshard freely; start a new run with --pretrained-checkpoint).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
LATEST_FILE = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _is_complete(path: str) -> bool:
    # normpath: "iter_0000030.tmp/" (a trailing slash) is still a save in progress
    return (os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE))
            and not os.path.normpath(path).endswith(".tmp"))


def resolve_checkpoint(path: str) -> Optional[str]:
    """Directory of the checkpoint to load from ``path``: a save dir (its ``latest``, else its newest
    complete ``iter_*``), or a checkpoint directory itself. ``None`` when there is none yet."""
    if _is_complete(path):
        return path
    if not os.path.isdir(path):
        return None
    marker = os.path.join(path, LATEST_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            name = f.read().strip()
        if _is_complete(os.path.join(path, name)):
            return os.path.join(path, name)
    done = sorted(d for d in os.listdir(path) if _ITER_RE.match(d) and _is_complete(os.path.join(path, d)))
    return os.path.join(path, done[-1]) if done else None


def read_config(ckpt_dir: str) -> dict[str, Any]:
    """The ``qrm_config.json`` of a checkpoint (directory or save dir)."""
    resolved = resolve_checkpoint(ckpt_dir)
    if resolved is None:
        raise FileNotFoundError(f"no complete checkpoint at {ckpt_dir!r} (--load): expected {CONFIG_FILE} "
                                f"in it, or a `{LATEST_FILE}` file naming one")
    with open(os.path.join(resolved, CONFIG_FILE)) as f:
        config = json.load(f)
    # A path recorded relative to the checkpoint (tools/convert_hf.py import copies the tokenizer into
    # it) resolves against the checkpoint directory, so the checkpoint can be moved.
    tok = config.get("tokenizer")
    if isinstance(tok, str) and tok and not os.path.isabs(tok) and os.path.exists(os.path.join(resolved, tok)):
        config["tokenizer"] = os.path.join(os.path.abspath(resolved), tok)
    return config


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object() -> ShardedObject:
    # One RNG state per (PP, TP) position; DP replicas share it (replica_id = DP rank).
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    return ShardedObject(
        "rng_state",
        _rng_state(),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (pp, tp),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


@dataclass
class TrainState:
    """Where a run stands: enough to continue exactly where it stopped."""

    iteration: int = 0
    consumed_samples: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples}


def _model_sharded_state_dict(model) -> dict:
    module = model.module if hasattr(model, "module") else model
    return module.sharded_state_dict()


def save_checkpoint(save_dir: str, iteration: int, model, config: dict[str, Any], *, optimizer=None,
                    scheduler=None, train_state: Optional[TrainState] = None,
                    extra_files: Optional[dict[str, Any]] = None, keep_last: Optional[int] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``extra_files``: name -> object saved with ``torch.save`` by the global rank 0 of each pipeline
    stage that holds it (e.g. cached reference log-probs on the last stage).
    """
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a run killed while saving
        os.makedirs(tmp)
    dist.barrier()

    model_sd = _model_sharded_state_dict(model)
    state: dict[str, Any] = {"model": model_sd, "rng_state": _rng_sharded_object()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if train_state is not None:
        state["train_state"] = train_state.to_dict()
    dist_checkpointing.save(state, tmp)
    if extra_files and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        for name, obj in extra_files.items():
            if obj is not None:
                torch.save(obj, os.path.join(tmp, name))
    dist.barrier()

    if dist.get_rank() == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(dict(config, iteration=iteration), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        marker_tmp = os.path.join(save_dir, LATEST_FILE + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(iter_dir_name(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(save_dir, LATEST_FILE))
        if keep_last:
            _prune(save_dir, keep_last, iteration)
    dist.barrier()
    return final


def _prune(save_dir: str, keep_last: int, iteration: int) -> None:
    """Remove complete checkpoints older than the newest ``keep_last`` up to the one just saved.

    Only complete checkpoints count, and nothing newer than ``iteration`` (e.g. left by a run that was
    resumed from an earlier checkpoint) is considered: the checkpoint just saved, which ``latest`` names,
    is never removed.
    """
    current = iter_dir_name(iteration)
    done = sorted(d for d in os.listdir(save_dir)
                  if _ITER_RE.match(d) and d <= current and _is_complete(os.path.join(save_dir, d)))
    for d in done[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, d), ignore_errors=True)


def load_checkpoint(load_dir: str, model, *, optimizer=None, scheduler=None, load_rng: bool = True,
                    model_key_filter=None, strict: bool = True) -> tuple[str, Optional[TrainState]]:
    """Load model (and optionally optimizer/scheduler/RNG) state. Collective.

    ``model_key_filter(key) -> bool`` restricts which model tensors are read (e.g. a base model
    without the token head or LoRA adapters); the others keep their fresh initialisation.
    Returns (checkpoint dir, train state or None).
    """
    ckpt = resolve_checkpoint(load_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint found at {load_dir!r}")
    model_sd = _model_sharded_state_dict(model)
    if model_key_filter is not None:
        model_sd = {k: v for k, v in model_sd.items() if model_key_filter(k)}
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    if load_rng:
        request["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(request, ckpt)
    module = model.module if hasattr(model, "module") else model
    missing, unexpected = module.load_state_dict(loaded["model"], strict=False)
    if strict and model_key_filter is None and missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks model tensors: {missing[:5]}...")
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if load_rng and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    ts = loaded.get("train_state")
    return ckpt, (TrainState(**ts) if ts is not None else None)


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's state tensors (zeros, step 1) so the loader has buffers to fill in place.

    A freshly built optimizer has no state yet and megatron-core's state_dict needs one. One step
    at lr 0 with zero gradients creates it without moving any weight; the load overwrites it all.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if len(inner.state) > 0:
            continue
        saved = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, saved):
            g["lr"] = lr
        inner.zero_grad(set_to_none=True)


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """Set torch Adam's per-parameter ``step`` to the checkpoint's, one tensor per parameter.

    With torch's Adam (no TE/apex FusedAdam, e.g. on CPU) megatron-core 0.16's distributed-optimizer
    load leaves ``step`` at the pre-load value and, where it sets it, shares ONE tensor between all
    parameters, which torch then increments once per parameter. Either corrupts Adam's bias
    correction after a resume; the step count saved in the param groups is the truth.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(chained) == 1 else [loaded[i] for i in range(len(chained))]
    for opt, sd in zip(chained, states):
        groups = (sd.get("optimizer") or {}).get("param_groups") or []
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue  # fused optimizers keep their step in the param groups
        step = float(steps.pop())
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def load_extra_file(ckpt_dir: str, name: str) -> Any:
    path = os.path.join(ckpt_dir, name)
    return torch.load(path, weights_only=False) if os.path.exists(path) else None
