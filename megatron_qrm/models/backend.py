"""Which implementation runs where: the one place the GPU path meets the CPU kernels.

Three paths, chosen per process from the device (and ``--transformer-impl``):

* **GPU with Transformer Engine** -- TE's layer spec (fused attention with THD packing, fused RoPE and
  SwiGLU); :func:`megatron_qrm.models.builder.layer_spec` picks it.
* **GPU without TE** -- megatron-core's local spec with fused SDPA core attention
  (:class:`~megatron_qrm.models.attention.SDPAttention`), packed sequences through torch's library kernels
  (``varlen_attn`` / FlexAttention, :mod:`megatron_qrm.models.packed_attention`), megatron-core's fused SwiGLU,
  ``F.linear`` in the KV-cache decoder.
* **CPU** (tests, the demo; gloo, fp32) -- the same local spec plus the CPU kernels of
  :mod:`megatron_qrm.cpu.kernels`, and the CUDA emulation of :mod:`megatron_qrm.cpu.emulation` (installed by
  process initialisation, :func:`megatron_qrm.parallel.initialize`, only when there is no CUDA).

Nothing under ``models/``, ``rl/`` or ``training/`` imports :mod:`megatron_qrm.cpu` except this module, and
this module only when the process is a CPU run (``tests/test_gpu_path.py`` checks it).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def is_cpu_run() -> bool:
    """True when this process has no CUDA device (the CPU path)."""
    return not torch.cuda.is_available()


def cpu_layer_spec(spec, config):
    """The local spec with the CPU kernels (CPU runs only; see :func:`megatron_qrm.cpu.kernels.cpu_layer_spec`)."""
    from megatron_qrm.cpu.kernels import cpu_layer_spec as _cpu_layer_spec

    return _cpu_layer_spec(spec, config)


def decode_linear(device: torch.device):
    """The ``F.linear``-compatible product the KV-cache decoder uses on ``device``: MKL's pre-packed GEMM on CPU
    (:class:`megatron_qrm.cpu.kernels.CpuPackedLinear`), ``F.linear`` elsewhere."""
    if torch.device(device).type != "cpu":
        return F.linear
    from megatron_qrm.cpu.kernels import CpuPackedLinear

    return CpuPackedLinear()


def decode_context():
    """Context for a decode loop: on a CPU run with the emulation enabled, the emulation's per-op
    ``device="cuda"`` rewriting is suspended (the decode loop creates no CUDA tensors); a no-op otherwise."""
    if not is_cpu_run():
        return contextlib.nullcontext()
    from megatron_qrm import cpu

    return cpu.function_mode_suspended() if cpu.is_enabled() else contextlib.nullcontext()
