"""The transforms named by the family tables (:mod:`megatron_qrm.conversion.families`).

Every op works on ONE tensor group (one Megatron tensor of one layer and its HF sources) and in both
directions:

* ``import_chunks(dims, tp, load)`` yields ``(tp_rank, offsets, chunk)``: the piece of the Megatron
  tensor that TP rank ``tp_rank`` holds, at ``offsets`` inside the (per-layer) global tensor. ``load(j)``
  reads the j-th HF source on demand, so at most one or two HF tensors are alive at a time.
* ``export(dims, full)`` yields ``(j, hf_tensor)`` from the full per-layer Megatron tensor.
* ``megatron_shape(hf_shapes, dims)`` / ``hf_shapes(megatron_shape, dims)``: the shapes either way.

All of them only slice, view and concatenate, so HF -> Megatron -> HF is bitwise exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from megatron_qrm.config import ModelConfig
from megatron_qrm.conversion.errors import ConversionError

Shape = tuple[int, ...]
Chunk = tuple[int, Shape, torch.Tensor]  # (tp rank, offsets in the per-layer tensor, data)


@dataclass(frozen=True)
class Dims:
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    @classmethod
    def of(cls, model: ModelConfig, padded_vocab: int) -> "Dims":
        return cls(model.hidden_size, model.num_attention_heads, model.num_query_groups, model.kv_channels,
                   model.ffn_hidden_size, model.vocab_size, padded_vocab)


def _split(n: int, tp: int) -> list[tuple[int, int]]:
    size = n // tp
    return [(r * size, size) for r in range(tp)]


def _offsets(ndim: int, dim: int, start: int) -> Shape:
    return tuple(start if i == dim else 0 for i in range(ndim))


class Copy:
    """One tensor as is; split along ``tp_axis`` across TP (``None``: replicated, held by TP rank 0)."""

    def __init__(self, tp_axis: Optional[int]):
        self.tp_axis = tp_axis

    def megatron_shape(self, hf: list[Shape], dims: Dims) -> Shape:
        return hf[0]

    def hf_shapes(self, meg: Shape, dims: Dims) -> list[Shape]:
        return [meg]

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        t = load(0)
        if self.tp_axis is None:
            yield 0, (0,) * t.dim(), t
            return
        for r, (start, size) in enumerate(_split(t.shape[self.tp_axis], tp)):
            yield r, _offsets(t.dim(), self.tp_axis, start), t.narrow(self.tp_axis, start, size)

    def export(self, dims: Dims, full: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, full


class QKV:
    """q [heads*d, ...], k [groups*d, ...], v [groups*d, ...] -> Megatron's fused ``linear_qkv``: per query
    group g its q heads, then k_g, then v_g. TP rank r holds groups [r*G/tp, (r+1)*G/tp), i.e. one
    contiguous row block. Works for weights ([rows, hidden]) and biases ([rows])."""

    def megatron_shape(self, hf: list[Shape], dims: Dims) -> Shape:
        return (sum(s[0] for s in hf),) + tuple(hf[0][1:])

    def hf_shapes(self, meg: Shape, dims: Dims) -> list[Shape]:
        rest = tuple(meg[1:])
        d = dims.head_dim
        return [(dims.heads * d,) + rest, (dims.groups * d,) + rest, (dims.groups * d,) + rest]

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        q, k, v = load(0), load(1), load(2)
        g, d, qg = dims.groups, dims.head_dim, dims.q_per_group
        rest = tuple(q.shape[1:])
        if q.shape[0] != dims.heads * d or k.shape[0] != g * d or v.shape[0] != g * d:
            raise ConversionError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not "
                                  f"match {dims.heads} heads / {g} key-value heads of size {d}")
        qv, kv, vv = q.view(g, qg * d, *rest), k.view(g, d, *rest), v.view(g, d, *rest)
        per_rank = g // tp
        rows = per_rank * (qg + 2) * d
        for r in range(tp):
            sl = slice(r * per_rank, (r + 1) * per_rank)
            chunk = torch.cat([qv[sl], kv[sl], vv[sl]], dim=1).reshape(rows, *rest)
            yield r, (r * rows,) + (0,) * len(rest), chunk

    def export(self, dims: Dims, full: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        g, d, qg = dims.groups, dims.head_dim, dims.q_per_group
        rest = tuple(full.shape[1:])
        grouped = full.view(g, qg + 2, d, *rest)
        yield 0, grouped[:, :qg].reshape(g * qg * d, *rest)
        yield 1, grouped[:, qg].reshape(g * d, *rest)
        yield 2, grouped[:, qg + 1].reshape(g * d, *rest)


class GateUp:
    """gate [F, h], up [F, h] -> SwiGLU ``linear_fc1`` [2F, h] = [gate; up]. megatron-core shards each half
    on its own (TP rank r holds [gate_r; up_r]); its checkpoint stores the global [gate; up], with gate
    chunks at rows r*F/tp and up chunks at F + r*F/tp, so the halves are never concatenated here."""

    def megatron_shape(self, hf: list[Shape], dims: Dims) -> Shape:
        return (hf[0][0] + hf[1][0],) + tuple(hf[0][1:])

    def hf_shapes(self, meg: Shape, dims: Dims) -> list[Shape]:
        half = (meg[0] // 2,) + tuple(meg[1:])
        return [half, half]

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        for part in (0, 1):
            t = load(part)
            if t.shape[0] != dims.ffn:
                raise ConversionError(f"SwiGLU projection has {t.shape[0]} rows, expected intermediate_size "
                                      f"{dims.ffn}")
            for r, (start, size) in enumerate(_split(dims.ffn, tp)):
                yield r, (part * dims.ffn + start,) + (0,) * (t.dim() - 1), t.narrow(0, start, size)
            del t

    def export(self, dims: Dims, full: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        half = full.shape[0] // 2
        yield 0, full[:half]
        yield 1, full[half:]


class Vocab:
    """Embedding / LM head rows [V, h] -> Megatron's padded [P, h] (P = padded vocabulary for the TP size,
    rows >= V are zeros), split across TP in P/tp row blocks. Export keeps the first V rows."""

    def megatron_shape(self, hf: list[Shape], dims: Dims) -> Shape:
        return (dims.padded_vocab,) + tuple(hf[0][1:])

    def hf_shapes(self, meg: Shape, dims: Dims) -> list[Shape]:
        return [(dims.vocab,) + tuple(meg[1:])]

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        t = load(0)
        if t.shape[0] != dims.vocab:
            raise ConversionError(f"vocabulary tensor has {t.shape[0]} rows, config.json vocab_size is {dims.vocab}")
        for r, (start, size) in enumerate(_split(dims.padded_vocab, tp)):
            real = max(0, min(size, dims.vocab - start))
            if real == size:
                chunk = t.narrow(0, start, size)
            else:  # the tail block: real rows, then zero padding
                chunk = torch.zeros((size,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                if real:
                    chunk[:real] = t[start:start + real]
            yield r, (start,) + (0,) * (t.dim() - 1), chunk

    def export(self, dims: Dims, full: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, full[:dims.vocab]


class Head(Copy):
    """The Q-RM token head [1, h] <- HF ``score.weight`` [num_labels=1, h]: a replicated copy whose shape is
    checked on import (a sequence classifier with several labels is not a token reward head)."""

    def __init__(self):
        super().__init__(tp_axis=None)

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        t = load(0)
        if tuple(t.shape) != (1, dims.hidden):
            raise ConversionError(f"score head has shape {tuple(t.shape)}; a token reward head needs num_labels=1 "
                                  f"([1, {dims.hidden}])")
        yield 0, (0, 0), t


class ZeroBias:
    """HF ``score.bias``: our head has none. Export writes zeros (so transformers versions whose token
    classifier has a bias load it exactly); import reads it only to warn when it is not zero."""

    def megatron_shape(self, hf: list[Shape], dims: Dims) -> Shape:
        return ()

    def hf_shapes(self, meg: Shape, dims: Dims) -> list[Shape]:
        return [(1,)]

    def import_chunks(self, dims: Dims, tp: int, load: Callable[[int], torch.Tensor]) -> Iterator[Chunk]:
        return iter(())

    def export(self, dims: Dims, full: Optional[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, torch.zeros(1)


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B A`` computed in fp32, returned in W's dtype: weight [out, in], lora_a [r, in],
    lora_b [out, r] (the exporter and the in-memory refit both merge with this one function)."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


OPS = {"qkv": QKV(), "gate_up": GateUp(), "vocab": Vocab(), "head": Head(), "zero_bias": ZeroBias()}


def op_for(tensor_map) -> object:
    if tensor_map.op == "copy":
        return Copy(tensor_map.tp_axis)
    return OPS[tensor_map.op]


def megatron_shape(key: str, dims: Dims) -> Shape:
    """The per-layer (no layer axis) global shape megatron-core gives checkpoint tensor ``key``."""
    h, d = dims.hidden, dims.head_dim
    qkv_rows = dims.groups * (dims.q_per_group + 2) * d
    table = {
        "embedding.word_embeddings.weight": (dims.padded_vocab, h),
        "output_layer.weight": (dims.padded_vocab, h),
        "token_head.weight": (1, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
        "decoder.layers.self_attention.linear_qkv.weight": (qkv_rows, h),
        "decoder.layers.self_attention.linear_qkv.bias": (qkv_rows,),
        "decoder.layers.self_attention.linear_proj.weight": (h, dims.heads * d),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (h,),
        "decoder.layers.mlp.linear_fc1.weight": (2 * dims.ffn, h),
        "decoder.layers.mlp.linear_fc2.weight": (h, dims.ffn),
    }
    return table[key]
