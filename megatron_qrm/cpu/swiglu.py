"""SwiGLU as one autograd function over the fused gate/up projection, for megatron-core's local MLP.

megatron-core's local MLP computes ``silu(x_glu) * x_linear`` on the two halves of ``linear_fc1``'s output
``[s, b, 2f]`` (``torch.chunk``): ``silu`` and the product read strided halves, autograd keeps three tensors,
and backward concatenates the halves' gradients (a ``cat`` of ``[s, b, 2f]`` per layer). :class:`SwiGLU`
computes the same values; its backward writes both halves of the input gradient into one buffer (no ``cat``).
It is plugged in through the MLP spec's ``activation_func`` submodule, which megatron-core calls on the whole
fc1 output when ``config.use_te_activation_func`` is set (the flag's name notwithstanding, any module that
maps ``[..., 2f] -> [..., f]`` can stand there; Transformer Engine is not involved).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        f = x.shape[-1] // 2
        gate, linear = x[..., :f], x[..., f:]
        act = torch.nn.functional.silu(gate)
        ctx.save_for_backward(x, act)
        return act * linear

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, act = ctx.saved_tensors
        f = x.shape[-1] // 2
        gate, linear = x[..., :f], x[..., f:]
        grad_x = torch.empty(x.shape, dtype=grad.dtype, device=grad.device)
        torch.ops.aten.silu_backward.grad_input(grad * linear, gate, grad_input=grad_x[..., :f])
        torch.mul(grad, act, out=grad_x[..., f:])
        return grad_x


def swiglu(x: Tensor) -> Tensor:
    """``silu(x[..., :f]) * x[..., f:]`` for ``x [..., 2f]`` -> ``[..., f]``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _SwiGLU.apply(x)
    f = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :f]) * x[..., f:]


class SwiGLU(torch.nn.Module):
    """The MLP spec's ``activation_func`` module: ``[s, b, 2f] -> [s, b, f]`` (no parameters)."""

    #: computes exactly ``silu(x[..., :f]) * x[..., f:]``: the KV-cache decoder may inline it (models/kv_decode.py)
    silu_glu = True

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters (megatron-core's MLP asks every child)


def with_swiglu(spec):
    """A copy of a local GPT layer spec whose MLP activation is :class:`SwiGLU` (needs
    ``config.use_te_activation_func = True`` for megatron-core to call it)."""
    import copy

    from megatron_qrm.compat import spec_submodules

    spec = copy.deepcopy(spec)
    spec_submodules(spec.submodules.mlp).activation_func = SwiGLU
    return spec
