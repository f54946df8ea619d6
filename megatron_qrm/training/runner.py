"""The supervised runner behind ``qrm train-rm`` and ``qrm train-sft``.

Shaped like Megatron-LM's ``pretrain(train_valid_test_dataset_provider, model_provider, model_type,
forward_step_func)``: :func:`run_supervised` owns everything the supervised commands do alike (flags checked
before work, parallel state, model size and tokenizer from the flags or a checkpoint, the memory plan, the
model + DDP + optimizer, resume / initialise, the checkpoint record, the loop of :mod:`.loop`, checkpoints and
metrics), and a :class:`SupervisedTask` brings what differs between commands: the **dataset** (and how a
micro-batch of its samples is laid out), the **head** (the model's role) and the **loss** (forward step,
metric sums and their summary).

Order of a run (each step fails, naming the flag, before the next one costs anything)::

    check_checkpoint_flags   --load / --pretrained-checkpoint name checkpoints
    parallel.initialize      process groups, seeds
    resolve_model_and_tokenizer, check_parallel_layout, task.check_resume
    load_run_tokenizer, MetricsLogger
    task.build_dataset, GlobalBatchSampler, task.check_capacity
    preflight_save_dir       --save / --log-dir writable, room for one checkpoint
    build_supervised_model   memory plan, model(role), DDP, optimizer, scheduler; then task.configure(model)
    resume_or_initialise     --load (exact resume) or --pretrained-checkpoint (weights only)
    task.prepare             e.g. DPO-RM's reference log-probs
    fit                      global batches -> optimizer steps, with save_checkpoint at the save points
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_qrm import checkpointing, parallel
from megatron_qrm.config import ModelConfig, check_parallel_layout
from megatron_qrm.data.packing import rank_microbatches
from megatron_qrm.data.preference import pad_multiple_for
from megatron_qrm.data.sampler import GlobalBatchSampler
from megatron_qrm.errors import UserFileNotFoundError
from megatron_qrm.models.lora import is_lora_param
from megatron_qrm.training.loop import LoopConfig, fit
from megatron_qrm.training.metrics_log import MetricsLogger
from megatron_qrm.training.run_config import SupervisedRunConfig
from megatron_qrm.training.supervised_setup import (
    build_supervised_model,
    load_run_tokenizer,
    resolve_model_and_tokenizer,
)

log = logging.getLogger("megatron_qrm")


@dataclass
class RunTokenizer:
    """The tokenizer a run uses and where it came from (what the checkpoint record needs)."""

    tokenizer: Any  # megatron_qrm.data.tokenizer.Tokenizer
    path: str  # --tokenizer, else the checkpoint's recorded tokenizer
    saved: Optional[dict]  # the qrm_config.json of the checkpoint resumed or started from (None: from scratch)
    change: Optional[dict]  # the --allow-tokenizer-change record of this run (None: the checkpoint's tokenizer)


class SupervisedTask(abc.ABC):
    """What one supervised command brings to :func:`run_supervised`: its dataset, head and loss.

    The runner calls the hooks in the order of the module docstring. ``cfg`` is the run configuration as the
    runner holds it at that point (:func:`~.supervised_setup.build_supervised_model` may have turned packing
    off). A task keeps what it builds (the dataset, a DPO reference) on itself.
    """

    #: the subcommand (progress bar, messages)
    command: str
    #: the model's head: "reward" (a token head of one score per token) or "policy" (the LM head)
    role: str
    #: sequences the model runs per sample (a DPO-RM pair: 2), for the memory plan
    memory_plan_sequences: int = 1
    #: names of the metric sums the forward step's loss function returns (reduced over micro-batches and ranks)
    metric_names: tuple[str, ...]
    #: the metric sum that counts what a global batch can learn from; 0 -> no optimizer step
    count_name: str

    def describe(self) -> str:
        """Progress-bar label."""
        return self.command

    def run_config(self, cfg: SupervisedRunConfig, model_cfg: ModelConfig) -> dict[str, Any]:
        """What ``run_config.json`` (and wandb) record about the run."""
        return {"model": model_cfg.to_dict()}

    def check_resume(self, cfg: SupervisedRunConfig, saved: Optional[dict]) -> None:
        """Refuse a checkpoint (``saved``: its qrm_config.json) this command cannot continue; before any work."""

    @abc.abstractmethod
    def build_dataset(self, cfg: SupervisedRunConfig, tokenizer, logger: MetricsLogger) -> Any:
        """The tokenised dataset (``len()`` samples); raise naming the data flag when it is unusable."""

    @abc.abstractmethod
    def sample_tokens(self) -> np.ndarray:
        """``[N]`` tokens each sample costs in a packed micro-batch (packing, length grouping, DP balance)."""

    def check_capacity(self, cfg: SupervisedRunConfig) -> None:
        """Fail before any model is built when the longest sample cannot fit ``cfg.pack_capacity()``."""

    def configure(self, cfg: SupervisedRunConfig, model, logger: MetricsLogger) -> None:
        """Decide what depends on the built model (this rank's stage), e.g. whether its attention can run a
        layout; may repeat :meth:`check_capacity` under the decision."""

    def prepare(self, cfg: SupervisedRunConfig, ddp, resume_dir: Optional[str], pad_id: int, pad_multiple: int,
                logger: MetricsLogger) -> None:
        """After the weights are loaded and before the first step (e.g. DPO-RM's reference log-probs, read back
        from ``resume_dir`` or computed with the model as it is)."""

    def extra_files(self) -> Optional[dict[str, Any]]:
        """Objects saved beside every checkpoint (:func:`~megatron_qrm.checkpointing.save_checkpoint`)."""
        return None

    def batching_note(self) -> str:
        """Appended to the ``batching: ...`` log line (e.g. ", each prompt once")."""
        return ""

    @abc.abstractmethod
    def microbatch(self, indices: np.ndarray, pad_id: int, pad_multiple: int, pack: bool) -> dict:
        """One micro-batch of the dataset samples ``indices``: right-padded ``[N, S]`` rows (padded to a multiple
        of ``pad_multiple``), or with ``pack`` one packed THD stream (:mod:`megatron_qrm.data.packing`)."""

    @abc.abstractmethod
    def forward_step(self, cfg: SupervisedRunConfig) -> Callable:
        """megatron-core's ``forward_step_func(data_iterator, model) -> (output, loss_func)``."""

    @abc.abstractmethod
    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """The logged values of one global batch from its metric sums (over micro-batches and ranks)."""

    @abc.abstractmethod
    def checkpoint_record(self, cfg: SupervisedRunConfig, model_cfg: ModelConfig, tok: RunTokenizer) -> dict:
        """The ``qrm_config.json`` record of this command's checkpoints
        (:func:`megatron_qrm.training.checkpoint_record.checkpoint_record`)."""


def check_checkpoint_flags(cfg: SupervisedRunConfig) -> None:
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


def resume_or_initialise(cfg: SupervisedRunConfig, role: str, ddp, optimizer, scheduler,
                         logger: MetricsLogger) -> tuple[checkpointing.TrainState, Optional[str]]:
    """Load the run's starting point: ``(train state, the checkpoint resumed from or None)``.

    ``--load`` with a checkpoint: weights, optimizer, scheduler, RNG and the train state (exact resume).
    Else ``--pretrained-checkpoint``: its transformer weights only; LoRA adapters start fresh, and so does a
    reward model's token head unless the checkpoint has one (a reward model or critic, e.g. imported from
    ``*ForTokenClassification``). Else nothing: a model from scratch.
    """
    state = checkpointing.TrainState()
    resume_dir = checkpointing.resolve_checkpoint(cfg.load) if cfg.load else None
    if resume_dir:
        _, loaded = checkpointing.load_checkpoint(resume_dir, ddp, optimizer=optimizer, scheduler=scheduler)
        state = loaded or state
        logger.message(f"resumed from {resume_dir} at iteration {state.iteration}")
    elif cfg.pretrained_checkpoint:
        pretrained_role = checkpointing.read_config(cfg.pretrained_checkpoint).get("role")
        fresh_head = role == "reward" and pretrained_role not in ("reward", "critic")
        keep = lambda k: not is_lora_param(k) and not (fresh_head and k.startswith("output_layer."))  # noqa: E731
        checkpointing.load_checkpoint(cfg.pretrained_checkpoint, ddp, load_rng=False, model_key_filter=keep)
        logger.message(f"initialised from {cfg.pretrained_checkpoint} ({'fresh' if fresh_head else 'its'} head)")
    return state, resume_dir


def save_checkpoint(cfg: SupervisedRunConfig, state: checkpointing.TrainState, ddp, optimizer, scheduler,
                    record: dict[str, Any], extra_files: Optional[dict[str, Any]], logger: MetricsLogger) -> None:
    """One checkpoint of the run at ``state.iteration`` into ``--save`` (nothing without it): atomic, becomes
    ``latest``, older ones pruned to ``--keep-last``."""
    if not cfg.save:
        return
    path = checkpointing.save_checkpoint(cfg.save, state.iteration, ddp, record, optimizer=optimizer,
                                         scheduler=scheduler, train_state=state, extra_files=extra_files,
                                         keep_last=cfg.keep_last)
    logger.message(f"saved checkpoint {path}")


def run_supervised(cfg: SupervisedRunConfig, task: SupervisedTask) -> dict[str, float]:
    """Train ``task`` under ``cfg`` until ``--train-iters`` (or ``--exit-interval``); the last logged values."""
    cfg.optim.check()
    check_checkpoint_flags(cfg)
    parallel.initialize(cfg.parallel)
    model_cfg, tokenizer_path, saved, saved_from = resolve_model_and_tokenizer(cfg)
    check_parallel_layout(model_cfg, cfg.parallel, dist.get_world_size())
    task.check_resume(cfg, saved)
    tokenizer, tokenizer_change = load_run_tokenizer(cfg, model_cfg, tokenizer_path, saved, saved_from)
    tok = RunTokenizer(tokenizer, tokenizer_path, saved, tokenizer_change)
    # a resumed run starts at the checkpoint's iteration: the progress bar starts there and TensorBoard
    # drops the events a killed attempt logged past that checkpoint (the logger needs it at creation)
    resuming = bool(cfg.load and saved and checkpointing.resolve_checkpoint(cfg.load))
    logger = MetricsLogger(cfg.log_dir or cfg.save, enabled=parallel.is_rank0(), tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                           total_steps=cfg.train_iters, start_step=int(saved.get("iteration", 0)) if resuming else 0,
                           desc=task.describe(), supersede_after_start=True, run_config=task.run_config(cfg, model_cfg))

    # ---- data ----
    dataset = task.build_dataset(cfg, tokenizer, logger)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    sampler = GlobalBatchSampler(len(dataset), cfg.global_batch_size, cfg.micro_batch_size, dp_rank,
                                 dp_size, seed=cfg.parallel.seed, shuffle=cfg.shuffle)
    task.check_capacity(cfg)
    pad_multiple = pad_multiple_for(cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel)

    # ---- pre-flight: --save / --log-dir writable, room for one checkpoint (before any model is built) ----
    checkpointing.preflight_save_dir(cfg.save, "--save", checkpointing.estimate_checkpoint_bytes(
        model_cfg, task.role, lora_rank=cfg.lora.rank, bf16=cfg.optim.bf16))
    checkpointing.preflight_save_dir(cfg.log_dir, "--log-dir")

    # ---- memory plan (refuses on a GPU when it cannot fit, unless --skip-memory-check), model, DDP, optimizer ----
    built = build_supervised_model(cfg, model_cfg, task.role, logger, sequences_per_sample=task.memory_plan_sequences)
    cfg, ddp, optimizer, scheduler = built.cfg, built.ddp, built.optimizer, built.scheduler
    task.configure(cfg, built.model, logger)

    # ---- load / resume ----
    state, resume_dir = resume_or_initialise(cfg, task.role, ddp, optimizer, scheduler, logger)
    task.prepare(cfg, ddp, resume_dir, tokenizer.pad_id, pad_multiple, logger)
    record = task.checkpoint_record(cfg, model_cfg, tok)
    logger.start_step = state.iteration

    # ---- training loop ----
    capacity = cfg.pack_capacity()
    sample_tokens = task.sample_tokens()  # [N]
    logger.message(f"batching: {f'packed micro-batches of up to {capacity} tokens' if capacity else 'padded'}"
                   f"{', grouped by length' if cfg.group_by_length and not capacity else ''}{task.batching_note()}")

    def microbatches(consumed: int) -> list[dict]:
        # packed, length-grouped or (neither) the rank's contiguous slice, as GlobalBatchSampler.microbatches
        batch = sampler.global_batch(consumed)
        groups = rank_microbatches(batch, sample_tokens[batch], micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,
                                   dp_size=dp_size, pack_capacity=capacity, group_by_length_=cfg.group_by_length)
        return [task.microbatch(idx, tokenizer.pad_id, pad_multiple, capacity is not None) for idx in groups]

    def save() -> None:
        save_checkpoint(cfg, state, ddp, optimizer, scheduler, record, task.extra_files(), logger)

    # a global batch with nothing to learn from (count_name sums to 0) takes no optimizer step
    last = fit(ddp, optimizer, scheduler, cfg=LoopConfig(cfg.train_iters, cfg.global_batch_size, cfg.log_interval,
                                                          cfg.save_interval, cfg.exit_interval,
                                                          max_nonfinite_steps=cfg.max_nonfinite_steps),
               state=state, microbatches=microbatches, forward_step=task.forward_step(cfg),
               metric_names=task.metric_names, count_name=task.count_name, summarize=task.summarize, save=save,
               logger=logger, epoch_of=sampler.epoch_of)
    logger.close()
    return last
