"""Supervised fine-tuning examples ``(instruction, response)`` -> prompt/response ids.

Rendering, BOS and truncation follow the preference data (:mod:`megatron_qrm.data.preference`): the
prompt stays whole, the response (EOS appended) is cut from its end to fit ``--seq-length``; a prompt
that leaves no room is an error naming ``FILE:LINE`` unless ``--skip-long-prompts``.
:func:`example_microbatch` lays a micro-batch of examples out for the model (padded or packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .packing import pack_collated
from .preference import TOKENIZE_CHUNK, _text_field, collate_sequences
from .sources import DataError, read_records
from .tokenizer import Tokenizer


@dataclass
class SFTDataConfig:
    path: str
    instruction_field: str = "instruction"
    response_field: str = "response"
    chat_template: bool = False
    seq_length: int = 1024
    skip_long_prompts: bool = False
    split: str = "train"
    max_examples: Optional[int] = None


class SFTDataset:
    def __init__(self, cfg: SFTDataConfig, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.stats = {"records": 0, "examples": 0, "truncated": 0, "skipped_long_prompt": 0}
        self._prompts: list[np.ndarray] = []
        self._responses: list[np.ndarray] = []
        chunk: list[tuple[str, str, str]] = []
        for loc, rec in read_records(cfg.path, cfg.split, self.stats):
            self.stats["records"] += 1
            chunk.append((loc, _text_field(rec, cfg.instruction_field, loc), _text_field(rec, cfg.response_field, loc)))
            if len(chunk) >= TOKENIZE_CHUNK:
                self._add(chunk)
                chunk = []
            if cfg.max_examples and len(self._prompts) + len(chunk) >= cfg.max_examples:
                break
        if chunk:
            self._add(chunk)
        if cfg.max_examples:
            del self._prompts[cfg.max_examples:], self._responses[cfg.max_examples:]
        self.stats["examples"] = len(self._prompts)
        if not self._prompts:
            raise DataError(f"{cfg.path}: no usable examples ({self.stats})")

    def _add(self, chunk: list[tuple[str, str, str]]) -> None:
        tok, L = self.tokenizer, self.cfg.seq_length
        rendered = [tok.render_prompt(ins, self.cfg.chat_template) for _, ins, _ in chunk]
        ids = tok.encode_batch([t for t, _ in rendered] + [r for _, _, r in chunk])
        n = len(chunk)
        for (loc, _, _), (_, has_bos), p, r in zip(chunk, rendered, ids[:n], ids[n:]):
            if tok.bos_id is not None and not has_bos:
                p = [tok.bos_id] + p
            if len(p) >= L:
                if self.cfg.skip_long_prompts:
                    self.stats["skipped_long_prompt"] += 1
                    continue
                raise DataError(f"{loc}: the prompt is {len(p)} tokens long, which leaves no room for a response "
                                f"within --seq-length {L}; raise --seq-length or pass --skip-long-prompts")
            r = r + [tok.eos_id]
            self.stats["truncated"] += int(len(p) + len(r) > L)
            self._prompts.append(np.asarray(p, dtype=np.int32))
            self._responses.append(np.asarray(r[: L - len(p)], dtype=np.int32))

    def __len__(self) -> int:
        return len(self._prompts)

    def example(self, i: int) -> tuple[list[int], list[int]]:
        return self._prompts[int(i)].tolist(), self._responses[int(i)].tolist()

    def sequence_lengths(self) -> np.ndarray:
        """``[N]`` int64 token counts of prompt + response of every example (for packing / length grouping)."""
        return np.fromiter((len(p) + len(r) for p, r in zip(self._prompts, self._responses)), dtype=np.int64,
                           count=len(self))


def example_microbatch(dataset: SFTDataset, indices, pad_id: int, pad_multiple: int, *,
                       pack: bool = False) -> dict[str, torch.Tensor]:
    """One micro-batch of the examples ``indices`` of ``dataset``: the ``[N, S]`` right-padded batch of
    :func:`~megatron_qrm.data.preference.collate_sequences` (``S`` a multiple of ``pad_multiple``), or with
    ``pack`` one packed THD stream of its ``N`` sequences (:func:`~megatron_qrm.data.packing.pack_collated`)."""
    prompts, responses = zip(*(dataset.example(i) for i in indices))
    if not pack:
        return collate_sequences(prompts, responses, pad_id, pad_multiple)
    return pack_collated(collate_sequences(prompts, responses, pad_id, 1), pad_id, pad_multiple)
