"""Process groups, device selection and seeding.

One entry point, :func:`initialize`, used by every command: it picks NCCL + CUDA when a GPU is
present and gloo + CPU (with :mod:`megatron_qrm.cpu` emulation) otherwise, then sets up
megatron-core's tensor/pipeline/data-parallel groups.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_qrm.config import ParallelConfig


def use_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return


_fork_hook_installed = False


def install_orphan_guards() -> None:
    """No process of a trainer's tree outlives it, SIGKILL included.

    * every process this one forks from now on (data workers, any library's helper) gets
      ``PR_SET_PDEATHSIG = SIGKILL``: the kernel kills it when this process dies;
    * a rank started by torchrun gets the same towards torchrun, so killing the launcher ends its ranks.

    (megatron-core's checkpoint writer, which forks writers and starts a multiprocessing Manager, is not
    used: :class:`megatron_qrm.checkpointing.SyncTorchDistSaveStrategy` writes from this process.)
    """
    global _fork_hook_installed
    if _fork_hook_installed:
        return
    _fork_hook_installed = True
    os.register_at_fork(after_in_child=_die_with_parent)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: die with the launcher
        parent = os.getppid()
        _die_with_parent()
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)


def check_world_size(par: ParallelConfig, world_size: int) -> None:
    """Raise :class:`~megatron_qrm.errors.LayoutError` (printed by rank 0 only, exit 2) when ``-tp`` x ``-pp``
    does not divide the number of processes. Checked before any process group exists, so that no rank is
    left waiting in a collective for one that has already failed."""
    from megatron_qrm.errors import LayoutError

    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise LayoutError(f"--tensor-model-parallel-size {tp} / --pipeline-model-parallel-size {pp}: must be >= 1")
    if world_size % (tp * pp):
        raise LayoutError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp} "
                          f"does not divide the world size {world_size} (the number of processes: torchrun "
                          "--nproc_per_node x nodes)")


def initialize(par: ParallelConfig) -> None:
    """Initialise torch.distributed (env:// from torchrun, or a 1-process group) and Megatron groups."""
    check_world_size(par, dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
    install_orphan_guards()
    from megatron_qrm import compat

    compat.install_log_filters()
    if not use_cuda():
        from megatron_qrm import cpu

        cpu.enable()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m ...` / `qrm ...`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if use_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend="nccl" if use_cuda() else "gloo", timeout=datetime.timedelta(minutes=30)
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
    )
    set_seed(par.seed)


def set_seed(seed: int) -> None:
    """Same seed on every rank for Python/NumPy/torch; megatron's tracker gives TP ranks distinct
    model-parallel streams (dropout inside TP regions) and a shared data-parallel stream."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_rank0() -> bool:
    return rank() == 0


def is_last_stage() -> bool:
    return ps.is_pipeline_last_stage()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Collectives on host tensors (counts, metrics, index bookkeeping): NCCL only moves GPU tensors, so
# they travel through the current device and come back to the host, in place.
def all_reduce_host(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    moved = t.to(device())
    dist.all_reduce(moved, op=op, group=group)
    t.copy_(moved.cpu())
    return t


def all_gather_host(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    moved = t.to(device())
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, moved, group=group)
    return [o.cpu() for o in out]


def broadcast_host(t: torch.Tensor, src: int, group=None) -> torch.Tensor:
    moved = t.to(device())
    dist.broadcast(moved, src=src, group=group)
    t.copy_(moved.cpu())
    return t
