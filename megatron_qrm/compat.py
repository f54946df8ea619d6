"""What differs between the megatron-core releases this project runs on, kept in one place.

Tested releases (:data:`TESTED_MCORE`): megatron-core 0.16.1 (Python 3.11, torch 2.13.0 CPU build: CI)
and 0.19.2 (Python 3.12, torch 2.13.0: ``tools/check_mcore_compat.sh``, which runs the model, loss,
TP/PP-invariance, checkpoint-resume, sampling, conversion and PPO tests under it, plus a checkpoint
written by one release and resumed by the other); 0.17.1 with a smaller selection of the same tests (0.18.x
is inside the range but was not run). ``pyproject.toml`` requires the range from the oldest to the newest.
megatron-core >= 0.17 needs Python >= 3.12, so a Python 3.11 install always resolves to 0.16.x.

What moved (found by running that subset under each release and by diffing the megatron-core sources
the project calls), and where it is handled:

* DDP gradient sync (``param_and_grad_buffer.start_grad_sync``): 0.19 calls
  ``torch.cuda.current_stream().wait_event(...)`` on every sync, even without overlap (CUDA-graph
  replays). On CPU :mod:`megatron_qrm.cpu` emulates ``current_stream()`` with no-op waits (CPU work is
  synchronous); 0.16 never calls it, so the emulation is the same code on both.
* ``GPTModel.__init__`` (0.19) logs "GPTModel IS DEPRECATED ... HybridModel" once per model built (a PPO
  run builds four): GPTModel still takes bug fixes and behaves as in 0.16, so the line is filtered here
  (:func:`install_log_filters`). Moving to ``HybridModel`` is future work, not needed for 0.19.
* ``DistributedDataParallel`` (0.19) warns when ``full_param_layout`` is not passed with the distributed
  optimizer and then computes it itself, the same layout as 0.16 built (an argument 0.16 does not have):
  filtered here, and the argument is not passed, so one call serves both.
* ``StaticInferenceContext``: 0.19 builds it from ``InferenceConfig`` and drops ``from_config``; the
  constructor ``(max_batch_size, max_sequence_length)`` the sampler uses is unchanged.
* Resuming torch's Adam through the distributed optimizer: both 0.16.1 and 0.19.2 restore ``step`` as
  ONE tensor shared by every parameter (value 1), which torch then increments once per parameter;
  ``checkpointing._restore_adam_steps`` repairs it the same way on both (measured with 9 parameter
  tensors: without it the first step after a resume leaves ``step`` at 10, not 4, on both).
* Checkpoints (``torch_dist``): 0.19 stores the non-sharded ("common") state -- LR schedule, train state,
  optimizer param groups -- inside the DCP files as a ``common_state`` object, where 0.16 writes
  ``common.pt`` and, on load, requires it. 0.19 still reads ``common.pt`` when present (its legacy path).
  :func:`write_legacy_common_state` adds the file after a save whenever the release did not write it, so
  one checkpoint format serves both: a checkpoint written by either release resumes under the other
  (model, Adam state, RNG, schedule) with the losses of an uninterrupted run (``tests/test_compat.py``).
* Layer specs: 0.16 describes the local MLP as ``ModuleSpec(MLP, submodules=MLPSubmodules(...))``; 0.19
  as ``functools.partial(MLP, submodules=MLPSubmodules(...))``. :func:`spec_submodules` returns the
  submodules dataclass of either (the project's SwiGLU is plugged into it).
* Unchanged but internal: ``checkpointing.SyncTorchDistSaveStrategy`` subclasses
  ``TorchDistSaveShardedStrategy`` and calls ``_replace_state_dict_keys_with_sharded_keys``,
  ``mcore_to_pyt_state_dict`` and ``MCoreSavePlanner`` (same signatures in 0.16.1 and 0.19.2; 0.19's
  ``dist_checkpointing.save`` replaces any strategy that is not such a subclass).

Prefer feature detection to version comparisons when adding a case here; :data:`TESTED_MCORE` is the
one place that names versions.
"""

from __future__ import annotations

import logging
import os
import platform

TESTED_MCORE = ("0.16.1", "0.17.1", "0.19.2")

# (logger name, start of the message): benign lines newer megatron-core logs on every run (see above)
_KNOWN_NOISE = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    ("megatron.core.distributed.distributed_data_parallel",
     "DistributedDataParallel: full_param_layout not provided"),
)


def spec_submodules(spec):
    """The submodules dataclass of a layer-spec entry: a ``ModuleSpec`` (0.16) or a ``functools.partial``
    of the module class with ``submodules=`` (0.19). Mutable: set fields on it to change the spec."""
    if hasattr(spec, "submodules"):
        return spec.submodules
    keywords = getattr(spec, "keywords", None)
    if keywords and "submodules" in keywords:
        return keywords["submodules"]
    raise TypeError(f"cannot find the submodules of layer-spec entry {spec!r}")


def mcore_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def versions() -> dict[str, str]:
    """Versions of the pieces that matter for compatibility, e.g. for a run's log or a bug report."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "megatron-core": mcore_version()}


def is_tested_mcore(version: str | None = None) -> bool:
    return (version or mcore_version()) in TESTED_MCORE


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install_log_filters() -> None:
    """Drop the known benign per-run warnings of newer megatron-core (idempotent; no-op on 0.16)."""
    for name, prefix in _KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))


LEGACY_COMMON_FILE = "common.pt"  # megatron-core's COMMON_STATE_FNAME


def write_legacy_common_state(ckpt_dir: str) -> bool:
    """After ``dist_checkpointing.save`` (one rank): write ``common.pt`` when the release kept the common
    state only inside the DCP files (0.19), so that 0.16 can load the checkpoint. Returns whether it wrote.

    Feature-detected: a release that wrote ``common.pt`` itself (0.16) is left alone.
    """
    path = os.path.join(ckpt_dir, LEGACY_COMMON_FILE)
    if os.path.exists(path):
        return False
    from megatron.core.dist_checkpointing import serialization

    read_embedded = getattr(serialization, "load_common_state_dict", None)
    if read_embedded is None:
        return False
    import torch

    common = read_embedded(ckpt_dir)  # the common_state object of the DCP files (rank-independent)
    torch.save(common, path + ".tmp")
    os.replace(path + ".tmp", path)
    return True
