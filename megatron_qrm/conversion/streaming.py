"""A live Megatron policy -> Hugging Face-named tensors, in memory (no checkpoint, no disk).

The refit path of an inference engine (``megatron_qrm.rl.vllm_engine``): after each policy update the
engine needs the new weights under their HF names (what vLLM's ``load_weights`` reads). The mapping is the
exporter's: the same family tables (:mod:`megatron_qrm.conversion.families`) and the same ops
(:meth:`ops.QKV.export` & co.), so the tensors are bit-identical to ``qrm export`` / ``convert_hf.py export``
of a checkpoint of the same model (tests/test_vllm.py checks it).

Where the exporter reads one layer's global tensor from a dist checkpoint, here it is assembled from the
live shards:

* names: a parameter's name is mapped to its checkpoint key with the layer spec's own
  ``sharded_state_dict_keys_map`` (megatron-core's local spec names the fused norms ``input_layernorm`` /
  ``pre_mlp_layernorm``; Transformer Engine's are already ``linear_qkv.layer_norm_weight`` & co.) and its
  local layer index with the layer's global ``layer_number``;
* tensor parallelism: shards are gathered to the TP group's first rank along megatron's ``partition_dim``;
  SwiGLU ``linear_fc1`` holds ``[gate_r; up_r]`` per rank, so each half is gathered on its own;
* LoRA: the adapters are gathered like the layer they adapt and merged as the exporter merges them
  (:func:`megatron_qrm.conversion.ops.merge_lora`);
* pipeline parallelism: a stage's gathered tensor is broadcast from its first TP rank to the first
  stage's (over the pipeline group); only the destination, the first rank of the model-parallel group
  (pipeline stage 0, TP rank 0), yields tensors.

Memory bound: one gathered Megatron tensor (the largest: the padded embedding) and its HF pieces, which are
views of it. Every rank of the model-parallel group must drain the iterator (the gathers are collective).
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.config import ModelConfig, padded_vocab_size
from megatron_qrm.conversion import ops
from megatron_qrm.conversion.families import LM, family_for_model

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SWIGLU_KEYS = ("decoder.layers.mlp.linear_fc1.weight",)
# LoRA: which factor is split across TP (megatron_qrm.models.lora): column layers split B on dim 0,
# row layers A on dim 1; the other factor is replicated
_LORA_KIND = {"self_attention.linear_qkv": "column", "mlp.linear_fc1": "column",
              "self_attention.linear_proj": "row", "mlp.linear_fc2": "row"}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _local_index(model: torch.nn.Module) -> tuple[dict, dict]:
    """This rank's parameters by (checkpoint key, global layer or None), and its LoRA factors by the same
    key of the weight they adapt: ``{(key, layer): (lora_a, lora_b, scale)}``."""
    params: dict = {}
    lora: dict = {}
    layers = getattr(getattr(model, "decoder", None), "layers", [])
    for name, p in model.named_parameters():
        m = _LAYER_RE.match(name)
        if m is None:
            params[(name, None)] = p
            continue
        layer = layers[int(m.group(1))]
        rest = m.group(2)
        keys_map = getattr(getattr(layer, "submodules_config", None), "sharded_state_dict_keys_map", {}) or {}
        for src, dst in keys_map.items():
            if rest.startswith(src):
                rest = dst + rest[len(src):]
                break
        glob = int(layer.layer_number) - 1
        if ".lora." in rest:
            base, factor = rest.split(".lora.")
            module = layer.get_submodule(base)
            a, b = module.lora.lora_a, module.lora.lora_b
            lora[(f"decoder.layers.{base}.weight", glob)] = (a, b, float(module.lora.scale), _LORA_KIND[base])
            continue
        params[(f"decoder.layers.{rest}", glob)] = p
    return params, lora


def _gather_tp(t: torch.Tensor, dim: Optional[int], halves: bool = False) -> Optional[torch.Tensor]:
    """A TP-sharded tensor, whole, on the TP group's first rank (None on the others). ``dim`` None:
    replicated (the first rank's copy). ``halves``: the shards are ``[a_r; b_r]`` (SwiGLU), gathered to
    ``[a; b]``."""
    tp = ps.get_tensor_model_parallel_world_size()
    first = ps.get_tensor_model_parallel_rank() == 0
    t = t.detach()
    if tp == 1 or dim is None:
        return t if first else None
    group, dst = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    parts = [t.contiguous()] if not halves else list(t.chunk(2, dim=dim))
    whole = []
    for part in parts:
        part = part.contiguous()
        bufs = [torch.empty_like(part) for _ in range(tp)] if first else None
        dist.gather(part, bufs, dst=dst, group=group)
        if first:
            whole.append(torch.cat(bufs, dim=dim))
    return torch.cat(whole, dim=dim) if first else None


def _partition_dim(p: torch.Tensor) -> Optional[int]:
    return int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None


def _pp_ranks() -> list[int]:
    return dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())


def iter_hf_weights(model: torch.nn.Module, model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` of the policy ``model`` (this rank's stage; any TP/PP layout), in the exporter's
    order and dtype (the model's parameter dtype), LoRA merged, vocabulary un-padded.

    Collective over the model-parallel group: every rank iterates it to the end; only the group's first
    rank (pipeline stage 0, TP rank 0) receives tensors, the others yield nothing.
    """
    model = unwrap(model)
    family = family_for_model(model_cfg)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dims = ops.Dims.of(model_cfg, padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp))
    params, lora = _local_index(model)
    dtype = next(model.parameters()).dtype
    tp_first = ps.get_tensor_model_parallel_rank() == 0
    stage = ps.get_pipeline_model_parallel_rank()
    # which stage holds each key: every stage lists its own (one small all_gather_object per refit)
    owners: dict = {}
    if pp > 1:
        mine = sorted(params)
        listed: list = [None] * pp
        dist.all_gather_object(listed, mine, group=ps.get_pipeline_model_parallel_group())
        for s, keys in enumerate(listed):
            for k in keys:
                owners.setdefault(tuple(k), s)
    else:
        owners = {k: 0 for k in params}
    destination = stage == 0 and tp_first
    for tm, layer in family.walk(model_cfg, "policy"):
        op = ops.op_for(tm)
        if tm.megatron is None:
            continue  # (reward heads' zero bias: not part of a policy)
        key = (tm.megatron, layer)
        if key not in owners:
            raise KeyError(f"policy model has no {tm.megatron}" + (f" in layer {layer}" if layer is not None else ""))
        full = None
        if owners[key] == stage:
            p = params[key]
            full = _gather_tp(p, _partition_dim(p), halves=tm.megatron in _SWIGLU_KEYS and tp > 1)
            if key in lora:
                a, b, scale, kind = lora[key]
                a_full = _gather_tp(a, 1 if kind == "row" else None)
                b_full = _gather_tp(b, 0 if kind == "column" else None, halves=tm.megatron in _SWIGLU_KEYS and tp > 1)
                if full is not None:
                    full = ops.merge_lora(full, a_full, b_full, scale)
        if pp > 1 and owners[key] != 0 and tp_first:
            ranks = _pp_ranks()
            if full is None:
                full = torch.empty(ops.megatron_shape(tm.megatron, dims), dtype=dtype, device=_device_of(model))
            full = full.contiguous()
            dist.broadcast(full, src=ranks[owners[key]], group=ps.get_pipeline_model_parallel_group())
        if destination:
            names = tm.hf_names(layer)
            for j, t in op.export(dims, full):
                yield names[j], t
        del full


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def hf_weights_dict(model: torch.nn.Module, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """:func:`iter_hf_weights` into a dict of copies (tests and small models; the engine streams instead)."""
    return {name: t.detach().clone() for name, t in iter_hf_weights(model, model_cfg)}


def hf_config_for(model_cfg: ModelConfig, dtype: torch.dtype, base: Optional[dict] = None) -> dict:
    """The ``config.json`` of the ``*ForCausalLM`` the streamed tensors load into (the exporter's)."""
    from megatron_qrm.conversion.hf_config import hf_config_from_model

    return hf_config_from_model(model_cfg, family_for_model(model_cfg), LM, dtype, base)
