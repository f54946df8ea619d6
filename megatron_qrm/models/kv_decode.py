"""Incremental decoding of a megatron-core GPTModel with its own KV cache (one pipeline stage).

Built from the layers' submodules -- ``input_layernorm``, ``self_attention`` (its
``get_query_key_value_tensors``: ``linear_qkv`` + q/k layernorms, and ``linear_proj``),
``pre_mlp_layernorm`` and ``mlp`` -- rather than from megatron-core's forward signatures or its inference
contexts, so megatron-core API changes to ``forward`` do not reach it. Only public module APIs are used;
LoRA adapters are applied through the same modules and function the trainer uses
(:func:`megatron_qrm.models.lora.lora_delta`). What it does differently from megatron-core's ``StaticInferenceContext`` path:

* keys are cached AFTER the rotary embedding, which is applied once to each new key (and query) with
  cos/sin looked up in a table computed once from the model's own ``rotary_pos_emb`` (so RoPE scaling
  is the model's); a decode step costs the same per layer at position 1,000 as at 50, apart from the
  attention over the cache itself;
* all prompts are prefilled in one forward pass whatever their lengths: left padding, per-row
  positions (a row's first prompt token has position 0) and a padding-aware causal mask; afterwards every
  row decodes at the same cache column (so the rows stay aligned), padding columns masked out;
* the output layer runs on the last position only (the prompt positions' logits are not needed);
* attention is ``scaled_dot_product_attention`` with grouped-query attention served from the un-repeated
  cache (``enable_gqa``);
* :meth:`KVCacheDecoder.select` drops finished rows from the cache (the sampler calls it when enough rows
  are done for the copy to pay off);
* megatron-core's local tensor-parallel linears are applied with ``F.linear`` (+ the TP all-reduce of a
  row-parallel one) instead of their training-oriented autograd Function and region wrappers, which cost
  ~0.1 ms of Python per call -- a tenth of a batch-1 decode step; the product is ``F.linear`` (GPU) or the
  CPU kernels' packed GEMM, chosen by :func:`megatron_qrm.models.backend.decode_linear`. Any other linear
  (Transformer Engine's, gathered output, sequence parallelism) is simply called. Likewise the SwiGLU MLP and the fused QKV split are
  done here only for the configurations whose megatron-core code is plain (else the submodule is called).

Logits stay vocabulary-parallel (this TP rank's columns, ``[B, V/tp]``). Pipeline stages exchange the
hidden states ``[s, B, h]`` with point-to-point send/recv; only the last stage returns logits.
Not supported (raises): sequence parallelism, context parallelism, interleaved rotary layouts,
post-layernorm residuals, multi-latent attention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP

from megatron_qrm.models import backend, rope
from megatron_qrm.models.attention import _SDPA_HAS_GQA
from megatron_qrm.models.lora import lora_delta


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def apply_linear(module, x: torch.Tensor, weight: Optional[torch.Tensor] = None, linear=F.linear):
    """``module(x)`` -> ``(output, bias)`` for a megatron-core tensor-parallel linear, in inference.

    Plain local Column/RowParallelLinear (no sequence parallelism, no gathered output): ``linear`` (``F.linear``,
    or the CPU kernels' packed GEMM, :func:`megatron_qrm.models.backend.decode_linear`) and, row-parallel under
    TP, an all-reduce, then the layer's LoRA adapter (:func:`megatron_qrm.models.lora.lora_delta`, the term the
    trainer's hook adds). Other hooks on these layers are not run (the decoder computes the layer itself):
    e.g. megatron-core DDP's ``overlap_param_gather`` pre-hooks, which this project does not enable (a model
    decoded with them would need its parameters gathered first); any other layer is called as a module. ``weight`` overrides a
    column-parallel layer's weight (a tied output layer).
    """
    kind = type(module)
    plain = (kind in (ColumnParallelLinear, RowParallelLinear) and not torch.is_grad_enabled()
             and not module.sequence_parallel and not getattr(module, "explicit_expert_comm", False)
             and (getattr(module, "gather_output", False) is False if kind is ColumnParallelLinear
                  else getattr(module, "input_is_parallel", False) is True))
    if not plain:
        return module(x) if weight is None else module(x, weight=weight, runtime_gather_output=False)
    bias = module.bias
    if kind is ColumnParallelLinear:
        out = linear(x, module.weight if weight is None else weight, None if module.skip_bias_add else bias)
    else:
        out = linear(x, module.weight)
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(out, group=ps.get_tensor_model_parallel_group())
        if bias is not None and not module.skip_bias_add:
            out = out + bias
    delta = lora_delta(module, x)
    if delta is not None:
        out = out + delta
    return out, bias if module.skip_bias_add else None


class KVCacheDecoder:
    """Prefill + one-token steps of this pipeline stage of ``model`` for a batch of ``batch_size`` rows.

    ``max_columns``: cache length (longest prompt + new tokens); ``max_positions``: size of the RoPE table
    (the largest position any row reaches, + 1).
    """

    def __init__(self, model, batch_size: int, max_columns: int, max_positions: int, device: torch.device,
                 linear=None):
        self.model = unwrap_model(model)
        cfg = self.model.config
        self.config = cfg
        for flag, what in (("sequence_parallel", "sequence parallelism"), ("multi_latent_attention", "MLA"),
                           ("rotary_interleaved", "interleaved rotary embeddings"),
                           ("apply_residual_connection_post_layernorm", "post-layernorm residuals")):
            if getattr(cfg, flag, False):
                raise ValueError(f"KV-cache decoding does not support {what}")
        if getattr(cfg, "context_parallel_size", 1) != 1:
            raise ValueError("KV-cache decoding does not support context parallelism")
        if getattr(self.model, "position_embedding_type", "rope") != "rope":
            raise ValueError("KV-cache decoding supports rotary position embeddings only")
        self.layers = list(self.model.decoder.layers)
        self.final_layernorm = getattr(self.model.decoder, "final_layernorm", None)
        self.pre_process, self.post_process = self.model.pre_process, self.model.post_process
        self.device = device
        self.dtype = cfg.params_dtype
        self.batch_size = batch_size
        self.max_columns = max_columns
        self.hidden = cfg.hidden_size
        self.head_dim = cfg.kv_channels
        self.scale = getattr(cfg, "softmax_scale", None) or 1.0 / math.sqrt(self.head_dim)
        # [max_positions, rot_dim / 2] half-width tables (models/rope.py) from the model's own rotary module
        # (its base, its scaling)
        freqs = self.model.rotary_pos_emb(max_positions).reshape(max_positions, -1).float()
        self.cos, self.sin = (t.to(device=device) for t in rope.half_cos_sin(freqs, self.dtype))
        self.keys: list[Optional[torch.Tensor]] = [None] * len(self.layers)  # [B, groups, max_columns, hn]
        self.values: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.columns = 0  # cache columns filled
        self.key_valid: Optional[torch.Tensor] = None  # [B, max_columns] bool (None: no padding anywhere)
        self.positions: Optional[torch.Tensor] = None  # [B] position of the next token of each row
        # F.linear, or on CPU MKL's pre-packed GEMM (the backend's choice for the device)
        self.linear = linear if linear is not None else backend.decode_linear(device)

    # ------------------------------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, prompt_lens: torch.Tensor) -> Optional[torch.Tensor]:
        """tokens [B, P] LEFT-padded prompts, prompt_lens [B] -> last-position logits [B, V/tp] (last stage)."""
        b, p = tokens.shape
        pad = p - prompt_lens  # [B] leading padding columns of each row
        cols = torch.arange(p, device=self.device)
        positions = (cols.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # [B, P]
        mask = None
        if bool((pad > 0).any()):
            self.key_valid = torch.zeros(b, self.max_columns, dtype=torch.bool, device=self.device)
            self.key_valid[:, :p] = cols.unsqueeze(0) >= pad.unsqueeze(1)
            self.key_valid[:, p:] = True
            causal = cols.unsqueeze(1) >= cols.unsqueeze(0)  # [P(query), P(key)]
            # a padding query sees itself only (it must see something: an all-masked row is NaN)
            mask = (causal & self.key_valid[:, None, :p]) | torch.eye(p, dtype=torch.bool, device=self.device)
            mask = mask.unsqueeze(1)  # [B, 1, P, P]
        self.positions = prompt_lens.to(self.device).clone()
        return self._forward(tokens, positions, mask, is_causal=mask is None)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """tokens [B] (one new token per row) -> logits [B, V/tp] for the following one (last stage)."""
        positions = self.positions.unsqueeze(1)
        mask = None
        if self.key_valid is not None:
            mask = self.key_valid[:, None, None, : self.columns + 1]  # [B, 1, 1, sk]
        out = self._forward(tokens.unsqueeze(1), positions, mask, is_causal=False)
        self.positions = self.positions + 1
        return out

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch) in the cache, in that order."""
        for i in range(len(self.layers)):
            self.keys[i] = self.keys[i].index_select(0, rows)
            self.values[i] = self.values[i].index_select(0, rows)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, rows)
        self.positions = self.positions.index_select(0, rows)
        self.batch_size = int(rows.numel())

    # ------------------------------------------------------------------------------------------ internals
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask, is_causal: bool):
        b, s = tokens.shape
        if self.pre_process:
            hidden = self.model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        else:
            hidden = torch.empty(s, b, self.hidden, dtype=self.dtype, device=self.device)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank(),
                      group=ps.get_pipeline_model_parallel_group())
        cos = self.cos[positions].transpose(0, 1).unsqueeze(2)  # [s, b, 1, rot / 2]
        sin = self.sin[positions].transpose(0, 1).unsqueeze(2)
        start = self.columns
        for i, layer in enumerate(self.layers):
            hidden = self._layer(i, layer, hidden, cos, sin, start, mask, is_causal)
        self.columns = start + s
        if not self.post_process:
            dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(),
                      group=ps.get_pipeline_model_parallel_group())
            return None
        hidden = hidden[-1:]  # only the last position's logits are sampled from
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        weight = (self.model.shared_embedding_or_output_weight()
                  if self.model.share_embeddings_and_output_weights else None)
        logits, _ = apply_linear(self.model.output_layer, hidden, weight, self.linear)
        return logits[0]  # [b, V/tp]

    def _qkv(self, attn, x: torch.Tensor, cos, sin):
        """Rotated query [s, b, np, hn] and key [s, b, ng, hn], and value [s, b, ng, hn] of one layer."""
        cfg = self.config
        ng = attn.num_query_groups_per_partition
        np_ = attn.num_attention_heads_per_partition
        plain = (cfg.num_query_groups >= ps.get_tensor_model_parallel_world_size()
                 and not getattr(cfg, "attention_output_gate", False))
        if not plain:  # megatron-core's own split (e.g. query groups replicated across TP ranks)
            q, k, v = attn.get_query_key_value_tensors(x, None)
            return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v
        # [s, b, ng * (np/ng + 2) * hn], grouped per KV head
        mixed, _ = apply_linear(attn.linear_qkv, x, linear=self.linear)
        s, b = mixed.shape[:2]
        per = np_ // ng
        mixed = mixed.view(s, b, ng, per + 2, self.head_dim)
        v = mixed[:, :, :, per + 1]  # [s, b, ng, hn]
        if attn.q_layernorm is None and attn.k_layernorm is None:
            qk = rope.apply_rope(mixed[:, :, :, : per + 1], cos.unsqueeze(2), sin.unsqueeze(2))  # one pass for q and k
            return qk[:, :, :, :per].reshape(s, b, np_, self.head_dim), qk[:, :, :, per], v
        q = mixed[:, :, :, :per].reshape(s, b, np_, self.head_dim)
        k = mixed[:, :, :, per]
        if attn.q_layernorm is not None:
            q = attn.q_layernorm(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm(k)
        return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v

    def _mlp(self, mlp, x: torch.Tensor):
        cfg = self.config
        plain = (type(mlp) is MLP and cfg.gated_linear_unit and cfg.activation_func is F.silu
                 and getattr(cfg, "activation_func_clamp_value", None) is None
                 and not getattr(cfg, "glu_linear_offset", 0.0))
        if not plain:
            return mlp(x)
        h, bias = apply_linear(mlp.linear_fc1, x, linear=self.linear)
        if bias is not None:
            h = h + bias
        if getattr(cfg, "use_te_activation_func", False) and not getattr(mlp.activation_func, "silu_glu", False):
            act = mlp.activation_func(h)  # the spec's activation module, on the whole fc1 output
        else:
            gate, up = h.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return apply_linear(mlp.linear_fc2, act, linear=self.linear)

    def _layer(self, i: int, layer, hidden, cos, sin, start: int, mask, is_causal: bool):
        attn = layer.self_attention
        residual = hidden
        q, k, v = self._qkv(attn, layer.input_layernorm(hidden), cos, sin)
        s, b, np_, hn = q.shape
        if self.keys[i] is None:
            self.keys[i] = torch.empty(b, k.shape[2], self.max_columns, hn, dtype=k.dtype, device=k.device)
            self.values[i] = torch.empty_like(self.keys[i])
        end = start + s
        self.keys[i][:, :, start:end] = k.permute(1, 2, 0, 3)
        self.values[i][:, :, start:end] = v.permute(1, 2, 0, 3)
        keys, values = self.keys[i][:, :, :end], self.values[i][:, :, :end]
        groups = keys.shape[1]
        kwargs = {}
        if groups != np_:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                keys = keys.repeat_interleave(np_ // groups, dim=1)
                values = values.repeat_interleave(np_ // groups, dim=1)
        context = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values, attn_mask=mask,
                                                 is_causal=is_causal and s > 1, scale=self.scale, **kwargs)
        context = context.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)  # [s, b, np * hn]
        out, bias = apply_linear(attn.linear_proj, context, linear=self.linear)
        hidden = residual + out if bias is None else residual + out + bias
        residual = hidden
        out, bias = self._mlp(layer.mlp, layer.pre_mlp_layernorm(hidden))
        return residual + out if bias is None else residual + out + bias
