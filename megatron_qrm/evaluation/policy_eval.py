"""Policy evaluation: greedy Pass@1 and sampled Pass@k on a task's test set (`qrm eval-policy`),
also used by the RL trainers every ``--eval-interval`` iterations.

A task is a judge ``(response, label) -> (correct, parsable)``; GSM8K and MATH come with the
reference extraction rule and a strict checker (:mod:`megatron_qrm.evaluation.answers`); other
tasks (e.g. the demo's) register theirs in :mod:`megatron_qrm.evaluation.tasks`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserError
from megatron_qrm.data import PromptDataConfig, PromptDataset
from megatron_qrm.data.chat import resolve_chat_template
from megatron_qrm.evaluation.tasks import Judge, register_task, task_judges
from megatron_qrm.evaluation.passk import pass_at_k
from megatron_qrm.rl.rollout import SamplingConfig, generate

# the task registry lives in evaluation/tasks.py; re-exported here for existing callers
__all__ = ["Judge", "register_task", "task_judges"]
log = logging.getLogger("megatron_qrm")


def _dp_slice(n: int) -> list[int]:
    return list(range(ps.get_data_parallel_rank(), n, ps.get_data_parallel_world_size()))


def _gather_rows(rows: list[dict]) -> list[dict]:
    if ps.get_data_parallel_world_size() == 1:
        return rows
    parts = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, rows, group=ps.get_data_parallel_group())
    return sorted((r for p in parts for r in p), key=lambda r: (r["index"], r.get("sample", 0)))


def generate_responses(model, tokenizer, dataset: PromptDataset, indices: list[int], sampling: SamplingConfig,
                       seq_length: int, batch_size: int, seed: int, engine=None) -> list[str]:
    """Decoded responses (EOS dropped) for ``indices``, generated ``batch_size`` at a time; logs progress
    (prompts done, new tokens per second) after each batch: a long evaluation is not silent. ``engine``: a
    rollout engine (rl/rollout_engine.py, e.g. vLLM) sampling instead of the project's decoder on ``model``."""
    out: list[str] = []
    start, new_tokens = time.perf_counter(), 0
    log.info("generating %d responses%s, %d per batch, up to %d new tokens each", len(indices),
             " (this data-parallel rank's share)" if ps.get_data_parallel_world_size() > 1 else "",
             batch_size, sampling.max_new_tokens)
    for c in range(0, len(indices), batch_size):
        chunk = indices[c:c + batch_size]
        prompts = [dataset.prompt_ids(i) for i in chunk]
        if engine is not None:
            r = engine.generate(prompts, sampling, seed=seed + c, max_length=seq_length)
        else:
            r = generate(model, prompts, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                         vocab_size=tokenizer.vocab_size, max_length=seq_length, seed=seed + c)
        for j in range(len(chunk)):
            ids = [t for t in r.response_ids(j) if t != tokenizer.eos_id]
            out.append(tokenizer.decode(ids))
        new_tokens += int(r.response_lens.sum())
        elapsed = time.perf_counter() - start
        log.info("generated %d/%d responses%s, %d new tokens, %.1f tokens/s", len(out), len(indices),
                 " (this data-parallel rank's share)" if ps.get_data_parallel_world_size() > 1 else "",
                 new_tokens, new_tokens / max(elapsed, 1e-9))
    return out


def evaluate_pass_at_1(model, tokenizer, data: str, task: str, *, seq_length: int, chat_template: bool,
                       max_new_tokens: int, batch_size: int, max_prompts: Optional[int] = None,
                       dump: Optional[str] = None, engine=None) -> dict[str, float]:
    """Greedy Pass@1 of every checker of ``task`` on ``data`` (instruction + label jsonl)."""
    judges = task_judges(task)
    ds = PromptDataset(PromptDataConfig(path=data, chat_template=chat_template, seq_length=seq_length,
                                        skip_long_prompts=True, max_prompts=max_prompts), tokenizer)
    mine = _dp_slice(len(ds))
    texts = generate_responses(model, tokenizer, ds, mine, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                               seq_length, batch_size, seed=0, engine=engine)
    rows = []
    for i, text in zip(mine, texts):
        row = {"index": i, "instruction": ds.instructions[i], "label": ds.labels[i], "response": text}
        for name, judge in judges.items():
            row[name], row[f"{name}_parsable"] = judge(text, ds.labels[i] or "")
        rows.append(row)
    rows = _gather_rows(rows)
    warn_if_mostly_empty([r["response"] for r in rows], chat_template)
    result = {"eval_prompts": float(len(rows))}
    for name in judges:
        result[f"pass@1_{name}"] = float(np.mean([r[name] for r in rows])) if rows else 0.0
        result[f"unparsable_{name}"] = float(sum(not r[f"{name}_parsable"] for r in rows))
    result["pass@1"] = result[f"pass@1_{next(iter(judges))}"]
    if dump and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(dump)) or ".", exist_ok=True)
        with open(dump, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return result


def warn_if_mostly_empty(responses: list[str], chat_template: bool) -> None:
    """Warn when more than half of an evaluation's responses are empty (each counts as unparsable): the
    usual cause is a prompt format the model was not trained on, e.g. an instruct model without its
    chat template, whose first greedy token is then the end of turn."""
    empty = sum(not r.strip() for r in responses)
    if responses and empty * 2 > len(responses):
        hint = ("the chat template is off: an instruct model usually needs it (--chat-template)" if not chat_template
                else "the chat template is on: a base model may need --no-chat-template")
        log.warning("%d of %d responses are empty (each counted as unparsable); %s", empty, len(responses), hint)


@dataclass
class PolicyEvalConfig:
    load: str
    data: str
    task: str
    tokenizer: Optional[str] = None
    seq_length: Optional[int] = None
    max_new_tokens: int = 512
    batch_size: int = 32
    samples: int = 0  # k > 0: also sample k responses per prompt for Pass@k
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompts: Optional[int] = None
    output: Optional[str] = None  # JSONL of responses and judgements
    seed: int = 1234
    chat_template: Optional[bool] = None
    parallel: "object" = None
    bf16: bool = False
    allow_tokenizer_change: bool = False
    rollout_engine: str = "megatron"  # megatron | vllm (rl/rollout_engine.py)
    vllm: Optional[object] = None  # rl/vllm_engine.VLLMEngineConfig


def evaluate_policy(cfg: PolicyEvalConfig) -> dict:
    """`qrm eval-policy`: load a policy checkpoint and report Pass@1 (greedy) and Pass@k (sampled)."""
    from megatron_qrm import checkpointing, parallel
    from megatron_qrm.config import ModelConfig, check_parallel_layout
    from megatron_qrm.data import check_tokenizer_identity, load_tokenizer
    from megatron_qrm.models import PrecisionConfig, build_model

    parallel.initialize(cfg.parallel)
    # `latest` is resolved ONCE (config, weights and the reported checkpoint agree; see eval-rm)
    ckpt = checkpointing.resolve_or_fail(cfg.load, "--load")
    saved = checkpointing.read_config(ckpt)
    if saved.get("role") != "policy":
        raise UserError(f"--load {cfg.load} is a {saved.get('role')} checkpoint, not a policy")
    model_cfg = ModelConfig.from_dict(saved["model"])
    check_parallel_layout(model_cfg, cfg.parallel, dist.get_world_size())
    tok_path = cfg.tokenizer or saved.get("tokenizer")
    if not tok_path:
        raise UserError("--tokenizer is required: the checkpoint does not record one")
    tokenizer = load_tokenizer(tok_path)
    check_tokenizer_identity(saved, tokenizer, tok_path, checkpoint=ckpt, allow_change=cfg.allow_tokenizer_change)
    model = build_model(model_cfg, "policy", precision=PrecisionConfig(bf16=cfg.bf16))
    checkpointing.load_checkpoint(ckpt, model, load_rng=False, model_key_filter=lambda k: ".lora." not in k)
    seq_length = cfg.seq_length or saved.get("seq_length", 1024)
    chat = resolve_chat_template(cfg.chat_template, tokenizer, saved)
    greedy_dump = cfg.output
    engine = None
    if cfg.rollout_engine != "megatron":
        from megatron_qrm.rl.rollout_engine import build_rollout_engine

        engine = build_rollout_engine(cfg.rollout_engine, model, model_cfg, eos_id=tokenizer.eos_id,
                                      pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, max_length=seq_length,
                                      dtype=torch.bfloat16 if cfg.bf16 else torch.float32, engine_cfg=cfg.vllm)
    result = evaluate_pass_at_1(model, tokenizer, cfg.data, cfg.task, seq_length=seq_length, chat_template=chat,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                max_prompts=cfg.max_prompts, dump=greedy_dump, engine=engine)
    if cfg.samples > 0:
        judges = task_judges(cfg.task)
        ds = PromptDataset(PromptDataConfig(path=cfg.data, chat_template=chat, seq_length=seq_length,
                                            skip_long_prompts=True, max_prompts=cfg.max_prompts), tokenizer)
        mine = _dp_slice(len(ds))
        idx = [i for i in mine for _ in range(cfg.samples)]
        texts = generate_responses(model, tokenizer, ds, idx, SamplingConfig(
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens), seq_length,
            cfg.batch_size, seed=cfg.seed, engine=engine)
        rows = [{"index": i, "sample": s % cfg.samples, **{n: j(t, ds.labels[i] or "")[0] for n, j in judges.items()}}
                for s, (i, t) in enumerate(zip(idx, texts))]
        rows = _gather_rows(rows)
        for name in judges:
            correct = np.zeros(len(ds), dtype=np.int64)
            for r in rows:
                correct[r["index"]] += int(r[name])
            result[f"pass@{cfg.samples}_{name}"] = float(pass_at_k(np.full(len(ds), cfg.samples), correct, cfg.samples).mean())
    result.update(task=cfg.task, data=cfg.data, checkpoint=ckpt)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    return result
