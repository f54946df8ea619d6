"""CPU-only compute: MKL's pre-packed GEMM for small-batch fp32 decoding and the CPU layer spec.

None of this runs on a GPU: there the Transformer Engine spec (or megatron-core's local spec with its fused
SwiGLU) and ``F.linear`` are used (:mod:`megatron_qrm.models.backend` chooses).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

#: Rows (tokens) of a decode matmul for which MKL's pre-packed GEMM beats ``F.linear`` on CPU: at 4-64 rows
#: ``F.linear`` re-packs the whole weight on every call, which costs about as much as the product itself
#: (hidden 512, 1536 outputs: 355 -> 221 us at 32 rows; 8192 outputs: 1966 -> 1138 us); at 1-2 rows and from
#: ~128 rows on, the packing is no loss to ``F.linear`` and the plain call is as fast or faster.
PACKED_GEMM_ROWS = (4, 64)


def _mkl_packed_gemm_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(
            torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


class CpuPackedLinear:
    """``F.linear`` for small-batch CPU fp32 decoding through MKL's pre-packed GEMM (``torch.ops.mkl``, what
    torch.compile's CPU backend uses for frozen fp32 linears): each weight is packed once per decoder (a
    decoder lives for one ``generate`` call, during which weights do not change), then every decode step's
    product skips ``F.linear``'s per-call packing. Elsewhere (bf16, large or single-row inputs, torch without
    MKL) it is ``F.linear``. The result equals ``F.linear``'s to float rounding (1e-5 relative)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and _mkl_packed_gemm_available()
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(weight) -> (weight, packed)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if not (self.enabled and x.device.type == "cpu" and x.dtype == torch.float32 == weight.dtype
                and PACKED_GEMM_ROWS[0] <= rows <= PACKED_GEMM_ROWS[1] and x.shape[-1] == weight.shape[1]
                and (bias is None or bias.dtype == torch.float32)):
            return F.linear(x, weight, bias)
        entry = self._packed.get(id(weight))
        if entry is None or entry[0] is not weight:
            entry = (weight, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows))
            self._packed[id(weight)] = entry
        return torch.ops.mkl._mkl_linear(x, entry[1], weight.detach(), bias, rows)


def cpu_layer_spec(spec, config):
    """The local spec's CPU variant: megatron-core's MLP calls :class:`~megatron_qrm.cpu.swiglu.SwiGLU` on the
    whole fc1 output (no fused SwiGLU kernel without CUDA; ``cpu/swiglu.py`` says why). Sets
    ``config.use_te_activation_func`` (megatron-core's switch for calling an activation module)."""
    from megatron_qrm.cpu.swiglu import with_swiglu

    config.use_te_activation_func = True
    return with_swiglu(spec)
