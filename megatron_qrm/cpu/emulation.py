"""Run Megatron-Core on CPU (gloo, fp32, local spec).

Megatron-Core assumes CUDA in a handful of places. This module emulates exactly those, and nothing
else, so tests and the CPU demo can run the real GPTModel, schedules, DDP and DistributedOptimizer:

* ``torch.cuda.current_device()`` -> the CPU device (used as a ``device=`` argument everywhere);
* tensors created with ``device="cuda"`` (pipeline schedules, p2p shape exchange) -> CPU, through a
  global ``TorchFunctionMode`` that rewrites the ``device`` argument of factory functions;
* ``Tensor.cuda()`` -> identity; ``torch.cuda.current_stream()`` -> a stream whose waits are no-ops;
* the CUDA RNG state tracker -> a tracker holding CPU generator states (same fork/add API);
* the optimizers' ``param.type() == 'torch.cuda.FloatTensor'`` checks -> CPU tensors report the
  CUDA type name;
* activation recomputation saves/restores the CUDA RNG state and rebuilds the causal mask with
  ``device="cuda"`` in backward (where the function mode above is not active) -> no-op RNG state and a
  CPU causal mask.

:func:`enable` is idempotent and refuses to run when CUDA is present: it must never touch the GPU path.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda...`` on tensor factories (``torch.empty(..., device="cuda")``) to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Drop-in for megatron-core's ``CudaRNGStatesTracker`` that forks the CPU generator instead.

    Tensor-parallel layers initialise and apply dropout inside ``tracker.fork()``; on CPU the only
    generator is the default CPU one, so a fork saves it, swaps in the named state, and restores it.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _cpu_model_parallel_seed(seed: int, *args, **kwargs) -> None:
    """CPU version of ``model_parallel_cuda_manual_seed``: same offsets as megatron-core."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tensor_model_parallel_seed = seed + 2718 + ps.get_tensor_model_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, tensor_model_parallel_seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 100 + ps.get_expert_model_parallel_rank())


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: work is synchronous, so waits are no-ops."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def enable() -> None:
    """Install the emulation for this process. No-op if already enabled; error if CUDA is usable."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_qrm.cpu.enable() is for CPU-only machines; CUDA is available")
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM  # 0.19 DDP grad sync waits on it
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self

    _type = torch.Tensor.type

    def _type_as_cuda(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs:
            name = _type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return _type(self, dtype, *args, **kwargs)

    torch.Tensor.type = _type_as_cuda

    # recomputation (tensor_parallel.checkpoint) stashes and restores the CUDA RNG state around the replay
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    mrandom.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed
    import megatron.core.tensor_parallel as tp

    tp.model_parallel_cuda_manual_seed = _cpu_model_parallel_seed

    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process (see function_mode_suspended)
    _ENABLED = True


_MODE: "_CudaToCpuMode | None" = None


@contextlib.contextmanager
def function_mode_suspended():
    """Run a block without the ``device="cuda"`` rewriting mode.

    The mode is a Python call on every torch function (~2 us on 2 CPU cores, about as much as a small op
    itself): negligible in a training step of large ops, but a third of a small decode step. Code that
    creates no tensor with ``device="cuda"`` (the KV-cache sampler: only the model's layers and its own
    buffers) runs without it. A no-op when the mode is not the innermost one (e.g. inside a
    ``with torch.device(...)`` block, itself a function mode).
    """
    from torch.overrides import _get_current_function_mode

    if _MODE is None or _get_current_function_mode() is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


def is_enabled() -> bool:
    return _ENABLED
