"""RL prompts ``(instruction[, label])`` -> prompt token ids, rendered exactly as in RM training.

A prompt that leaves no room for ``min_new_tokens`` within ``--seq-length`` is an error naming its
``FILE:LINE`` (or, with ``skip_long_prompts``, skipped and counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_qrm.options import option

from .preference import TOKENIZE_CHUNK, _text_field
from .sources import DataError, read_records
from .tokenizer import Tokenizer


@dataclass
class PromptDataConfig:
    """An RL prompt set (the flags of ``qrm train-ppo`` / ``train-reinforce``'s "prompts" group)."""

    path: str = option(flag="--prompt-data", help="RL prompts: jsonl/parquet/datasets with `instruction` (+`label`)")
    """The prompt file or ``datasets`` name."""
    instruction_field: str = option("instruction", help="field holding the prompt")
    """Field holding the prompt text."""
    label_field: str = option("label", help="field holding the gold answer (for Pass@1)", cli=False)
    """Field holding the gold answer."""
    chat_template: Optional[bool] = option(False, help="render prompts with the tokenizer's chat template (default: on "
                                                   "when the tokenizer has one, or as the checkpoint records)")
    """Render prompts with the tokenizer's chat template (None: as the checkpoint / tokenizer says)."""
    seq_length: int = option(1024, help="prompt + response tokens")
    """Longest prompt + response."""
    min_new_tokens: int = option(1, help="room a prompt must leave for the response", cli=False)
    """Tokens a prompt must leave free within ``seq_length``."""
    skip_long_prompts: bool = option(False, help="skip (and count) prompts that leave no room to respond")
    """Skip such prompts instead of failing."""
    split: str = option("train", help="split, for a `datasets` source", cli=False)
    """``datasets`` split."""
    max_prompts: Optional[int] = option(None, help="use the first N prompts only")
    """Prompt subset size."""


class PromptDataset:
    """Tokenised prompts; ``labels[i]`` is the gold answer text or ``None`` when the file has none."""

    def __init__(self, cfg: PromptDataConfig, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.instructions: list[str] = []
        self.labels: list[Optional[str]] = []
        self.locations: list[str] = []
        self._ids: list[np.ndarray] = []
        self.stats = {"records": 0, "prompts": 0, "skipped_long_prompt": 0}
        chunk: list[tuple[str, str, Optional[str]]] = []
        for loc, rec in read_records(cfg.path, cfg.split, self.stats):
            self.stats["records"] += 1
            label = rec.get(cfg.label_field)
            chunk.append((loc, _text_field(rec, cfg.instruction_field, loc), None if label is None else str(label)))
            if len(chunk) >= TOKENIZE_CHUNK:
                self._add(chunk)
                chunk = []
            if cfg.max_prompts and len(self._ids) + len(chunk) >= cfg.max_prompts:
                break
        if chunk:
            self._add(chunk)
        if cfg.max_prompts:
            del self._ids[cfg.max_prompts:], self.instructions[cfg.max_prompts:]
            del self.labels[cfg.max_prompts:], self.locations[cfg.max_prompts:]
        self.stats["prompts"] = len(self._ids)
        if not self._ids:
            raise DataError(f"{cfg.path}: no usable prompts ({self.stats})")

    def _add(self, chunk: list[tuple[str, str, Optional[str]]]) -> None:
        tok = self.tokenizer
        rendered = [tok.render_prompt(ins, self.cfg.chat_template) for _, ins, _ in chunk]
        ids = tok.encode_batch([text for text, _ in rendered])
        room = self.cfg.seq_length - self.cfg.min_new_tokens
        for (loc, ins, label), (_, has_bos), p in zip(chunk, rendered, ids):
            if tok.bos_id is not None and not has_bos:
                p = [tok.bos_id] + p
            if len(p) > room:
                if self.cfg.skip_long_prompts:
                    self.stats["skipped_long_prompt"] += 1
                    continue
                raise DataError(f"{loc}: the prompt is {len(p)} tokens long, which leaves no room for "
                                f"{self.cfg.min_new_tokens} generated token(s) within --seq-length "
                                f"{self.cfg.seq_length}; raise --seq-length or pass --skip-long-prompts")
            self._ids.append(np.asarray(p, dtype=np.int32))
            self.instructions.append(ins)
            self.labels.append(label)
            self.locations.append(loc)

    def __len__(self) -> int:
        return len(self._ids)

    def prompt_ids(self, i: int) -> list[int]:
        return self._ids[int(i)].tolist()
