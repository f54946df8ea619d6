"""LoRA adapters for megatron-core's tensor-parallel linears (qkv, proj, fc1, fc2).

An adapter is attached to an existing layer (its own parameters keep their names, so a base
checkpoint loads unchanged) through a forward hook that adds ``scale * B(A(x))`` to the layer's
output. Each adapter is sharded like the layer it adapts:

* column-parallel layer (qkv, fc1; output split across TP): ``A`` [r, in] replicated, ``B``
  [out/tp, r] split on dim 0. ``A x`` goes through ``copy_to_tensor_model_parallel_region`` so
  its gradient sums the contributions of every rank's slice of ``B``.
* row-parallel layer (proj, fc2; input split across TP): ``A`` [r, in/tp] split on dim 1, ``A x``
  summed over TP (``reduce_from_tensor_model_parallel_region``), ``B`` [out, r] replicated. Under
  sequence parallelism the delta is then split along the sequence like the layer's output.

``scale = alpha / r``; the reference Q-RM uses no scaling, i.e. ``alpha = r``.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

# module-name suffix -> is the layer column-parallel (output split) or row-parallel (input split)
LORA_TARGETS = {
    "self_attention.linear_qkv": "column",
    "self_attention.linear_proj": "row",
    "mlp.linear_fc1": "column",
    "mlp.linear_fc2": "row",
}


@dataclass
class LoRAConfig:
    rank: int = 0
    alpha: float | None = None  # None -> alpha = rank (no scaling, as the reference)
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRAAdapter(torch.nn.Module):
    """Low-rank delta for one TP linear. Shapes as in the module docstring."""

    def __init__(self, kind: str, in_features: int, out_features: int, rank: int, scale: float,
                 sequence_parallel: bool, dtype: torch.dtype, device: torch.device, swiglu: bool = False,
                 seed: int = 0):
        super().__init__()
        # SwiGLU fc1: each TP rank holds [gate_r; up_r], so B's checkpoint layout must be split the
        # same way megatron-core splits fc1 itself (two halves, each sharded across TP).
        self.swiglu = swiglu
        tp = ps.get_tensor_model_parallel_world_size()
        tp_rank = ps.get_tensor_model_parallel_rank()
        self.kind, self.scale, self.sequence_parallel = kind, scale, sequence_parallel
        # A is initialised over its full shape from a generator seeded per (run seed, layer, target) and
        # then sliced, so every TP/PP layout starts from the same adapter. Kaiming-uniform(a=sqrt(5)),
        # i.e. torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_features)
        gen = torch.Generator().manual_seed(seed)
        a_full = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
        if kind == "column":
            self.lora_a = torch.nn.Parameter(a_full.to(device=device, dtype=dtype))
            self.lora_b = torch.nn.Parameter(torch.zeros(out_features // tp, rank, dtype=dtype, device=device))
            set_tensor_model_parallel_attributes(self.lora_b, True, 0, 1)
        else:
            shard = in_features // tp
            a_local = a_full[:, tp_rank * shard : (tp_rank + 1) * shard].contiguous()
            self.lora_a = torch.nn.Parameter(a_local.to(device=device, dtype=dtype))
            self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
            set_tensor_model_parallel_attributes(self.lora_a, True, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the layer's input [s(/tp), b, in(/tp)] -> delta shaped like the layer's output."""
        if self.kind == "column":
            if self.sequence_parallel:
                x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            h = copy_to_tensor_model_parallel_region(torch.nn.functional.linear(x, self.lora_a))
            return torch.nn.functional.linear(h, self.lora_b) * self.scale
        h = reduce_from_tensor_model_parallel_region(torch.nn.functional.linear(x, self.lora_a))
        delta = torch.nn.functional.linear(h, self.lora_b) * self.scale
        if self.sequence_parallel:
            delta = scatter_to_sequence_parallel_region(delta)
        return delta

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        axis = {"lora_b": 0} if self.kind == "column" else {"lora_a": 1}
        sd = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        sharded = make_sharded_tensors_for_checkpoint(sd, prefix, axis, sharded_offsets)
        if self.swiglu:
            key = f"{prefix}lora_b"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


def _adapter_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Transformer Engine fuses the pre-norm into qkv/fc1 (LayerNormColumnParallelLinear): the
    # adapter must see the normalised input, so apply the layer's own RMSNorm weight here.
    weight = getattr(module, "layer_norm_weight", None)
    if weight is None:
        return x
    eps = getattr(module, "eps", 1e-5)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def lora_delta(module: torch.nn.Module, x: torch.Tensor):
    """The adapter's term ``scale * B(A(x))`` of ``module``'s output for its input ``x`` (shaped like the
    output), or None when ``module`` carries no adapter. The trainer's forward hook and the KV-cache decoder
    (which applies the layer's product itself) both add exactly this."""
    adapter = getattr(module, "lora", None)
    if not isinstance(adapter, LoRAAdapter):
        return None
    return adapter(_adapter_input(module, x))


def _lora_hook(module, args, output):
    out, bias = output
    return out + lora_delta(module, args[0]), bias


def _sharded_state_dict_with_lora(self, prefix="", sharded_offsets=(), metadata=None):
    base = type(self).sharded_state_dict(self, prefix, sharded_offsets, metadata)
    # The base layer's sharded_state_dict sees lora.* in its state_dict and would mark them
    # replicated; replace those entries with the adapter's own (correctly TP-sharded) ones.
    sd = {k: v for k, v in base.items() if not k.startswith(f"{prefix}lora.")}
    sd.update(self.lora.sharded_state_dict(f"{prefix}lora.", sharded_offsets, metadata))
    return sd


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, seed: int = 1234) -> int:
    """Attach adapters to every targeted linear of ``model``'s transformer layers; returns how many."""
    wanted = [name for name in LORA_TARGETS if name.rsplit("_", 1)[-1] in cfg.targets]
    count = 0
    for layer in model.decoder.layers:
        for t_index, suffix in enumerate(wanted):
            count += _attach(layer.get_submodule(suffix), suffix, cfg,
                             seed=seed + 7919 * int(layer.layer_number) + 104729 * t_index)
    return count


def _attach(module: torch.nn.Module, suffix: str, cfg: LoRAConfig, seed: int) -> int:
    kind = LORA_TARGETS[suffix]
    weight = module.weight
    tp = ps.get_tensor_model_parallel_world_size()
    out_features = weight.shape[0] * (tp if kind == "column" else 1)
    in_features = weight.shape[1] * (tp if kind == "row" else 1)
    swiglu = suffix == "mlp.linear_fc1" and bool(getattr(module.config, "gated_linear_unit", False))
    module.lora = LoRAAdapter(kind, in_features, out_features, cfg.rank, cfg.scale,
                              bool(getattr(module, "sequence_parallel", False)), weight.dtype, weight.device,
                              swiglu=swiglu, seed=seed)
    module.register_forward_hook(_lora_hook)
    module.sharded_state_dict = types.MethodType(_sharded_state_dict_with_lora, module)
    return 1


def is_lora_param(name: str) -> bool:
    return ".lora." in name or name.startswith("lora.")


class lora_disabled:
    """Context manager: run the model as its frozen base (adapters contribute nothing).

    For a LoRA DPO-RM the reference policy is exactly the base model, so no second copy is needed.
    """

    def __init__(self, model: torch.nn.Module):
        self.adapters = [m for m in model.modules() if isinstance(m, LoRAAdapter)]

    def __enter__(self):
        self.saved = [a.scale for a in self.adapters]
        for a in self.adapters:
            a.scale = 0.0
        return self

    def __exit__(self, *exc):
        for a, s in zip(self.adapters, self.saved):
            a.scale = s
