"""`qrm train-rm`: train a Q-RM (or an ORM / DPO-RM baseline) on preference pairs.

Read top to bottom: set up parallelism -> tokenizer and data -> model (+LoRA) -> DDP, optimizer,
schedule -> load/resume -> (DPO: reference log-probs) -> loop over global batches -> checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm.errors import UserError, UserFileNotFoundError
from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import ModelConfig, check_parallel_layout
from megatron_qrm.data import PreferenceDataConfig, PreferenceDataset, pad_multiple_for
from megatron_qrm.data.packing import (
    check_pack_capacity,
    pair_microbatch,
    plan_microbatches,
    rank_microbatches,
    resolve_shared_prompts,
)
from megatron_qrm.data.sampler import GlobalBatchSampler
from megatron_qrm.models.lora import is_lora_param
from megatron_qrm.rewards.scoring import (
    METRIC_NAMES,
    RewardLossConfig,
    reference_logps_forward_step,
    train_forward_step,
)
from megatron_qrm.training.engine import run_global_batch
from megatron_qrm.training.run_config import SupervisedRunConfig
from megatron_qrm.training.supervised_setup import (
    build_supervised_model,
    load_run_tokenizer,
    resolve_model_and_tokenizer,
)
from megatron_qrm.training.loop import LoopConfig, fit
from megatron_qrm.training.metrics_log import MetricsLogger

log = logging.getLogger("megatron_qrm")
DPO_REFERENCE_FILE = "dpo_reference_logps.pt"


@dataclass(kw_only=True)
class RewardTrainConfig(SupervisedRunConfig):
    data: PreferenceDataConfig
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    micro_batch_size: int = 2  # pairs
    global_batch_size: int = 2  # pairs
    # packed pairs compute their prompt once (a prefix tree); None: when packing is on and the attention can
    pack_shared_prompts: Optional[bool] = None

    sequences_per_sample: ClassVar[int] = 2


def _checkpoint_config(cfg: RewardTrainConfig, model_cfg: ModelConfig, tokenizer_path: str,
                       tokenizer=None, saved: Optional[dict] = None, tokenizer_change: Optional[dict] = None
                       ) -> dict[str, Any]:
    return {
        # what the tokenizer was (checked by every later reader) and every deliberate change of it
        **checkpointing.tokenizer_record(tokenizer, tokenizer_path, saved, tokenizer_change),
        "kind": "reward_model",
        "role": cfg.loss.role,
        "model": model_cfg.to_dict(),
        "tokenizer": os.path.abspath(tokenizer_path) if os.path.exists(tokenizer_path) else tokenizer_path,
        "lora": dataclasses.asdict(cfg.lora),
        "reward_loss": dataclasses.asdict(cfg.loss),
        "chat_template": cfg.data.chat_template,
        "seq_length": cfg.data.seq_length,
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "path"},
        # a full fine-tuned DPO-RM's reference policy (eval-rm's default --reference-checkpoint)
        "pretrained_checkpoint": os.path.abspath(cfg.pretrained_checkpoint) if cfg.pretrained_checkpoint else None,
    }


def _dp_info() -> tuple[int, int]:
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def compute_reference_logps(model, dataset: PreferenceDataset, micro_batch_size: int, pad_id: int,
                            pad_multiple: int, logger: MetricsLogger, pack_capacity: Optional[int] = None,
                            share_prompts: bool = False) -> Optional[torch.Tensor]:
    """Sum of reference log-probs over each response, [N, 2] (chosen, rejected), on the last stage.

    The reference is the model as it is now (before any update): DPO-RM starts from it. Pairs are
    split across data-parallel ranks and summed back.
    """
    dp_rank, dp_size = _dp_info()
    n = len(dataset)
    sums = torch.zeros(n, 2, dtype=torch.float64)
    mine = list(range(dp_rank, n, dp_size))
    if pack_capacity:  # packed micro-batches of this rank's pairs
        sizes = dataset.pair_tokens(share_prompts)[mine]
        chunks = [[mine[j] for j in mb] for mb in plan_microbatches(sizes.tolist(), pack_capacity)]
    else:
        chunks = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    # every DP rank must run the same number of schedule passes (collectives inside)
    steps = torch.tensor([len(chunks)])
    parallel.all_reduce_host(steps, op=dist.ReduceOp.MAX)
    model.eval()
    logger.message(f"DPO-RM: computing reference log-probs for {n} pairs")
    with torch.no_grad():
        for s in range(int(steps)):
            idx = chunks[s] if s < len(chunks) else chunks[0][:1] if chunks else [0]
            mb = pair_microbatch(dataset, idx, pad_id, pad_multiple, pack=bool(pack_capacity),
                                 share_prompts=share_prompts)
            outs = run_global_batch(model, reference_logps_forward_step(), [mb], forward_only=True)
            if s < len(chunks):
                for out in outs:
                    b = out["index"].numel()
                    r = out["ref_logps_sum"].double().cpu()
                    sums[out["index"].cpu(), 0] = r[:b]
                    sums[out["index"].cpu(), 1] = r[b:]
    model.train()
    if ps.is_pipeline_last_stage():
        parallel.all_reduce_host(sums, group=ps.get_data_parallel_group())
        return sums.float()
    return None


def _check_checkpoint_flags(cfg: RewardTrainConfig) -> None:
    """Fail first, naming the flag, when --load / --pretrained-checkpoint names no checkpoint.

    ``--load`` may name a save directory without a checkpoint yet only when it is also ``--save`` (the
    auto-resume idiom) or a ``--pretrained-checkpoint`` provides the start.
    """
    if cfg.load and checkpointing.resolve_checkpoint(cfg.load):
        return
    if cfg.load and not cfg.pretrained_checkpoint and cfg.load != cfg.save:
        raise UserFileNotFoundError(f"--load {cfg.load}: no complete checkpoint there (expected "
                                    f"{checkpointing.CONFIG_FILE} in it, or a `latest` file naming one)")
    if cfg.pretrained_checkpoint and not checkpointing.resolve_checkpoint(cfg.pretrained_checkpoint):
        raise UserFileNotFoundError(f"--pretrained-checkpoint {cfg.pretrained_checkpoint}: no complete checkpoint "
                                    f"there (expected {checkpointing.CONFIG_FILE} in it, or a `latest` file "
                                    "naming one)")


def train_reward_model(cfg: RewardTrainConfig) -> dict[str, float]:
    cfg.optim.check()
    _check_checkpoint_flags(cfg)
    # ---- parallel state ----
    parallel.initialize(cfg.parallel)
    model_cfg, tokenizer_path, saved, saved_from = resolve_model_and_tokenizer(cfg)
    check_parallel_layout(model_cfg, cfg.parallel, dist.get_world_size())
    if saved and cfg.load and saved.get("reward_loss", {}).get("kind", cfg.loss.kind) != cfg.loss.kind:
        raise UserError(f"--load {cfg.load} was trained with --reward-loss {saved['reward_loss']['kind']}, "
                        f"not {cfg.loss.kind}")
    rank0 = parallel.is_rank0()
    # a resumed run starts at the checkpoint's iteration: the progress bar starts there and TensorBoard
    # drops the events a killed attempt logged past that checkpoint (the logger needs it at creation)
    resuming = bool(cfg.load and saved and checkpointing.resolve_checkpoint(cfg.load))
    start_step = int(saved.get("iteration", 0)) if resuming else 0
    logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=rank0, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                           total_steps=cfg.train_iters, start_step=start_step,
                           desc=f"train-rm ({cfg.loss.kind})", supersede_after_start=True,
                           run_config={"model": model_cfg.to_dict(), "loss": dataclasses.asdict(cfg.loss)})

    # ---- tokenizer and data ----
    tokenizer, tokenizer_change = load_run_tokenizer(cfg, model_cfg, tokenizer_path, saved, saved_from)
    dataset = PreferenceDataset(cfg.data, tokenizer)
    logger.message(f"data {cfg.data.path}: {dataset.stats}")
    if len(dataset) == 0:
        raise UserError(f"--train-data {cfg.data.path}: no usable preference pairs ({dataset.stats})")
    pad_multiple = pad_multiple_for(cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel)
    dp_rank, dp_size = _dp_info()
    sampler = GlobalBatchSampler(len(dataset), cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp_size,
                                 seed=cfg.parallel.seed, shuffle=cfg.shuffle)
    resolve_shared_prompts(cfg.pack_shared_prompts, cfg.pack_capacity() is not None)  # contradicting flags
    # shared prompts (unless turned off) make pairs shorter; if they turn out unsupported, checked again below
    check_pack_capacity(cfg.pack_capacity(), int(dataset.pair_tokens(cfg.pack_shared_prompts is not False).max()),
                        "pair of --train-data ({longest} tokens, chosen + rejected"
                        f"{'' if cfg.pack_shared_prompts is False else ' less the shared prompt'})")

    # ---- pre-flight: --save / --log-dir writable, room for one checkpoint (before any model is built) ----
    checkpointing.preflight_save_dir(cfg.save, "--save", checkpointing.estimate_checkpoint_bytes(
        model_cfg, cfg.loss.role, lora_rank=cfg.lora.rank, bf16=cfg.optim.bf16))
    checkpointing.preflight_save_dir(cfg.log_dir, "--log-dir")

    # ---- memory plan (refuses on a GPU when it cannot fit, unless --skip-memory-check), model, DDP, optimizer ----
    built = build_supervised_model(cfg, model_cfg, cfg.loss.role, logger,
                                   sequences_per_sample=2 if cfg.loss.role == "policy" else 1)  # DPO-RM: LM over both
    cfg, ddp, optimizer, scheduler = built.cfg, built.ddp, built.optimizer, built.scheduler
    share_prompts, no_tree = resolve_shared_prompts(cfg.pack_shared_prompts, cfg.pack_capacity() is not None,
                                                    [built.model])
    if no_tree:
        logger.message(f"shared-prompt packing off: {no_tree}")
        check_pack_capacity(cfg.pack_capacity(), int(dataset.pair_tokens().max()),
                            "pair of --train-data ({longest} tokens, chosen + rejected)")

    # ---- load / resume ----
    state = checkpointing.TrainState()
    ref_sums = None
    resume_dir = checkpointing.resolve_checkpoint(cfg.load) if cfg.load else None
    if resume_dir:
        _, loaded_state = checkpointing.load_checkpoint(resume_dir, ddp, optimizer=optimizer, scheduler=scheduler)
        state = loaded_state or state
        ref_sums = checkpointing.load_extra_file(resume_dir, DPO_REFERENCE_FILE)
        logger.message(f"resumed from {resume_dir} at iteration {state.iteration}")
    elif cfg.pretrained_checkpoint:
        # a base model: its transformer weights; LoRA adapters start fresh, and so does the token head
        # unless the checkpoint has one (a reward model, e.g. imported from *ForTokenClassification)
        pretrained_role = checkpointing.read_config(cfg.pretrained_checkpoint).get("role")
        fresh_head = cfg.loss.role == "reward" and pretrained_role not in ("reward", "critic")
        keep = lambda k: not is_lora_param(k) and not (fresh_head and k.startswith("output_layer."))  # noqa: E731
        checkpointing.load_checkpoint(cfg.pretrained_checkpoint, ddp, load_rng=False, model_key_filter=keep)
        logger.message(f"initialised from {cfg.pretrained_checkpoint} ({'fresh' if fresh_head else 'its'} head)")
    if cfg.loss.kind == "dpo" and ref_sums is None and not (resume_dir and not ps.is_pipeline_last_stage()):
        ref_sums = compute_reference_logps(ddp, dataset, cfg.micro_batch_size, tokenizer.pad_id, pad_multiple, logger,
                                           pack_capacity=cfg.pack_capacity(), share_prompts=share_prompts)

    ckpt_config = _checkpoint_config(cfg, model_cfg, tokenizer_path, tokenizer, saved, tokenizer_change)
    logger.start_step = state.iteration

    def save() -> None:
        if cfg.save:
            path = checkpointing.save_checkpoint(
                cfg.save, state.iteration, ddp, ckpt_config, optimizer=optimizer, scheduler=scheduler, train_state=state,
                extra_files={DPO_REFERENCE_FILE: ref_sums} if ref_sums is not None else None,
                keep_last=cfg.keep_last)
            logger.message(f"saved checkpoint {path}")

    # ---- training loop ----
    capacity = cfg.pack_capacity()
    pair_tokens = dataset.pair_tokens(share_prompts)  # [N] tokens each pair costs in a packed micro-batch
    logger.message(f"batching: {f'packed micro-batches of up to {capacity} tokens' if capacity else 'padded'}"
                   f"{', grouped by length' if cfg.group_by_length and not capacity else ''}"
                   f"{', each prompt once' if share_prompts else ''}")

    def microbatches(consumed: int) -> list[dict]:
        # packed, length-grouped or (neither) the rank's contiguous slice, as GlobalBatchSampler.microbatches
        batch = sampler.global_batch(consumed)
        groups = rank_microbatches(batch, pair_tokens[batch], micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,
                                   dp_size=dp_size, pack_capacity=capacity, group_by_length_=cfg.group_by_length)
        return [pair_microbatch(dataset, idx, tokenizer.pad_id, pad_multiple, pack=capacity is not None,
                                share_prompts=share_prompts, ref_sums=ref_sums) for idx in groups]

    def summarize(s: dict[str, float]) -> dict[str, float]:
        n = max(s["num_valid"], 1.0)
        return {"loss": s["loss_sum"] / n, "accuracy": s["correct"] / n, "chosen_score": s["chosen_score_sum"] / n,
                "rejected_score": s["rejected_score_sum"] / n,
                "margin": (s["chosen_score_sum"] - s["rejected_score_sum"]) / n, "valid_pairs": s["num_valid"]}

    # a global batch without a valid pair takes no optimizer step (as the reference)
    last = fit(ddp, optimizer, scheduler, cfg=LoopConfig(cfg.train_iters, cfg.global_batch_size, cfg.log_interval,
                                                          cfg.save_interval, cfg.exit_interval,
                                                          max_nonfinite_steps=cfg.max_nonfinite_steps),
               state=state, microbatches=microbatches, forward_step=train_forward_step(cfg.loss),
               metric_names=METRIC_NAMES, count_name="num_valid", summarize=summarize, save=save, logger=logger,
               epoch_of=sampler.epoch_of)
    logger.close()
    return last
