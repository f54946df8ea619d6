"""HF ``config.json`` <-> :class:`~megatron_qrm.config.ModelConfig`, driven by the family tables.

Reads both config styles: transformers 4.x / hub files (``rope_theta``, ``rope_scaling``, ``torch_dtype``)
and transformers 5.x (``rope_parameters``, ``dtype``). Writes the 4.x style, which both read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from megatron_qrm.config import ModelConfig
from megatron_qrm.conversion.errors import ConversionError
from megatron_qrm.conversion.families import LM, SEQUENCE, TOKEN, Family, family_for_architecture

# megatron-core implements Llama-3.x RoPE scaling with these constants only (rotary_pos_embedding.py)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_JSON = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-path {hf_dir}: not a directory")
    if not os.path.exists(path):
        raise ConversionError(f"--hf-path {hf_dir}: no config.json")
    with open(path) as f:
        return json.load(f)


def architecture(cfg: dict[str, Any], where: str = "config.json") -> tuple[Family, str, str]:
    """(family, head kind, class name) of an HF config."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ConversionError(f"{where} has no `architectures` entry; cannot tell the model class")
    family, kind = family_for_architecture(archs[0])
    mt = cfg.get("model_type")
    if mt is not None and mt != family.model_type:
        raise ConversionError(f"{where}: architecture {archs[0]} with model_type {mt!r} "
                              f"(expected {family.model_type!r})")
    return family, kind, archs[0]


def rope_settings(cfg: dict[str, Any]) -> tuple[float, Optional[float]]:
    """(rope theta, Llama-3.x scaling factor or None); errors on scaling megatron-core cannot do."""
    params = cfg.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (5.x)
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds):
            raise ConversionError(f"config.json: per-layer rope_parameters differ ({params}); not supported")
        params = kinds[0]
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rtype = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if float(theta) != int(theta):
        raise ConversionError(f"config.json: rope_theta {theta} is not an integer (megatron-core takes an int)")
    if rtype in (None, "default"):
        return float(theta), None
    if rtype != "llama3":
        raise ConversionError(f"config.json: rope scaling type {rtype!r} is not supported; megatron-core "
                              f"implements only Llama-3.x scaling (rope_type 'llama3')")
    for key, value in LLAMA3_ROPE.items():
        got = scaling.get(key, value)
        if float(got) != value:
            raise ConversionError(f"config.json: llama3 rope scaling with {key}={got} is not supported; "
                                  f"megatron-core fixes {key}={value:g} (every Llama-3.x release uses it)")
    if "factor" not in scaling:
        raise ConversionError("config.json: llama3 rope scaling without `factor`")
    return float(theta), float(scaling["factor"])


def model_config_from_hf(cfg: dict[str, Any], family: Family) -> ModelConfig:
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ConversionError(f"config.json: quantized checkpoints ({method}) are not supported (dtype); "
                              f"convert the unquantized bf16/fp32 weights")
    for key, allowed in family.required.items():
        if key not in cfg or cfg[key] is None:
            continue
        values = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ConversionError(f"config.json: {key}={cfg[key]!r} is not supported for {family.name} "
                                  f"(supported: {', '.join(map(repr, allowed))})")
    get = lambda key: cfg.get(key, family.config_defaults.get(key))  # noqa: E731
    values: dict[str, Any] = {}
    for field, key in family.config_fields.items():
        v = get(key)
        if v is None and field != "num_query_groups":
            raise ConversionError(f"config.json: missing {key}")
        values[field] = v
    values.update(family.fixed)
    values["rotary_base"], values["rope_scaling_factor"] = rope_settings(cfg)
    values["family"] = family.name
    heads = values["num_attention_heads"]
    if values["hidden_size"] % heads:
        raise ConversionError(f"config.json: hidden_size {values['hidden_size']} not divisible by "
                              f"num_attention_heads {heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != values["hidden_size"] // heads:
        raise ConversionError(f"config.json: head_dim {head_dim} != hidden_size / num_attention_heads "
                              f"({values['hidden_size'] // heads}); not supported")
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ConversionError(f"config.json: {e}") from None


def source_dtype(cfg: dict[str, Any]) -> Optional[torch.dtype]:
    name = cfg.get("torch_dtype", cfg.get("dtype"))
    return TORCH_DTYPES.get(name) if isinstance(name, str) else None


def num_labels(cfg: dict[str, Any]) -> int:
    if cfg.get("id2label"):
        return len(cfg["id2label"])
    return int(cfg.get("num_labels", 2))


# keys rewritten (or dropped) on export; everything else of the source config is kept
_DROP_ON_EXPORT = ("rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype", "transformers_version",
                   "architectures", "id2label", "label2id", "num_labels", "layer_types", "head_dim", "auto_map",
                   "problem_type", "token_classification_bias", "quantization_config")


def hf_config_from_model(model: ModelConfig, family: Family, kind: str, dtype: torch.dtype,
                         base: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json for an export: the source HF config when known (token ids, generation settings),
    with every architecture field taken from ``model`` so the two can never disagree."""
    cfg = {k: v for k, v in (base or {}).items() if k not in _DROP_ON_EXPORT}
    cfg.update(family.export_config)
    for field, key in family.config_fields.items():
        cfg[key] = getattr(model, field)
    cfg["head_dim"] = model.kv_channels
    cfg["rope_theta"] = float(model.rotary_base)
    cfg["rope_scaling"] = (dict(rope_type="llama3", factor=float(model.rope_scaling_factor), **LLAMA3_ROPE)
                           if model.rope_scaling_factor else None)
    cfg["architectures"] = [family.export_classes[kind]]
    cfg["torch_dtype"] = DTYPE_JSON[dtype]
    if kind in (TOKEN, SEQUENCE):
        cfg["id2label"] = {"0": "LABEL_0"}
        cfg["label2id"] = {"LABEL_0": 0}
    cfg.setdefault("initializer_range", 0.02)
    cfg.setdefault("use_cache", True)
    assert kind != LM or "id2label" not in cfg
    return dict(sorted(cfg.items()))
