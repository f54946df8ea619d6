"""The ``qrm_config.json`` record every trainer writes beside its weights.

One function, :func:`checkpoint_record`, builds it for every role (reward model, DPO-RM, SFT policy, RL actor
and critic), so a reader (``--load``, ``--pretrained-checkpoint``, ``eval-rm``, ``serve``, the RL trainer's
``--actor`` / ``--reward-model``, the exporter) finds the same keys whoever wrote the checkpoint. Keys::

    kind               what wrote it: "reward_model" (train-rm), "policy" (train-sft, the RL actor),
                       "critic" (PPO's value model); "hf_import" comes from conversion/importer.py
    role               the model's head: "reward" (token head), "policy" (LM head), "critic"
    model              ModelConfig.to_dict(): the sizes a checkpoint loads into
    tokenizer          the tokenizer path (absolute when it exists here)
    tokenizer_identity vocabulary size + fingerprint (checkpointing.tokenizer_record); tokenizer_changes:
                       every --allow-tokenizer-change so far
    lora               LoRAConfig as a dict (rank 0: none)
    chat_template      whether prompts were rendered with the tokenizer's chat template
    seq_length         the training --seq-length
    ...                the role's own entries (reward_loss, data, pretrained_checkpoint; rl)

A key is written only when its value is given, so records stay exactly what earlier versions wrote (a
critic's record is ``kind``, ``role``, ``model``); ``save_checkpoint`` adds ``iteration`` and writes the
JSON with sorted keys.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from megatron_qrm import checkpointing
from megatron_qrm.config import ModelConfig


def checkpoint_record(kind: str, role: str, model: ModelConfig, *, tokenizer=None,
                      tokenizer_path: Optional[str] = None, inherited: Optional[dict[str, Any]] = None,
                      tokenizer_change: Optional[dict[str, Any]] = None, lora=None,
                      chat_template: Optional[bool] = None, seq_length: Optional[int] = None,
                      **extra: Any) -> dict[str, Any]:
    """The record of one checkpoint.

    Args:
        kind: what writes it ("reward_model", "policy", "critic").
        role: the model's head ("reward", "policy", "critic").
        model: the model's config.
        tokenizer: the loaded tokenizer (its identity is recorded; None: no identity).
        tokenizer_path: where it was loaded from (None: no ``tokenizer`` entry).
        inherited: the record of the checkpoint this run continues or started from, whose tokenizer changes
            are carried over.
        tokenizer_change: this run's ``--allow-tokenizer-change`` entry, if any.
        lora: a :class:`~megatron_qrm.models.lora.LoRAConfig` (or an equal dict).
        chat_template, seq_length: how prompts were rendered and cut.
        extra: the role's own entries, recorded as given (dataclasses as dicts).
    """
    record: dict[str, Any] = {"kind": kind, "role": role, "model": model.to_dict()}
    if tokenizer_path is not None:
        record["tokenizer"] = os.path.abspath(tokenizer_path) if os.path.exists(tokenizer_path) else tokenizer_path
    if lora is not None:
        record["lora"] = dataclasses.asdict(lora) if dataclasses.is_dataclass(lora) else dict(lora)
    if chat_template is not None:
        record["chat_template"] = chat_template
    if seq_length is not None:
        record["seq_length"] = seq_length
    for key, value in extra.items():
        record[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    # what the tokenizer was (checked by every later reader) and every deliberate change of it
    record.update(checkpointing.tokenizer_record(tokenizer, tokenizer_path, inherited, tokenizer_change))
    return record
