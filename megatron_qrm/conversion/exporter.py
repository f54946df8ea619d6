"""Megatron dist checkpoint -> HF safetensors (``*ForCausalLM`` for a policy, ``*ForTokenClassification``
with ``num_labels=1`` for a reward model / critic), streamed layer by layer.

Works on any checkpoint of this project (an import, ``qrm train-rm``, the RL trainers' actor/critic),
saved with any TP/PP: tensors are read by region from the dist checkpoint (only the chunks of one
layer are loaded at a time), LoRA adapters are merged into their base weights (``W + alpha/r * B A``),
the vocabulary is un-padded, and HF shards are written tensor by tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_qrm.config import ModelConfig
from megatron_qrm.conversion import ops
from megatron_qrm.conversion.common import (
    CONFIG_FILE,
    HF_CONFIG_DIR,
    LATEST_FILE,
    check_output_dir,
    copy_files,
    human,
    progress,
    staged_output,
    tokenizer_files,
)
from megatron_qrm.conversion.dcp_io import DistCheckpointReader
from megatron_qrm.conversion.errors import ConversionError
from megatron_qrm.conversion.families import LM, TOKEN, Family, TensorMap, family_for_model
from megatron_qrm.conversion.hf_config import DTYPE_FLAGS, hf_config_from_model
from megatron_qrm.conversion.safetensors_io import ShardedSafetensorsWriter, parse_size

log = logging.getLogger("megatron_qrm.conversion")
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# LoRA targets (megatron_qrm.models.lora.LORA_TARGETS) by the base weight they adapt
_LORA_BASES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def resolve_megatron_checkpoint(path: str) -> str:
    """A checkpoint directory (has qrm_config.json) from it, or from a save dir (``latest`` / newest
    ``iter_*``) -- the same rules as megatron_qrm.checkpointing.resolve_checkpoint."""
    if os.path.exists(os.path.join(path, CONFIG_FILE)) and not path.endswith(".tmp"):
        return path
    if os.path.isdir(path):
        marker = os.path.join(path, LATEST_FILE)
        if os.path.exists(marker):
            with open(marker) as f:
                name = f.read().strip()
            if os.path.exists(os.path.join(path, name, CONFIG_FILE)):
                return os.path.join(path, name)
        done = sorted(d for d in os.listdir(path) if _ITER_RE.match(d)
                      and os.path.exists(os.path.join(path, d, CONFIG_FILE)))
        if done:
            return os.path.join(path, done[-1])
    raise ConversionError(f"--megatron-path {path}: no complete checkpoint (expected {CONFIG_FILE}, or a "
                          f"`{LATEST_FILE}` file naming one)")


@dataclass
class ExportGroup:
    tmap: TensorMap
    layer: Optional[int]
    names: tuple[str, ...]
    shapes: list[tuple[int, ...]]


@dataclass
class ExportPlan:
    checkpoint: str
    out: str
    config: dict[str, Any]
    model: ModelConfig
    role: str
    family: Family
    kind: str
    dtype: torch.dtype
    padded_vocab: int
    groups: list[ExportGroup]
    reader: DistCheckpointReader
    lora_scale: Optional[float]
    hf_config: dict[str, Any]
    side_dir: Optional[str]
    tokenizer_dir: Optional[str]
    tokenizer_names: list[str]
    max_shard_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def dims(self) -> ops.Dims:
        return ops.Dims.of(self.model, self.padded_vocab)

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(n, s, self.dtype) for g in self.groups for n, s in zip(g.names, g.shapes)]

    def describe(self) -> str:
        writer = ShardedSafetensorsWriter(self.out, self.entries(), self.max_shard_bytes)
        lines = [f"Megatron {self.checkpoint}: role {self.role}, {self.model.num_layers} layers, padded vocab "
                 f"{self.padded_vocab} -> {self.model.vocab_size}"
                 + (f", LoRA merged (scale {self.lora_scale:g})" if self.lora_scale is not None else ""),
                 f"-> HF {self.out}: {self.hf_config['architectures'][0]}, dtype {self.hf_config['torch_dtype']}"]
        for (name, entries), size in zip(writer.shards, writer.shard_bytes):
            lines.append(f"  {name}: {len(entries)} tensors, {human(size)}")
        return "\n".join(lines)


def _source_hf_config(ckpt: str, cfg: dict[str, Any], tokenizer_dir: Optional[str]) -> Optional[str]:
    """Where the source HF config.json is: in the checkpoint (an import), else beside the tokenizer a
    trained checkpoint recorded (an import keeps tokenizer/ and hf_config/ side by side)."""
    candidates = [os.path.join(ckpt, cfg.get("hf_config") or HF_CONFIG_DIR)]
    if tokenizer_dir:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(tokenizer_dir)), HF_CONFIG_DIR))
    return next((c for c in candidates if os.path.exists(os.path.join(c, "config.json"))), None)


def plan_export(megatron_path: str, out: str, *, dtype: Optional[str] = None, max_shard_size: str = "5GB",
                tokenizer: Optional[str] = None, overwrite: bool = False, check_out: bool = True) -> ExportPlan:
    ckpt = resolve_megatron_checkpoint(megatron_path)
    with open(os.path.join(ckpt, CONFIG_FILE)) as f:
        cfg = json.load(f)
    if "model" not in cfg:
        raise ConversionError(f"{ckpt}/{CONFIG_FILE} records no model config")
    model = ModelConfig.from_dict(cfg["model"])
    role = cfg.get("role") or "policy"
    family = family_for_model(model)
    kind = LM if role == "policy" else TOKEN
    reader = DistCheckpointReader(ckpt)
    if dtype is not None and dtype not in DTYPE_FLAGS:
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose bf16, fp16 or fp32")
    if check_out:
        check_output_dir(out, overwrite)
    if "embedding.word_embeddings.weight" not in reader:
        raise ConversionError(f"{ckpt}: no embedding.word_embeddings.weight in the checkpoint")
    padded = reader.shape("embedding.word_embeddings.weight")[0]
    if model.vocab_size <= 0 or model.vocab_size > padded:
        raise ConversionError(f"{ckpt}: vocab_size {model.vocab_size} does not fit the embedding ({padded} rows)")
    dims = ops.Dims.of(model, padded)
    groups: list[ExportGroup] = []
    for tm, layer in family.walk(model, role):
        op = ops.op_for(tm)
        if tm.megatron is None:
            meg_shape: tuple = ()
        else:
            if tm.megatron not in reader:
                raise ConversionError(f"{ckpt}: checkpoint lacks {tm.megatron} (role {role}; is it a "
                                      f"{'reward model' if role == 'policy' else 'policy'}?)")
            meg_shape = reader.shape(tm.megatron)[1:] if tm.per_layer else reader.shape(tm.megatron)
            if tm.per_layer and reader.shape(tm.megatron)[0] != model.num_layers:
                raise ConversionError(f"{ckpt}: {tm.megatron} has {reader.shape(tm.megatron)[0]} layers, "
                                      f"the config says {model.num_layers}")
            expected = ops.megatron_shape(tm.megatron, dims)
            if tuple(meg_shape) != tuple(expected):
                raise ConversionError(f"{ckpt}: {tm.megatron} has shape {list(meg_shape)}, the config implies "
                                      f"{list(expected)}")
        groups.append(ExportGroup(tm, layer, tm.hf_names(layer), [tuple(s) for s in op.hf_shapes(meg_shape, dims)]))
    lora = cfg.get("lora") or {}
    lora_scale = None
    if lora.get("rank"):
        lora_scale = (lora.get("alpha") or lora["rank"]) / lora["rank"]
    out_dtype = DTYPE_FLAGS[dtype] if dtype else reader.dtype("embedding.word_embeddings.weight")

    tok = tokenizer or cfg.get("tokenizer")
    if tok and not os.path.isabs(tok) and os.path.exists(os.path.join(ckpt, tok)):
        tok = os.path.join(ckpt, tok)
    tok_names = tokenizer_files(tok)
    warnings = []
    if not tok_names:
        warnings.append(f"no tokenizer files found ({tok or 'none recorded'}); the export has none "
                        f"(pass --tokenizer DIR)")
    side = _source_hf_config(ckpt, cfg, tok if tok_names else None)
    base = None
    if side:
        with open(os.path.join(side, "config.json")) as f:
            base = json.load(f)
    hf_cfg = hf_config_from_model(model, family, kind, out_dtype, base)
    return ExportPlan(checkpoint=ckpt, out=out, config=cfg, model=model, role=role, family=family, kind=kind,
                      dtype=out_dtype, padded_vocab=padded, groups=groups, reader=reader, lora_scale=lora_scale,
                      hf_config=hf_cfg, side_dir=side, tokenizer_dir=tok if tok_names else None,
                      tokenizer_names=tok_names, max_shard_bytes=parse_size(max_shard_size), warnings=warnings)


def _read_megatron(plan: ExportPlan, key: str, layer: Optional[int]) -> torch.Tensor:
    """One layer's tensor (LoRA merged when the checkpoint has adapters for it)."""
    t = plan.reader.read(key, layer)
    base = key[: -len(".weight")] if key.endswith(".weight") else None
    if base and plan.lora_scale is not None and f"{base}.lora.lora_a" in plan.reader:
        t = ops.merge_lora(t, plan.reader.read(f"{base}.lora.lora_a", layer),
                           plan.reader.read(f"{base}.lora.lora_b", layer), plan.lora_scale)
    return t


def run_export(plan: ExportPlan, *, show_progress: bool = True) -> str:
    for w in plan.warnings:
        log.warning(w)
    dims = plan.dims
    with staged_output(plan.out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan.entries(), plan.max_shard_bytes)
        index, bar, shard = 0, None, -1
        for g in plan.groups:
            full = None if g.tmap.megatron is None else _read_megatron(plan, g.tmap.megatron, g.layer)
            for j, t in ops.op_for(g.tmap).export(dims, full):
                if writer.shard_of(index) != shard:
                    if bar is not None:
                        bar.close()
                    shard = writer.shard_of(index)
                    name, _ = writer.shards[shard]
                    bar = progress(writer.shard_bytes[shard], name, show_progress)
                t = t.to(plan.dtype)
                writer.write(g.names[j], t)
                bar.update(t.numel() * t.element_size())
                index += 1
                del t
            del full
        if bar is not None:
            bar.close()
        writer.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(plan.hf_config, f, indent=2)
        if plan.side_dir and os.path.exists(os.path.join(plan.side_dir, "generation_config.json")):
            copy_files(plan.side_dir, ["generation_config.json"], tmp)
        if plan.tokenizer_dir:
            copy_files(plan.tokenizer_dir, plan.tokenizer_names, tmp)
    log.info("exported %s -> %s (%s)", plan.checkpoint, plan.out, plan.hf_config["architectures"][0])
    return plan.out


def export_hf(megatron_path: str, out: str, *, dtype: Optional[str] = None, max_shard_size: str = "5GB",
              tokenizer: Optional[str] = None, overwrite: bool = False, dry_run: bool = False,
              show_progress: bool = True):
    plan = plan_export(megatron_path, out, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tokenizer,
                       overwrite=overwrite)
    if dry_run:
        return plan
    return run_export(plan, show_progress=show_progress)
