"""`qrm eval-rm`: pairwise accuracy and margin of a trained reward model on a preference file, and
optionally every response token's credit (token text + score) for inspection."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import ModelConfig, ParallelConfig, check_parallel_layout
from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, load_tokenizer, pad_multiple_for
from megatron_qrm.data.chat import resolve_chat_template
from megatron_qrm.data.packing import (
    check_pack_capacity,
    plan_microbatches,
    unpack,
)
from megatron_qrm.data.preference import pair_microbatch
from megatron_qrm.models.packing_support import resolve_shared_prompts, unsupported_reason
from megatron_qrm.data.tokenizer import check_tokenizer_identity
from megatron_qrm.errors import NonFiniteError, UserError
from megatron_qrm.models import LoRAConfig, PrecisionConfig, build_model
from megatron_qrm.models.lora import lora_disabled
from megatron_qrm.rewards.scoring import RewardLossConfig, reference_logps_forward_step, token_credit_forward_step
from megatron_qrm.training.engine import run_global_batch

log = logging.getLogger("megatron_qrm")


@dataclass
class RMEvalConfig:
    load: str
    data: str
    tokenizer: Optional[str] = None
    seq_length: Optional[int] = None
    instruction_field: str = "instruction"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    chat_template: Optional[bool] = None
    skip_long_prompts: bool = False
    split: str = "train"
    max_pairs: Optional[int] = None
    micro_batch_size: int = 4
    # packed micro-batches of up to pack_tokens tokens (default micro_batch_size x 2 x seq_length), each pair's
    # prompt once where the attention supports it (data/packing.py); pack_sequences False: padded micro-batches
    pack_sequences: bool = True
    pack_tokens: Optional[int] = None
    pack_shared_prompts: Optional[bool] = None
    output: Optional[str] = None
    dump_token_scores: Optional[str] = None
    reference_checkpoint: Optional[str] = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    bf16: bool = False
    allow_tokenizer_change: bool = False


def _is_writer() -> bool:
    """The rank that holds scores (last PP stage) and writes results: its DP/TP rank 0."""
    return (ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0
            and ps.get_tensor_model_parallel_rank() == 0)


def evaluate_reward_model(cfg: RMEvalConfig) -> Optional[dict]:
    parallel.initialize(cfg.parallel)
    # `latest` is resolved ONCE: the config, the weights, the report and the output name all come from
    # this directory even while a trainer writes newer checkpoints into the same --load
    ckpt = checkpointing.resolve_or_fail(cfg.load, "--load")
    saved = checkpointing.read_config(ckpt)
    model_cfg = ModelConfig.from_dict(saved["model"])
    check_parallel_layout(model_cfg, cfg.parallel, dist.get_world_size())
    loss_cfg = RewardLossConfig(**saved.get("reward_loss", {}))
    tokenizer_path = cfg.tokenizer or saved.get("tokenizer")
    if not tokenizer_path:
        raise UserError("--tokenizer is required: the checkpoint does not record one")
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_identity(saved, tokenizer, tokenizer_path, checkpoint=ckpt, allow_change=cfg.allow_tokenizer_change)
    data_cfg = PreferenceDataConfig(
        path=cfg.data, instruction_field=cfg.instruction_field, chosen_field=cfg.chosen_field,
        rejected_field=cfg.rejected_field,
        chat_template=resolve_chat_template(cfg.chat_template, tokenizer, saved),
        seq_length=cfg.seq_length or saved.get("seq_length", 1024), skip_long_prompts=cfg.skip_long_prompts,
        split=cfg.split, max_pairs=cfg.max_pairs)
    dataset = PreferenceDataset(data_cfg, tokenizer)
    if len(dataset) == 0:
        raise UserError(f"--data {cfg.data}: no usable pairs ({dataset.stats})")

    model, reference = load_reward_models(ckpt, saved, model_cfg, loss_cfg, cfg.parallel, cfg.bf16,
                                          cfg.reference_checkpoint)

    pad_multiple = pad_multiple_for(cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    n = len(dataset)
    mine = list(range(dp_rank, n, dp_size))
    pack, share = _batching(cfg, data_cfg.seq_length, model, reference)
    log.info("eval-rm: %s", f"packed micro-batches of up to {pack} tokens{', each prompt once' if share else ''}"
             if pack else f"padded micro-batches of {cfg.micro_batch_size} pairs")
    if pack:  # packed micro-batches of this rank's pairs (the same pairs; no compute on padding)
        sizes = dataset.pair_tokens(share)
        check_pack_capacity(pack, int(sizes.max()), "pair of --data ({longest} tokens, chosen + rejected"
                            f"{' less the shared prompt' if share else ''})")
        chunks = [[mine[j] for j in mb] for mb in plan_microbatches(sizes[mine].tolist(), pack)]
    else:
        chunks = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
    steps = torch.tensor([len(chunks)])
    parallel.all_reduce_host(steps, op=dist.ReduceOp.MAX)

    chosen = torch.zeros(n, dtype=torch.float64)
    rejected = torch.zeros(n, dtype=torch.float64)
    valid = torch.zeros(n, dtype=torch.float64)
    dumps: list[dict] = []
    step_fn = token_credit_forward_step(loss_cfg)
    start, tokens_done, pairs_done, last_report = time.perf_counter(), 0, 0, 0.0
    with torch.no_grad():
        for s in range(int(steps)):
            # progress every ~10 s and at the end: a long evaluation is not silent
            elapsed = time.perf_counter() - start
            if s and (elapsed - last_report >= 10 or s == int(steps) - 1):
                last_report = elapsed
                log.info("eval-rm: %d/%d pairs%s, %.1f tokens/s", pairs_done, len(mine),
                         " (this data-parallel rank's share)" if dp_size > 1 else "", tokens_done / elapsed)
            real = s < len(chunks)
            idx = chunks[s] if real else (chunks[0][:1] if chunks else [0])
            batch = pair_microbatch(dataset, idx, tokenizer.pad_id, pad_multiple, pack=bool(pack), share_prompts=share)
            tokens_done += int(batch["tokens"].numel()) if real else 0
            pairs_done += len(idx) if real else 0
            if loss_cfg.kind == "dpo":
                batch.update(_reference_logps(model, reference, batch))
            outs = run_global_batch(model, step_fn, [batch], forward_only=True)
            if not real:
                continue
            for out in outs:
                ix = out["index"].cpu()
                chosen[ix] = out["chosen_score"].double().cpu()
                rejected[ix] = out["rejected_score"].double().cpu()
                valid[ix] = out["valid"].double().cpu()
                if cfg.dump_token_scores:
                    dumps.extend(_token_rows(dataset, tokenizer, ix.tolist(), batch, out["token_credits"].cpu()))

    if ps.is_pipeline_last_stage():
        for t in (chosen, rejected, valid):
            parallel.all_reduce_host(t, group=ps.get_data_parallel_group())
        if cfg.dump_token_scores and dp_size > 1:
            gathered = [None] * dp_size
            dist.all_gather_object(gathered, dumps, group=ps.get_data_parallel_group())
            dumps = [row for part in gathered for row in part]
    # every rank learns whether the scores are finite (the last stage has them), so that all of them stop alike
    nonfinite = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        v = valid.bool()
        nonfinite[0] = float((~torch.isfinite(chosen[v]) | ~torch.isfinite(rejected[v])).sum())
    parallel.all_reduce_host(nonfinite, op=dist.ReduceOp.MAX)
    bad = int(nonfinite.item())
    result = None
    if _is_writer():
        v = valid.bool()
        nv = int(v.sum())
        margin = (chosen - rejected)[v]
        result = {
            "pairwise_accuracy": float((margin > 0).double().mean()) if nv else float("nan"),
            "mean_margin": float(margin.mean()) if nv else float("nan"),
            "mean_chosen_score": float(chosen[v].mean()) if nv else float("nan"),
            "mean_rejected_score": float(rejected[v].mean()) if nv else float("nan"),
            "pairs": n,
            "valid_pairs": nv,
            "nonfinite_pairs": bad,
            "truncated_pairs": dataset.stats.get("truncated", 0),
            "skipped_pairs": dataset.stats.get("skipped_long_prompt", 0),
            "skipped_blank_lines": dataset.stats.get("skipped_blank_lines", 0),
            "reward_loss": loss_cfg.kind,
            "checkpoint": ckpt,
            "data": cfg.data,
        }
        out_path = None if bad else (cfg.output or default_output_path(result["checkpoint"], cfg.data))
        if cfg.dump_token_scores and not bad:
            result["token_scores"] = cfg.dump_token_scores
        result["output"] = out_path
        # the metrics first: a failed write below (a full disk) must not lose them
        print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in result.items()}), flush=True)
    if bad:
        raise NonFiniteError(f"{bad} of {n} pairs' scores are not finite with checkpoint {ckpt}: the model cannot "
                             "produce finite scores (a diverged run?); no result file was written")
    if _is_writer():
        if cfg.dump_token_scores:
            dumps.sort(key=lambda r: (r["index"], r["side"] != "chosen"))
            checkpointing.write_file_atomically(
                cfg.dump_token_scores, lambda f: f.writelines(json.dumps(row) + "\n" for row in dumps),
                "--dump-token-scores")
        if result["output"]:
            checkpointing.write_file_atomically(result["output"], lambda f: json.dump(result, f, indent=2),
                                                "--output")
    parallel.barrier()
    return result


def load_reward_models(load: str, saved: dict, model_cfg: ModelConfig, loss_cfg: RewardLossConfig,
                       par: ParallelConfig, bf16: bool, reference_checkpoint: Optional[str] = None):
    """Build a reward checkpoint's model in eval mode and load its weights; for a full fine-tuned DPO-RM also
    its frozen reference (``reference_checkpoint``, or the checkpoint's recorded --pretrained-checkpoint).
    Returns ``(model, reference or None)``; a LoRA DPO-RM's reference is its own base (``lora_disabled``).
    Shared by ``qrm eval-rm`` and ``qrm serve``."""
    lora = LoRAConfig(**{k: (tuple(v) if k == "targets" else v) for k, v in saved.get("lora", {}).items()})
    model = build_model(model_cfg, loss_cfg.role, precision=PrecisionConfig(bf16=bf16), lora=lora,
                        sequence_parallel=par.sequence_parallel)
    checkpointing.load_checkpoint(load, model, load_rng=False)
    model.eval()

    reference = None
    if loss_cfg.kind == "dpo" and not lora.enabled:
        reference_checkpoint = reference_checkpoint or saved.get("pretrained_checkpoint")
        if not reference_checkpoint:
            raise UserError("a full fine-tuned DPO-RM needs its reference model: pass --reference-checkpoint "
                            "(the checkpoint records no --pretrained-checkpoint to use)")
        reference = build_model(model_cfg, "policy", precision=PrecisionConfig(bf16=bf16),
                                sequence_parallel=par.sequence_parallel)
        checkpointing.load_checkpoint(reference_checkpoint, reference, load_rng=False,
                                      model_key_filter=lambda k: ".lora." not in k)
        reference.eval()
    return model, reference


def _batching(cfg: RMEvalConfig, seq_length: int, model, reference) -> tuple[Optional[int], bool]:
    """(packed micro-batch tokens or None, shared prompts) for this evaluation; packing falls back to padded
    micro-batches (with a log line) where the attention cannot run it, unless a flag demanded it."""
    models = [m for m in (model, reference) if m is not None]
    why = next((r for r in (unsupported_reason(m) for m in models) if r), None) if cfg.pack_sequences else None
    if why:
        log.info("eval-rm: sequence packing off: %s", why)
    packing = cfg.pack_sequences and not why
    share, no_tree = resolve_shared_prompts(cfg.pack_shared_prompts, packing, models)
    if no_tree:
        log.info("eval-rm: shared-prompt packing off: %s", no_tree)
    return (cfg.pack_tokens or cfg.micro_batch_size * 2 * seq_length) if packing else None, share


def default_output_path(checkpoint_dir: str, data: str) -> str:
    """SAVE/eval/<data name>.json beside the evaluated checkpoint (SAVE/iter_N)."""
    stem = os.path.basename(os.path.normpath(data))
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        stem = stem[: -len(ext)] if stem.endswith(ext) else stem
    name = os.path.basename(os.path.normpath(checkpoint_dir))
    return os.path.join(os.path.dirname(os.path.normpath(checkpoint_dir)), "eval", f"{name}_{stem}.json")


def _reference_logps(model, reference, batch) -> dict[str, torch.Tensor]:
    """Reference per-token log-probs for a DPO-RM batch: the LoRA base, or a separate model."""
    step = reference_logps_forward_step()
    if reference is None:
        with lora_disabled(model):
            outs = run_global_batch(model, step, [batch], forward_only=True)
    else:
        outs = run_global_batch(reference, step, [batch], forward_only=True)
    if not outs:  # not the last stage: the loss function (which needs them) does not run here
        zeros = torch.zeros(batch["response_mask"].shape, dtype=torch.float32)  # the [2B, S] rows, packed or not
        return {"ref_logps": zeros, "ref_logps_sum": zeros.sum(1)}
    return {"ref_logps": outs[0]["ref_logps"].cpu(), "ref_logps_sum": outs[0]["ref_logps_sum"].cpu()}


def _token_rows(dataset, tokenizer, indices, batch, credits) -> list[dict]:
    """Per response token: its text and credit, for the chosen and rejected side of each pair."""
    rows = []
    b = len(indices)
    mask = batch["response_mask"].bool()
    tokens = unpack(batch["tokens"], batch)  # [2B, S] (a packed batch's stream gathered back to its rows)
    for j, i in enumerate(indices):  # once per pair, for a human-readable dump (not a training path)
        pair = dataset[i]
        for side, row in (("chosen", j), ("rejected", b + j)):
            ids = tokens[row][mask[row]].tolist()
            scores = credits[row][mask[row]].tolist()
            rows.append({"index": i, "side": side, "tokens": tokenizer.token_texts(ids),
                         "scores": [round(x, 6) for x in scores],
                         "mean_score": sum(scores) / len(scores) if scores else None,
                         "prompt": tokenizer.decode(pair.prompt_ids)})
    return rows
