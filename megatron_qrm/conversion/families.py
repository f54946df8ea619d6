"""Per-architecture mapping tables: Hugging Face <-> Megatron-Core, one declarative table per family.

A family is data, not code: which HF classes it covers, how the HF ``config.json`` maps onto
:class:`~megatron_qrm.config.ModelConfig`, which HF settings it cannot represent, and one
:class:`TensorMap` per Megatron checkpoint tensor naming the HF tensors it is made of and the
transform (an entry of :data:`megatron_qrm.conversion.ops.OPS`) that joins/splits them:

* ``copy``     one tensor as is (``tp_axis``: the dim Megatron splits across TP, ``None`` = replicated);
* ``qkv``      q, k, v -> one fused tensor, interleaved per query group ``[q heads of g, k_g, v_g]``
               (GQA; also the Qwen2 q/k/v biases);
* ``gate_up``  gate, up -> SwiGLU ``linear_fc1`` ``[gate; up]`` (each half split across TP on its own);
* ``vocab``    embedding / LM head rows, padded with zero rows to Megatron's padded vocabulary;
* ``head``     the Q-RM token head ``[1, hidden]`` <- ``score.weight`` of ``*ForTokenClassification`` /
               ``*ForSequenceClassification`` (``num_labels = 1``), fresh when the HF model has none;
* ``zero_bias`` ``score.bias``: our head has no bias; exported as zeros, checked (and dropped) on import.

Megatron keys are the global dist-checkpointing keys (layout-agnostic): keys under ``decoder.layers.``
carry a leading layer axis of size ``num_layers``. HF names use ``{i}`` for the layer index.

Adding a family (e.g. Mistral) is adding a table here; nothing else branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_qrm.config import ROLES, ModelConfig
from megatron_qrm.conversion.errors import ConversionError

LAYER_PREFIX = "decoder.layers."
SCORED_ROLES = ("reward", "critic")

# HF model head kinds
LM, TOKEN, SEQUENCE = "lm", "token", "sequence"


@dataclass(frozen=True)
class TensorMap:
    """One Megatron checkpoint tensor and the HF tensors it is made of (see module docstring)."""

    megatron: Optional[str]
    hf: tuple[str, ...]
    op: str
    tp_axis: Optional[int] = None  # op "copy" only
    roles: tuple[str, ...] = ROLES
    requires: Optional[str] = None  # a boolean ModelConfig field that must be true; "!field": false

    @property
    def per_layer(self) -> bool:
        return any("{i}" in name for name in self.hf)

    def applies(self, model: ModelConfig, role: str) -> bool:
        if role not in self.roles:
            return False
        if self.requires is None:
            return True
        negate = self.requires.startswith("!")
        value = bool(getattr(model, self.requires.lstrip("!")))
        return value != negate

    def hf_names(self, layer: Optional[int] = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if self.per_layer else self.hf


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    architectures: dict[str, str]  # HF class -> head kind (lm / token / sequence)
    export_classes: dict[str, str]  # head kind -> HF class written on export
    config_fields: dict[str, str]  # ModelConfig field -> HF config key
    config_defaults: dict[str, Any]  # HF key -> value when config.json omits it (transformers' default)
    fixed: dict[str, Any]  # ModelConfig fields the family fixes
    required: dict[str, tuple]  # HF key -> allowed values (absent key is fine); lists: every element
    export_config: dict[str, Any]  # constant HF config entries written on export
    tensors: tuple[TensorMap, ...]
    ignored: tuple[str, ...] = ()  # regexes of HF tensors that carry no weights
    # dist-checkpointing ShardedObjects every layer has (Transformer Engine / local linears' extra
    # state; `core_attention` is TE's). Written as `None` so a local-spec or TE model finds them.
    extra_states: tuple[str, ...] = field(default=(
        "decoder.layers.self_attention.linear_qkv._extra_state",
        "decoder.layers.self_attention.linear_proj._extra_state",
        "decoder.layers.self_attention.core_attention._extra_state",
        "decoder.layers.mlp.linear_fc1._extra_state",
        "decoder.layers.mlp.linear_fc2._extra_state",
    ))

    def tensor_maps(self, model: ModelConfig, role: str) -> list[TensorMap]:
        return [t for t in self.tensors if t.applies(model, role)]

    def walk(self, model: ModelConfig, role: str) -> list[tuple[TensorMap, Optional[int]]]:
        """(map, layer) in checkpoint order: globals listed before the layers, then layer by layer,
        then the other globals (embedding, layers 0..L-1, final norm, head)."""
        maps = self.tensor_maps(model, role)
        first = next((k for k, t in enumerate(maps) if t.per_layer), len(maps))
        layered = [t for t in maps if t.per_layer]
        return ([(t, None) for t in maps[:first] if not t.per_layer]
                + [(t, i) for i in range(model.num_layers) for t in layered]
                + [(t, None) for t in maps[first:] if not t.per_layer])


_L = "model.layers.{i}."

# Llama-2 / Llama-3 / 3.1 / 3.2 (and Qwen2 below adds the q/k/v biases).
_DECODER = (
    TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    TensorMap("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), "copy"),
    TensorMap("decoder.layers.self_attention.linear_qkv.weight",
              (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"), "qkv"),
    TensorMap("decoder.layers.self_attention.linear_qkv.bias",
              (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"), "qkv",
              requires="qkv_bias"),
    TensorMap("decoder.layers.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "copy", tp_axis=1),
    TensorMap("decoder.layers.mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), "copy"),
    TensorMap("decoder.layers.mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), "gate_up"),
    TensorMap("decoder.layers.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy", tp_axis=1),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", roles=("policy",), requires="!tie_word_embeddings"),
    TensorMap("token_head.weight", ("score.weight",), "head", roles=SCORED_ROLES),
    TensorMap(None, ("score.bias",), "zero_bias", roles=SCORED_ROLES),
)

_CONFIG_FIELDS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "norm_epsilon": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}

LLAMA = Family(
    name="llama",
    model_type="llama",
    architectures={"LlamaForCausalLM": LM, "LlamaForTokenClassification": TOKEN,
                   "LlamaForSequenceClassification": SEQUENCE},
    export_classes={LM: "LlamaForCausalLM", TOKEN: "LlamaForTokenClassification"},
    config_fields=_CONFIG_FIELDS,
    config_defaults={"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                     "max_position_embeddings": 2048},
    fixed={"qkv_bias": False},
    required={"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,)},
    export_config={"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                   "pretraining_tp": 1},
    tensors=tuple(t for t in _DECODER if t.requires != "qkv_bias"),
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

QWEN2 = Family(
    name="qwen2",
    model_type="qwen2",
    architectures={"Qwen2ForCausalLM": LM, "Qwen2ForTokenClassification": TOKEN,
                   "Qwen2ForSequenceClassification": SEQUENCE},
    export_classes={LM: "Qwen2ForCausalLM", TOKEN: "Qwen2ForTokenClassification"},
    config_fields=_CONFIG_FIELDS,
    config_defaults={"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                     "max_position_embeddings": 32768},
    fixed={"qkv_bias": True},
    required={"hidden_act": ("silu",), "use_sliding_window": (False,), "layer_types": ("full_attention",)},
    export_config={"model_type": "qwen2", "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None},
    tensors=_DECODER,
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN2)}


def family_for_architecture(arch: str) -> tuple[Family, str]:
    """(family, head kind) of an HF ``architectures`` entry; a clear error for anything else."""
    for fam in FAMILIES.values():
        if arch in fam.architectures:
            return fam, fam.architectures[arch]
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise ConversionError(f"unsupported HF architecture {arch!r} (config.json `architectures`); "
                          f"supported: {', '.join(known)}")


def family_for_model(model: ModelConfig) -> Family:
    """The family a Megatron :class:`ModelConfig` exports as: its ``family`` (``llama*``, ``qwen2*``),
    or for a hand-sized ``custom`` model Qwen2 when it has q/k/v biases and Llama otherwise."""
    fam = (model.family or "custom").lower()
    for name, family in FAMILIES.items():
        if fam.startswith(name):
            return family
    if fam == "custom":
        return QWEN2 if model.qkv_bias else LLAMA
    raise ConversionError(f"no HF export for model family {model.family!r}; known: {', '.join(FAMILIES)}")
