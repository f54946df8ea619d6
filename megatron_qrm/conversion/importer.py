"""HF (Llama / Qwen2 safetensors) -> Megatron dist checkpoint, streamed tensor group by tensor group.

:func:`plan_import` reads only ``config.json`` and the safetensors headers and validates everything
(architecture, TP/PP divisibility, every expected tensor present with the right shape and a supported
dtype, output directory); :func:`run_import` then reads each HF tensor once, splits it into the chunks
each (PP stage, TP rank) holds and appends them to that rank's ``.distcp`` file. Peak memory is about
one tensor group (q+k+v, or one of gate/up, or the embedding), never the model.

Output (loads at any TP/PP; ``--pretrained-checkpoint``, ``--actor-checkpoint``, ``--load`` take OUT)::

    OUT/latest                       "iter_0000000"
    OUT/iter_0000000/                megatron-core torch_dist checkpoint
        __R_0.distcp                 one file per (pp, tp) rank R = pp*TP + tp
        qrm_config.json              kind=hf_import, role, model, tokenizer ("tokenizer", relative), ...
        tokenizer/                   the HF tokenizer files
        hf_config/                   the source config.json / generation_config.json (used on export)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_qrm.config import ModelConfig, ParallelConfig, check_parallel_layout, padded_vocab_size
from megatron_qrm.conversion import ops
from megatron_qrm.conversion.common import (
    CONFIG_FILE,
    HF_CONFIG_DIR,
    HF_SIDE_FILES,
    LATEST_FILE,
    TOKENIZER_DIR,
    check_output_dir,
    copy_files,
    has_chat_template,
    human,
    progress,
    staged_output,
    tokenizer_files,
)
from megatron_qrm.conversion.dcp_io import DistCheckpointWriter, object_key
from megatron_qrm.conversion.errors import ConversionError
from megatron_qrm.conversion.families import LM, SCORED_ROLES, Family, TensorMap
from megatron_qrm.conversion.hf_config import (
    DTYPE_FLAGS,
    architecture,
    model_config_from_hf,
    num_labels,
    read_hf_config,
)
from megatron_qrm.conversion.safetensors_io import DTYPES, SafetensorsReader

log = logging.getLogger("megatron_qrm.conversion")
ITER_DIR = "iter_0000000"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_FLAG_NAMES = {v: k for k, v in DTYPE_FLAGS.items()}


@dataclass
class Group:
    """One Megatron tensor of one layer (or a global one) and its HF sources."""

    tmap: TensorMap
    layer: Optional[int]
    sources: tuple[str, ...]
    stage: int
    layer_shape: tuple[int, ...]  # Megatron shape without the layer axis
    global_shape: tuple[int, ...]  # with it, for per-layer tensors
    fresh: bool = False  # token head initialised here (the HF model has none)

    @property
    def key(self) -> Optional[str]:
        return self.tmap.megatron


@dataclass
class ImportPlan:
    hf_path: str
    out: str
    role: str
    tp: int
    pp: int
    dtype: torch.dtype
    family: Family
    head_kind: str
    architecture: str
    model: ModelConfig
    padded_vocab: int
    groups: list[Group]
    reader: SafetensorsReader
    hf_config: dict[str, Any]
    tokenizer_dir: Optional[str]
    tokenizer_names: list[str]
    ignored: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seed: int = 1234

    @property
    def dims(self) -> ops.Dims:
        return ops.Dims.of(self.model, self.padded_vocab)

    @property
    def layers_per_stage(self) -> int:
        return self.model.num_layers // self.pp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    @property
    def head_source(self) -> Optional[str]:
        if self.role not in SCORED_ROLES:
            return None
        g = next(g for g in self.groups if g.tmap.op == "head")
        return f"fresh (seed {self.seed})" if g.fresh else g.sources[0]

    # ---- the shard plan, from the same chunking code the import runs (on meta tensors) ----
    def chunks(self, group: Group, load=None):
        op = ops.op_for(group.tmap)
        if load is None:
            def load(j):  # shapes only
                return torch.empty(self.reader.info(group.sources[j]).shape if not group.fresh
                                   else (1, self.model.hidden_size), device="meta")
        return op.import_chunks(self.dims, self.tp, load)

    def _chunk_sources(self, group: Group):
        """(tp rank, offsets, meta chunk, the HF tensors it is made of) of ``group``."""
        touched: list[int] = []

        def load(j):
            touched.append(j)
            return torch.empty(self.reader.info(group.sources[j]).shape if not group.fresh
                               else (1, self.model.hidden_size), device="meta")

        last: list[int] = []
        for tp_rank, offsets, chunk in self.chunks(group, load):
            if touched:
                last, touched[:] = list(touched), []
            yield tp_rank, offsets, chunk, [group.sources[j] for j in last]

    def shard_plan(self) -> list[dict[str, Any]]:
        """Per (pp, tp) rank: its file, layers, bytes, and every tensor chunk with its HF sources."""
        esize = torch.empty((), dtype=self.dtype).element_size()
        ranks = {}
        for stage in range(self.pp):
            lo = stage * self.layers_per_stage
            for t in range(self.tp):
                ranks[(stage, t)] = {"rank": self.rank(stage, t), "pp": stage, "tp": t,
                                     "file": f"{ITER_DIR}/{DistCheckpointWriter.file_name(self.rank(stage, t))}",
                                     "layers": [lo, lo + self.layers_per_stage - 1], "bytes": 0, "tensors": []}
        seen = set()
        for g in self.groups:
            if g.key is None:
                continue
            for tp_rank, offsets, chunk, sources in self._chunk_sources(g):
                entry = ranks[(g.stage, tp_rank)]
                entry["bytes"] += chunk.numel() * esize
                sig = (g.stage, tp_rank, g.key, tuple(offsets))
                if g.layer is not None and sig in seen:
                    continue  # per-layer tensors: described once per rank, for its first layer
                seen.add(sig)
                sources = [s.replace(f".{g.layer}.", ".{i}.") if g.layer is not None else s for s in sources]
                entry["tensors"].append({
                    "key": g.key, "shape": list(chunk.shape), "offsets": list(offsets),
                    "global_shape": list(g.layer_shape), "per_layer": g.layer is not None,
                    "from": ["fresh token head"] if g.fresh else sources})
        return list(ranks.values())

    def describe(self) -> str:
        m = self.model
        lines = [
            f"HF {self.hf_path}: {self.architecture} ({self.family.name}), {len(self.reader.files)} safetensors "
            f"file(s), {human(sum(self.reader.shard_sizes().values()))}",
            f"-> Megatron {self.out}: role {self.role}, TP={self.tp} PP={self.pp}, dtype "
            f"{DTYPE_FLAG_NAMES[self.dtype]}, {m.num_layers} layers ({self.layers_per_stage} per stage), "
            f"vocab {m.vocab_size} -> padded {self.padded_vocab}"
            + (f", token head: {self.head_source}" if self.head_source else ""),
            f"   tokenizer: {', '.join(self.tokenizer_names) if self.tokenizer_names else 'none found'}",
        ]
        for r in self.shard_plan():
            lines.append(f"rank {r['rank']} (pp {r['pp']}, tp {r['tp']}): layers {r['layers'][0]}-{r['layers'][1]}, "
                         f"{human(r['bytes'])} -> {r['file']}")
            for t in r["tensors"]:
                where = ", ".join(f"{o}:{o + s}" for o, s in zip(t["offsets"], t["shape"]))
                lead = "  [each layer] " if t["per_layer"] else "  "
                lines.append(f"  {lead}{t['key']} [{where}] of {t['global_shape']} <- {', '.join(t['from'])}")
        if self.ignored:
            lines.append(f"ignored HF tensors: {', '.join(self.ignored)}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _fresh_head(hidden: int, seed: int) -> torch.Tensor:
    """The token head megatron_qrm's TokenHead initialises with ``seed``: U(-1/sqrt(h), 1/sqrt(h))."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, hidden, generator=gen) * 2 - 1) * hidden**-0.5


def plan_import(hf_path: str, out: str, *, tp: int = 1, pp: int = 1, role: str = "policy",
                dtype: Optional[str] = None, tokenizer: Optional[str] = None, overwrite: bool = False,
                seed: int = 1234, check_out: bool = True) -> ImportPlan:
    """Validate the inputs and plan the import; reads only config.json and safetensors headers."""
    if role not in ("policy", "reward", "critic"):
        raise ConversionError(f"--role {role!r}: choose policy, reward or critic")
    cfg = read_hf_config(hf_path)
    family, kind, arch = architecture(cfg, f"{hf_path}/config.json")
    if role == "policy" and kind != LM:
        raise ConversionError(f"{arch} has no LM head; import it with --role reward (or critic)")
    if role in SCORED_ROLES and kind != LM and num_labels(cfg) != 1:
        raise ConversionError(f"{arch} has num_labels={num_labels(cfg)}; a token reward head needs num_labels=1")
    model = model_config_from_hf(cfg, family)
    if tp < 1 or pp < 1:
        raise ConversionError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    try:
        check_parallel_layout(model, ParallelConfig(tp, pp), tp * pp)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if dtype is not None and dtype not in ("bf16", "fp32"):
        raise ConversionError(f"--dtype {dtype!r} is not supported; choose bf16 or fp32")
    reader = SafetensorsReader(hf_path)
    if check_out:
        check_output_dir(out, overwrite)

    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    dims = ops.Dims.of(model, padded)
    per_stage = model.num_layers // pp
    groups: list[Group] = []
    used: set[str] = set()
    missing: list[str] = []
    warnings: list[str] = []
    maps = family.tensor_maps(model, role)
    for tm, layer in family.walk(model, role):
        names = tm.hf_names(layer)
        present = [n for n in names if n in reader]
        if tm.op == "zero_bias":
            used.update(present)
            for n in present:
                if reader.read(n).abs().max() > 0:
                    warnings.append(f"{n} is not zero; the token head has no bias, so scores shift by that "
                                    f"constant (pairwise losses are unaffected)")
            continue
        fresh = False
        if len(present) != len(names):
            if tm.op == "head" and kind == LM and not present:
                fresh = True
            else:
                missing.extend(n for n in names if n not in reader)
                continue
        used.update(present)
        if tm.per_layer:
            stage = layer // per_stage
        else:
            stage = 0 if tm.megatron.startswith("embedding.") else pp - 1
        hf_shapes = [(1, model.hidden_size)] if fresh else [reader.info(n).shape for n in names]
        op = ops.op_for(tm)
        shape = tuple(op.megatron_shape(hf_shapes, dims))
        expected = tuple(ops.megatron_shape(tm.megatron, dims))
        if shape != expected or [tuple(s) for s in op.hf_shapes(expected, dims)] != [tuple(s) for s in hf_shapes]:
            raise ConversionError(f"{', '.join(names)}: shapes {hf_shapes} do not match config.json "
                                  f"(Megatron {tm.megatron} expects {list(expected)})")
        groups.append(Group(tm, layer, names, stage, expected,
                            ((model.num_layers,) + expected) if tm.per_layer else expected, fresh))
    if missing:
        raise ConversionError(f"{hf_path}: missing HF tensor(s) {', '.join(missing[:6])}"
                              f"{' ...' if len(missing) > 6 else ''} (for {arch}, role {role})")

    # tensors the table knows but this role/config does not use (lm_head of a tied model or of a
    # reward import, ...) and weight-less buffers are ignored; anything else is an unsupported variant
    known_unused = {n for tm in family.tensors if tm not in maps
                    for layer in (range(model.num_layers) if tm.per_layer else [None]) for n in tm.hf_names(layer)}
    ignored, unexpected = [], []
    for name in reader.tensors:
        if name in used:
            continue
        if name in known_unused or any(re.fullmatch(p, name) for p in family.ignored):
            ignored.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ConversionError(f"{hf_path}: HF tensor(s) with no mapping for {family.name}: {', '.join(unexpected[:6])}"
                              f"{' ...' if len(unexpected) > 6 else ''} (an unsupported variant of the architecture?)")

    src_dtypes = {reader.info(n).dtype_name for g in groups if not g.fresh for n in g.sources}
    bad = sorted(d for d in src_dtypes if reader.tensors and torch_dtype(d) not in FLOAT_DTYPES)
    if bad:
        raise ConversionError(f"{hf_path}: tensor dtype(s) {', '.join(bad)} are not supported (quantized "
                              f"weights?); convert bf16/fp16/fp32 weights")
    if dtype is None:
        emb = reader.info(groups[0].sources[0]).dtype_name
        if torch_dtype(emb) == torch.float16:
            raise ConversionError(f"{hf_path}: weights are float16; pass --dtype bf16 (the training dtype, "
                                  f"rounds) or --dtype fp32 (exact)")
        out_dtype = torch_dtype(emb)
    else:
        out_dtype = DTYPE_FLAGS[dtype]

    tok_dir = tokenizer or hf_path
    tok_names = tokenizer_files(tok_dir)
    if tokenizer and not tok_names:
        raise ConversionError(f"--tokenizer {tokenizer}: no tokenizer files there")
    if not tok_names:
        warnings.append(f"no tokenizer files in {hf_path}; pass --tokenizer DIR (here or to the trainers)")
    return ImportPlan(hf_path=hf_path, out=out, role=role, tp=tp, pp=pp, dtype=out_dtype, family=family,
                      head_kind=kind, architecture=arch, model=model, padded_vocab=padded, groups=groups,
                      reader=reader, hf_config=cfg, tokenizer_dir=tok_dir if tok_names else None,
                      tokenizer_names=tok_names, ignored=ignored, warnings=warnings, seed=seed)


def torch_dtype(name: str) -> Optional[torch.dtype]:
    return DTYPES.get(name)


def qrm_config(plan: ImportPlan) -> dict[str, Any]:
    return {
        "kind": "hf_import",
        "role": plan.role,
        "model": plan.model.to_dict(),
        "tokenizer": TOKENIZER_DIR if plan.tokenizer_dir else None,  # relative: resolved by read_config
        # the trainers and evaluators render prompts with the template by default when this is true
        "chat_template": has_chat_template(plan.tokenizer_dir),
        "hf_config": HF_CONFIG_DIR,
        "lora": {"rank": 0, "alpha": None, "targets": ["qkv", "proj", "fc1", "fc2"]},
        "iteration": 0,
        "dtype": DTYPE_FLAG_NAMES[plan.dtype],
        "parallel": {"tensor_model_parallel_size": plan.tp, "pipeline_model_parallel_size": plan.pp},
        "padded_vocab_size": plan.padded_vocab,
        "hf_source": {"path": os.path.abspath(plan.hf_path), "architecture": plan.architecture,
                      "family": plan.family.name, "token_head": plan.head_source},
    }


def run_import(plan: ImportPlan, *, show_progress: bool = True) -> str:
    """Write the checkpoint planned by :func:`plan_import`; returns the output directory."""
    model, reader = plan.model, plan.reader
    for w in plan.warnings:
        log.warning(w)
    with staged_output(plan.out) as tmp:
        ckpt = os.path.join(tmp, ITER_DIR)
        writer = DistCheckpointWriter(ckpt)
        esize = torch.empty((), dtype=plan.dtype).element_size()
        for stage in range(plan.pp):
            groups = [g for g in plan.groups if g.stage == stage and g.key is not None]
            total = sum(math.prod(g.layer_shape) * esize for g in groups)
            files = ", ".join(DistCheckpointWriter.file_name(plan.rank(stage, t)) for t in range(plan.tp))
            bar = progress(total, f"pp stage {stage}/{plan.pp} -> {files}", show_progress)
            for g in groups:
                def load(j, g=g):
                    return _fresh_head(model.hidden_size, plan.seed) if g.fresh else reader.read(g.sources[j])

                for tp_rank, offsets, chunk in plan.chunks(g, load):
                    if g.layer is not None:
                        chunk, offsets = chunk.unsqueeze(0), (g.layer,) + tuple(offsets)
                    writer.write_tensor(g.key, g.global_shape, plan.dtype, tuple(offsets), chunk,
                                        plan.rank(stage, tp_rank))
                    bar.update(chunk.numel() * esize)
                    del chunk
            lo = stage * plan.layers_per_stage
            for layer in range(lo, lo + plan.layers_per_stage):
                for key in plan.family.extra_states:
                    writer.write_object(object_key(key, layer, model.num_layers), None, plan.rank(stage, 0))
            bar.close()
        writer.finish()
        if plan.tokenizer_dir:
            copy_files(plan.tokenizer_dir, plan.tokenizer_names, os.path.join(ckpt, TOKENIZER_DIR))
        side = [fn for fn in HF_SIDE_FILES if os.path.exists(os.path.join(plan.hf_path, fn))]
        copy_files(plan.hf_path, side, os.path.join(ckpt, HF_CONFIG_DIR))
        with open(os.path.join(ckpt, CONFIG_FILE), "w") as f:
            json.dump(qrm_config(plan), f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, LATEST_FILE), "w") as f:
            f.write(ITER_DIR)
    log.info("imported %s -> %s (%s written)", plan.hf_path, plan.out, human(writer.bytes_written))
    return plan.out


def import_hf(hf_path: str, out: str, *, tp: int = 1, pp: int = 1, role: str = "policy",
              dtype: Optional[str] = None, tokenizer: Optional[str] = None, overwrite: bool = False,
              seed: int = 1234, dry_run: bool = False, show_progress: bool = True):
    """Plan (and unless ``dry_run``, run) an import. Returns the plan (dry run) or the output dir."""
    plan = plan_import(hf_path, out, tp=tp, pp=pp, role=role, dtype=dtype, tokenizer=tokenizer,
                       overwrite=overwrite, seed=seed)
    if dry_run:
        return plan
    return run_import(plan, show_progress=show_progress)
