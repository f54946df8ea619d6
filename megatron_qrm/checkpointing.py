"""Checkpoints: megatron-core dist_checkpointing, written atomically, with a ``latest`` marker.

Layout of a save directory::

    SAVE/latest                   text file naming the newest complete checkpoint ("iter_0000020")
    SAVE/iter_0000020/            dist_checkpointing directory (any TP/PP can load it) plus
        qrm_config.json           model config, role, tokenizer, LoRA, run settings (needs no size flags)
    SAVE/iter_0000030.tmp/        a save in progress: never loaded, removed by the next save

A checkpoint is written under ``<name>.tmp`` and renamed only after every rank finished writing, then
``latest`` is replaced with ``os.replace``; a run killed at any moment leaves the previous checkpoint
as latest.

Failure handling (docs/reliability.md):

* a model with a non-finite weight, or one so large that products of two weights overflow float32
  (:func:`weight_overflow_limit`: after a diverged update, e.g. ``--lr 1e20``), is never saved
  (:class:`~megatron_qrm.errors.NonFiniteError`); the trainers also probe the model's outputs before saving
  (:meth:`megatron_qrm.training.engine.NonFiniteGuard.probe_outputs`);
* a write that fails (no space, permissions) removes its ``.tmp`` directory, leaves ``latest`` alone and
  raises :class:`~megatron_qrm.errors.CheckpointWriteError` naming the cause and, for a full disk, the
  space needed and free;
* :func:`preflight_save_dir` checks before any model is built that the directory is writable and holds
  one checkpoint (:func:`estimate_checkpoint_bytes`);
* shards are written synchronously by the calling process (:class:`SyncTorchDistSaveStrategy`):
  megatron-core's default ``torch_dist`` writer forks writer processes and starts a multiprocessing
  ``Manager`` (with its resource tracker) that outlive a SIGKILLed trainer.
"""

from __future__ import annotations

import errno
import json
import math
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
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from megatron_qrm import compat
from megatron_qrm.errors import CheckpointWriteError, NonFiniteError, OutputWriteError, UserError, UserFileNotFoundError

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


def resolve_or_fail(path: str, flag: str = "--load") -> str:
    """:func:`resolve_checkpoint`, once, raising ``FileNotFoundError`` naming ``flag`` when there is none.

    Readers (eval-rm, eval-policy, RL) resolve ``latest`` ONCE with this and then read the config, load
    the weights and name their outputs from the returned directory, so that a trainer writing a newer
    checkpoint meanwhile cannot make them report one checkpoint and evaluate another.
    """
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise UserFileNotFoundError(f"{flag} {path}: no complete checkpoint there (expected {CONFIG_FILE} in it, or a "
                                    f"`{LATEST_FILE}` file naming one)")
    return resolved


#: ModelConfig fields that fix tensor shapes, with their flags: a checkpoint cannot load into another value
SIZE_FLAGS = {"num_layers": "--num-layers", "hidden_size": "--hidden-size",
              "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
              "ffn_hidden_size": "--ffn-hidden-size", "vocab_size": "--vocab-size", "qkv_bias": "--qkv-bias",
              "tie_word_embeddings": "--tie-word-embeddings"}


def check_size_flags(given, saved: dict[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming the first size flag whose value differs from the checkpoint's model config
    (``given``: the ModelConfig built from flags; ``saved``: the checkpoint's ``qrm_config.json``; ``source``:
    e.g. ``"--load SAVE"``). A vocabulary of 0 (take the tokenizer's) matches anything."""
    model = saved.get("model") or {}
    for field_name, flag in SIZE_FLAGS.items():
        mine, theirs = getattr(given, field_name, None), model.get(field_name)
        if theirs is None or mine is None or (field_name == "vocab_size" and not mine):
            continue
        differs = bool(mine) != theirs if isinstance(theirs, bool) else mine != theirs
        if differs:
            raise UserError(f"{flag} {mine} conflicts with the checkpoint ({source}), whose model has "
                            f"{field_name} = {theirs}; drop the size flags to use the checkpoint's model")


def tokenizer_record(tokenizer, tokenizer_path: str, saved: Optional[dict[str, Any]],
                     change: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``qrm_config.json`` entries about the tokenizer: its identity (vocabulary size + fingerprint, checked
    by :func:`megatron_qrm.data.tokenizer.check_tokenizer_identity`) and the list of deliberate changes
    (``--allow-tokenizer-change``) inherited from ``saved`` plus ``change``."""
    if tokenizer is None:
        return {}
    from megatron_qrm.data.tokenizer import tokenizer_identity

    changes = list((saved or {}).get("tokenizer_changes") or [])
    if change:
        changes.append(change)
    out: dict[str, Any] = {"tokenizer_identity": tokenizer_identity(tokenizer, tokenizer_path)}
    if changes:
        out["tokenizer_changes"] = changes
    return out


def read_config(ckpt_dir: str) -> dict[str, Any]:
    """The ``qrm_config.json`` of a checkpoint (directory or save dir)."""
    resolved = resolve_checkpoint(ckpt_dir)
    if resolved is None:
        raise UserFileNotFoundError(f"no complete checkpoint at {ckpt_dir!r} (--load): expected {CONFIG_FILE} "
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


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's ``torch_dist`` format (any TP/PP/DP can load it), written by the calling process.

    The stock strategy hands its shards to ``FileSystemWriterAsync``, which even for a synchronous save
    forks one writer process per shard file and routes results through a ``multiprocessing.Manager``
    (a spawned server process with a resource tracker, kept for the life of the trainer). A SIGKILLed
    trainer leaves those behind. Here torch's own ``FileSystemWriter`` writes the same files (same
    planner, same metadata) from this process: no child process exists at any time.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        pyt_state = mcore_to_pyt_state_dict(state, False)
        dcp_save(pyt_state, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                          flatten_state_dict=False))


def count_nonfinite(model) -> tuple[int, int, int]:
    """(non-finite, total, trainable) parameter elements of ``model`` summed over its model-parallel
    (TP x PP) ranks. Collective. Parameters replicated over TP (norms) are counted once per TP rank."""
    module = model.module if hasattr(model, "module") else model
    bad = total = trainable = 0
    for p in module.parameters():
        bad += int((~torch.isfinite(p.detach())).sum())
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    t = torch.tensor([float(bad), float(total), float(trainable)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_qrm import parallel

        parallel.all_reduce_host(t, group=ps.get_model_parallel_group())
    return int(t[0]), int(t[1]), int(t[2])


def weight_overflow_limit(hidden_size: int) -> float:
    """The largest |weight| whose products stay representable: two such weights over ``hidden_size`` terms
    (a dot product, e.g. an attention score ``q . k``) reach ``w**2 * hidden_size``, which must stay below
    float32's (and bfloat16's) maximum, 3.4e38. A model with a larger weight overflows on ordinary inputs."""
    return math.sqrt(torch.finfo(torch.float32).max / max(int(hidden_size), 1))


def weight_abs_max(model) -> float:
    """Largest |weight| of ``model`` over its model-parallel (TP x PP) ranks (NaN if any weight is NaN).
    Collective over the model-parallel group."""
    module = model.module if hasattr(model, "module") else model
    maxima = [p.detach().abs().max().float() for p in module.parameters() if p.numel()]  # on the device: one sync
    m = (torch.stack(maxima).max() if maxima else torch.zeros(())).double().cpu().reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_qrm import parallel

        parallel.all_reduce_host(m, op=dist.ReduceOp.MAX, group=ps.get_model_parallel_group())
    return float(m.item())


def estimate_checkpoint_bytes(model_cfg, role: str, *, lora_rank: int = 0, bf16: bool = False,
                              with_optimizer: bool = True) -> int:
    """Bytes of one checkpoint: weights (bf16 or fp32, padded vocabulary) plus, when training, the optimizer
    state megatron-core saves per trainable parameter: an fp32 copy of the parameter and Adam's two fp32
    moments (12 bytes, in fp32 runs too). Metadata and RNG states (kilobytes) are ignored."""
    from megatron_qrm.planning.params import stage_parameters

    sp = stage_parameters(model_cfg, role, 1, 1, 0, lora_rank=lora_rank)
    weights = sp.total * (2 if bf16 else 4)
    optim = sp.trainable * 12 if with_optimizer else 0
    return weights + optim


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _free_bytes(path: str) -> int:
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe or ".").free


def preflight_save_dir(path: Optional[str], flag: str, needed_bytes: int = 0) -> None:
    """Before any model is built: ``path`` can be created and written, and (``needed_bytes``) its file
    system has room for one checkpoint. Raises ``ValueError`` naming ``flag``. Writes nothing that stays."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".qrm_write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: not writable ({e.strerror or e}); choose a writable directory") from None
    if needed_bytes:
        free = _free_bytes(path)
        if free < needed_bytes:
            raise UserError(f"{flag} {path}: no space left on device for one checkpoint: needed ~{_gb(needed_bytes)}, "
                            f"free {_gb(free)}")


def write_file_atomically(path: str, write, what: str) -> None:
    """Write a result file whole or not at all, as checkpoints are: ``write(f)`` fills a temporary file beside
    ``path`` (same file system), which is fsynced and renamed over ``path`` (``os.replace``, atomic). On any
    ``OSError`` (a full disk, permissions) the temporary file is removed, ``path`` is left as it was, and
    :class:`~megatron_qrm.errors.OutputWriteError` names ``what`` (e.g. ``--output``), the path and the cause.
    """
    path = os.path.abspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = ("no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                 else "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e)))
        raise OutputWriteError(f"{what} {path}: could not be written: {cause}; nothing was written there") from None


def _is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it wraps, incl. torch.distributed.checkpoint's per-rank failures) is a
    full disk. torch's zip writer reports ENOSPC as ``unexpected pos N vs M`` without the errno."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "ENOSPC" in text or "unexpected pos" in text:
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: exception}
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
    return False


def _checkpoint_write_error(exc: BaseException, save_dir: str, tmp: str, iteration: int,
                            expected_bytes: int) -> CheckpointWriteError:
    try:
        written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
    except OSError:
        written = 0
    shutil.rmtree(tmp, ignore_errors=True)
    marker = os.path.join(save_dir, LATEST_FILE)
    kept = open(marker).read().strip() if os.path.exists(marker) else None
    keep = f"`latest` still names {kept}" if kept else "no earlier checkpoint exists"
    where = f"saving checkpoint {iter_dir_name(iteration)} to {save_dir} (--save)"
    if _is_no_space(exc):
        needed = max(expected_bytes, written)
        return CheckpointWriteError(f"{where} failed: no space left on device: needed ~{_gb(needed)}, free "
                                    f"{_gb(_free_bytes(save_dir))}; {keep}")
    if isinstance(exc, PermissionError) or "Permission denied" in str(exc):
        return CheckpointWriteError(f"{where} failed: permission denied; {keep}")
    return CheckpointWriteError(f"{where} failed: {type(exc).__name__}: {exc}; {keep}")


def save_checkpoint(save_dir: str, iteration: int, model, config: dict[str, Any], *, optimizer=None,
                    scheduler=None, train_state: Optional[TrainState] = None,
                    extra_files: Optional[dict[str, Any]] = None, keep_last: Optional[int] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``extra_files``: name -> object saved with ``torch.save`` by the global rank 0 of each pipeline
    stage that holds it (e.g. cached reference log-probs on the last stage).
    """
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = final + ".tmp"
    bad, total, trainable = count_nonfinite(model)
    expected_bytes = total * 4 + (trainable * 12 if optimizer is not None else 0)  # see estimate_checkpoint_bytes
    module = model.module if hasattr(model, "module") else model
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    scale = weight_abs_max(model) if hidden and not bad else 0.0
    if bad or (hidden and scale > weight_overflow_limit(hidden)):
        marker = os.path.join(save_dir, LATEST_FILE)
        kept = open(marker).read().strip() if os.path.exists(marker) else "nothing"
        what = (f"{bad:,} of {total:,} weights are not finite" if bad else
                f"the largest weight magnitude is {scale:.3g}, where products of two weights overflow float32 "
                f"(above {weight_overflow_limit(hidden):.3g})")
        raise NonFiniteError(f"iteration {iteration}: {what}: not saving {iter_dir_name(iteration)} (`latest` in "
                             f"{save_dir} still names {kept})")
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a run killed while saving
        os.makedirs(tmp)
    dist.barrier()
    error: Optional[BaseException] = None
    try:
        _write_checkpoint(tmp, model, optimizer, scheduler, train_state, extra_files)
    # torch.distributed.checkpoint reports a rank's write failure as CheckpointException, a BaseException
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - mapped to a message naming the cause
        error = e
    failed = torch.tensor([0.0 if error is None else 1.0])
    if dist.get_world_size() > 1:
        from megatron_qrm import parallel

        parallel.all_reduce_host(failed, op=dist.ReduceOp.MAX)
    if float(failed) > 0:
        cause = error if error is not None else RuntimeError("another rank failed to write its shards")
        raise _checkpoint_write_error(cause, save_dir, tmp, iteration, expected_bytes) from error

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


def _write_checkpoint(tmp: str, model, optimizer, scheduler, train_state, extra_files) -> None:
    model_sd = _model_sharded_state_dict(model)
    state: dict[str, Any] = {"model": model_sd, "rng_state": _rng_sharded_object()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if train_state is not None:
        state["train_state"] = train_state.to_dict()
    dist_checkpointing.save(state, tmp, sharded_strategy=SyncTorchDistSaveStrategy())
    if dist.get_rank() == 0:
        compat.write_legacy_common_state(tmp)  # megatron-core 0.16 can then load what 0.19 wrote
    if extra_files and ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0:
        for name, obj in extra_files.items():
            if obj is not None:
                torch.save(obj, os.path.join(tmp, name))


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
        raise UserFileNotFoundError(f"no complete checkpoint at {load_dir} (removed after it was chosen, e.g. pruned "
                                    "by a running trainer's --keep-last? run again to use the newest)")
    model_sd = _model_sharded_state_dict(model)
    if model_key_filter is not None:
        model_sd = {k: v for k, v in model_sd.items() if model_key_filter(k)}
    request: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
    if load_rng:
        request["rng_state"] = _rng_sharded_object()
    try:
        loaded = dist_checkpointing.load(request, ckpt)
    except (Exception, CheckpointException):
        if not _is_complete(ckpt):  # removed (e.g. pruned by a trainer's --keep-last) after it was chosen
            raise UserFileNotFoundError(f"checkpoint {ckpt} was removed while it was being loaded (a running "
                                        "trainer's --keep-last pruning it?); run again to use the newest") from None
        raise
    module = model.module if hasattr(model, "module") else model
    missing, unexpected = module.load_state_dict(loaded["model"], strict=False)
    if strict and model_key_filter is None and missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks model tensors: {missing[:5]}...")
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        report_schedule_choice(scheduler, loaded["scheduler"], ckpt)
        scheduler.load_state_dict(loaded["scheduler"])
        if scheduler.override_opt_param_scheduler:
            # megatron-core's scheduler takes each parameter group's own max_lr / min_lr (restored with the
            # optimizer state, i.e. the checkpoint's) before its own: the flags' values go there too
            for group in scheduler.optimizer.param_groups:
                group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
            scheduler.step(increment=0)
    if load_rng and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    ts = loaded.get("train_state")
    return ckpt, (TrainState(**ts) if ts is not None else None)


#: megatron-core OptimizerParamScheduler fields a resume compares with the checkpoint's, with their flags
_SCHEDULE_FIELDS = (("max_lr", ("max_lr", "start_lr"), "--lr", "learning rate"),
                    ("min_lr", ("min_lr",), "--min-lr", "minimum learning rate"),
                    ("lr_warmup_steps", ("lr_warmup_steps", "warmup_steps", "warmup_iter"), "--lr-warmup-iters",
                     "warmup iterations"),
                    ("lr_decay_style", ("lr_decay_style", "decay_style"), "--lr-decay-style", "decay style"),
                    ("lr_decay_steps", ("lr_decay_steps", "decay_steps", "end_iter"), "--lr-decay-iters (or "
                     "--train-iters)", "decay iterations"),
                    ("start_wd", ("start_wd",), "--weight-decay", "weight decay"))


def report_schedule_choice(scheduler, saved: dict, ckpt: str) -> None:
    """Say in one line which value wins where the learning-rate schedule of the flags differs from the
    checkpoint's (Megatron's convention): ``--override-opt-param-scheduler``: the flags; otherwise the
    checkpoint's (megatron-core's ``use_checkpoint_opt_param_scheduler``), silently only with
    ``--use-checkpoint-opt-param-scheduler``. Decay iterations matter only to a decaying schedule (a longer
    ``--train-iters`` on resume changes nothing under the constant default)."""
    import logging

    diffs = []
    for attr, keys, flag, what in _SCHEDULE_FIELDS:
        theirs = next((saved[k] for k in keys if k in saved), None)
        mine = getattr(scheduler, attr, None)
        if theirs is None or mine is None or mine == theirs:
            continue
        if attr == "lr_decay_steps" and scheduler.lr_decay_style == "constant" == saved.get("lr_decay_style",
                                                                                              "constant"):
            continue
        diffs.append((flag, what, mine, theirs))
    if not diffs or dist.get_rank() != 0:
        return
    flags = ", ".join(f"{flag} {mine}" for flag, _, mine, _ in diffs)
    theirs = ", ".join(f"{what} {value}" for _, what, _, value in diffs)
    log = logging.getLogger("megatron_qrm")
    if scheduler.override_opt_param_scheduler:
        log.info(f"resume: the flags' learning-rate schedule ({flags}) replaces the checkpoint's ({theirs}) "
                 "(--override-opt-param-scheduler)")
    elif scheduler.use_checkpoint_opt_param_scheduler and getattr(scheduler, "qrm_use_checkpoint_flag", False):
        log.info(f"resume: the checkpoint's learning-rate schedule ({theirs}) is kept, not {flags} "
                 "(--use-checkpoint-opt-param-scheduler)")
    else:
        log.warning(f"resume: the checkpoint's learning-rate schedule ({theirs} in {ckpt}) is kept, not {flags}; "
                    "pass --override-opt-param-scheduler to use the flags' values "
                    "(--use-checkpoint-opt-param-scheduler keeps the checkpoint's without this warning)")


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
