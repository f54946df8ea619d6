"""What the supervised trainers (`qrm train-rm`, `qrm train-sft`) share in their run configuration.

Each trainer's config subclasses :class:`SupervisedRunConfig` and adds its data (and loss) config; every
field is keyword-only, so a field added here reaches both trainers without reordering anyone's call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from megatron_qrm.config import ModelConfig, ParallelConfig
from megatron_qrm.models import LoRAConfig
from megatron_qrm.training.engine import OptimConfig


@dataclass(kw_only=True)
class SupervisedRunConfig:
    model: Optional[ModelConfig]  # None -> taken from --load / --pretrained-checkpoint
    tokenizer: Optional[str]
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    micro_batch_size: int = 1  # samples (pairs for train-rm, examples for train-sft)
    global_batch_size: int = 2
    train_iters: int = 100
    shuffle: bool = True
    load: Optional[str] = None
    pretrained_checkpoint: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: Optional[int] = None
    log_interval: int = 1
    log_dir: Optional[str] = None
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_run_name: Optional[str] = None
    transformer_impl: str = "auto"
    local_attention: str = "auto"  # local spec core attention: sdpa | unfused
    recompute_granularity: Optional[str] = None
    recompute_num_layers: int = 1
    skip_memory_check: bool = False
    exit_interval: Optional[int] = None  # stop (after saving) at this iteration: for tests/preemption
    max_nonfinite_steps: int = 3  # skipped non-finite optimizer steps in a row before the run stops
    allow_tokenizer_change: bool = False  # accept a tokenizer other than the checkpoint's (recorded)
    # packed sequences (data/packing.py): micro-batches of up to pack_tokens tokens (default
    # micro_batch_size x sequences per sample x seq_length: the memory plan's micro-batch), no padding computed
    pack_sequences: bool = True
    pack_tokens: Optional[int] = None
    group_by_length: bool = False  # without packing: length-sorted micro-batches within a global batch

    sequences_per_sample: ClassVar[int] = 1  # a preference pair is two sequences

    def pack_capacity(self) -> Optional[int]:
        """Tokens per packed micro-batch, or None when packing is off."""
        if not self.pack_sequences:
            return None
        return self.pack_tokens or self.micro_batch_size * self.sequences_per_sample * self.data.seq_length
