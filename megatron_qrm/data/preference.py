"""Preference pairs ``(instruction, chosen, rejected)`` -> token ids -> padded training batches.

Sequence layout (Q-RM reference, ``docs/method.md`` §4)::

    [BOS] prompt ... | chosen response ... EOS | pad ...
    [BOS] prompt ... | rejected response ... EOS | pad ...

* the prompt is the instruction, or the tokenizer's chat template applied to it (``--chat-template``);
  BOS is prepended only when the tokenizer uses one and the rendered text does not already contain it;
* each response is encoded on its own and followed by EOS;
* with ``L = --seq-length`` the prompt is kept whole and each response is cut from its end so that
  ``len(prompt) + len(response) <= L`` (the EOS is lost then). A prompt of ``L`` tokens or more leaves no
  room for a response: that is an error, or with ``--skip-long-prompts`` the pair is skipped and counted.
  (The reference cuts such a prompt and trains on an empty response, which it then ignores in the loss.)

:class:`PreferenceDataset` tokenises everything eagerly, in batches, and stores ids compactly (int32
arrays, each distinct prompt once: preference sets repeat the same question for many response pairs).
:func:`collate_pairs` builds the ``[2B, S]`` batch the reward model's forward and loss consume;
:func:`pair_microbatch` lays a micro-batch of pairs out for the model: that batch, or packed
(:mod:`megatron_qrm.data.packing`, which knows nothing of pairs beyond the layout).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from megatron_qrm.errors import UserError

from .packing import pack_collated, pack_pairs_shared_prompt, shared_prompt_pair_tokens
from .sources import DataError, read_records
from .tokenizer import Tokenizer

#: Records tokenised per backend call; large enough to amortise the call, small enough to stay cheap.
TOKENIZE_CHUNK = 512


@dataclass
class PreferenceDataConfig:
    """Where the pairs are and how to turn them into token ids (mirrors the CLI data flags)."""

    path: str
    instruction_field: str = "instruction"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    chat_template: bool = False
    seq_length: int = 1024
    skip_long_prompts: bool = False
    split: str = "train"
    max_pairs: int | None = None
    #: a pair with an empty response or chosen == rejected is an error (``--strict-data``), not a skip
    strict: bool = False


@dataclass
class TokenizedPair:
    """One tokenised preference pair.

    Attributes:
        prompt_ids: prompt ids, BOS included when the tokenizer uses one.
        chosen_ids: chosen-response ids with EOS appended, after truncation.
        rejected_ids: rejected-response ids with EOS appended, after truncation.
        truncated: whether either response was cut to fit ``seq_length``.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _text_field(record: dict, field: str, loc: str) -> str:
    """The string value of ``record[field]``; a list value contributes its first element (as the reference)."""
    if field not in record:
        fields = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{loc}: missing field {field!r} (the record has fields: {fields})")
    value = record[field]
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{loc}: field {field!r} must be a string, got an empty list")
        value = value[0]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{loc}: field {field!r} must be a string, got {kind}")
    return value


class PreferenceDataset:
    """Tokenised preference pairs, built eagerly from ``cfg.path``; a read-only sequence of
    :class:`TokenizedPair`.

    Attributes:
        stats: ``{"records": records read, "pairs": pairs kept, "truncated": kept pairs with a cut
            response, "skipped_long_prompt": pairs skipped because the prompt did not fit}``.
        locations: where each kept pair came from (``FILE:LINE`` / ``FILE:row N``), aligned with indices.
    """

    def __init__(self, cfg: PreferenceDataConfig, tokenizer: Tokenizer) -> None:
        if cfg.seq_length < 2:
            raise UserError(f"--seq-length must be at least 2, got {cfg.seq_length}")
        if cfg.max_pairs is not None and cfg.max_pairs < 1:
            raise UserError(f"max_pairs must be a positive number or None, got {cfg.max_pairs}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stats: dict[str, int] = {"records": 0, "pairs": 0, "truncated": 0, "skipped_long_prompt": 0,
                                      "skipped_empty_response": 0, "skipped_identical": 0}
        self._first_skipped: str | None = None  # FILE:LINE of the first pair skipped as degenerate
        self.locations: list[str] = []
        # Compact storage: distinct prompts once, responses as int32 arrays; lists are built on access.
        self._prompts: list[np.ndarray] = []
        self._prompt_index: dict[str, int] = {}  # rendered prompt text -> index into _prompts
        self._render_cache: dict[str, tuple[str, bool]] = {}  # instruction -> render_prompt(...)
        self._pair_prompt: list[int] = []
        self._chosen: list[np.ndarray] = []
        self._rejected: list[np.ndarray] = []
        self._truncated: list[bool] = []

        chunk: list[tuple[str, str, str, str]] = []
        for loc, record in read_records(cfg.path, cfg.split, self.stats):
            self.stats["records"] += 1
            chunk.append(
                (
                    loc,
                    _text_field(record, cfg.instruction_field, loc),
                    _text_field(record, cfg.chosen_field, loc),
                    _text_field(record, cfg.rejected_field, loc),
                )
            )
            # With max_pairs, never read more records than could still be kept, so that "records" is the
            # number actually consumed and the file is not read past what is needed.
            room = None if cfg.max_pairs is None else cfg.max_pairs - len(self._chosen)
            if len(chunk) >= TOKENIZE_CHUNK or (room is not None and len(chunk) >= room):
                self._add_chunk(chunk)
                chunk = []
                if cfg.max_pairs is not None and len(self._chosen) >= cfg.max_pairs:
                    break
        if chunk:
            self._add_chunk(chunk)
        degenerate = self.stats["skipped_empty_response"] + self.stats["skipped_identical"]
        if degenerate:
            logging.getLogger("megatron_qrm").warning(
                f"{cfg.path}: skipped {self.stats['skipped_empty_response']} pairs with an empty response and "
                f"{self.stats['skipped_identical']} with chosen == rejected (first at {self._first_skipped}); "
                "they carry no preference (--strict-data makes them an error)")
        # Only needed while building; the texts can be large.
        self._render_cache.clear()
        self._prompt_index.clear()
        self.stats["pairs"] = len(self._chosen)
        if not self._chosen:
            raise DataError(
                f"{cfg.path}: no preference pairs (records read: {self.stats['records']}, skipped for long "
                f"prompts: {self.stats['skipped_long_prompt']})"
            )

    def _render(self, instruction: str) -> tuple[str, bool]:
        cached = self._render_cache.get(instruction)
        if cached is None:
            cached = self.tokenizer.render_prompt(instruction, self.cfg.chat_template)
            self._render_cache[instruction] = cached
        return cached

    def _add_chunk(self, chunk: list[tuple[str, str, str, str]]) -> None:
        """Tokenise one chunk of ``(location, instruction, chosen, rejected)`` in a single backend call."""
        tok, L = self.tokenizer, self.cfg.seq_length
        rendered = [self._render(instruction) for _, instruction, _, _ in chunk]
        new_prompts = list(dict.fromkeys(t for t, _ in rendered if t not in self._prompt_index))
        texts = new_prompts + [c for _, _, c, _ in chunk] + [r for _, _, _, r in chunk]
        ids = tok.encode_batch(texts)
        contains_bos = dict(rendered)
        for text, prompt_ids in zip(new_prompts, ids[: len(new_prompts)]):
            # Prepend BOS unless the tokenizer has none or the template text already carries it.
            if tok.bos_id is not None and not contains_bos[text]:
                prompt_ids = [tok.bos_id] + prompt_ids
            self._prompt_index[text] = len(self._prompts)
            self._prompts.append(np.asarray(prompt_ids, dtype=np.int32))
        n = len(chunk)
        chosen_ids, rejected_ids = ids[len(new_prompts) : len(new_prompts) + n], ids[len(new_prompts) + n :]
        for (loc, _, c_text, r_text), (text, _), c_ids, r_ids in zip(chunk, rendered, chosen_ids, rejected_ids):
            problem = ("skipped_empty_response", "an empty response") if not c_text.strip() or not r_text.strip() \
                else ("skipped_identical", "chosen == rejected") if c_ids == r_ids else None
            if problem is not None:  # no preference to learn from
                if self.cfg.strict:
                    raise DataError(f"{loc}: {problem[1]} (--strict-data); fix the record or drop --strict-data "
                                    "to skip such pairs")
                self.stats[problem[0]] += 1
                self._first_skipped = self._first_skipped or loc
                continue
            p_idx = self._prompt_index[text]
            p_len = len(self._prompts[p_idx])
            if p_len >= L:
                if self.cfg.skip_long_prompts:
                    self.stats["skipped_long_prompt"] += 1
                    continue
                raise DataError(
                    f"{loc}: the prompt is {p_len} tokens long, which leaves no room for a response within "
                    f"--seq-length {L}; raise --seq-length or pass --skip-long-prompts to skip such pairs"
                )
            budget = L - p_len
            c_ids, r_ids = c_ids + [tok.eos_id], r_ids + [tok.eos_id]
            truncated = len(c_ids) > budget or len(r_ids) > budget
            self._pair_prompt.append(p_idx)
            self._chosen.append(np.asarray(c_ids[:budget], dtype=np.int32))
            self._rejected.append(np.asarray(r_ids[:budget], dtype=np.int32))
            self._truncated.append(truncated)
            self.locations.append(loc)
            self.stats["truncated"] += int(truncated)

    def __len__(self) -> int:
        return len(self._chosen)

    @overload
    def __getitem__(self, i: int) -> TokenizedPair: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedPair]: ...

    def __getitem__(self, i: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"PreferenceDataset indices must be integers, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"pair index {i} out of range for {len(self)} pairs")
        return TokenizedPair(
            prompt_ids=self._prompts[self._pair_prompt[i]].tolist(),
            chosen_ids=self._chosen[i].tolist(),
            rejected_ids=self._rejected[i].tolist(),
            truncated=self._truncated[i],
        )

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self[i] for i in range(len(self)))

    def sequence_lengths(self) -> np.ndarray:
        """``[N, 2]`` int64 token counts of (prompt + chosen, prompt + rejected) of every pair (for packing
        and length grouping)."""
        prompt = self.prompt_lengths()
        chosen = np.fromiter((len(c) for c in self._chosen), dtype=np.int64, count=len(self))
        rejected = np.fromiter((len(r) for r in self._rejected), dtype=np.int64, count=len(self))
        return np.stack([prompt + chosen, prompt + rejected], axis=1)

    def prompt_lengths(self) -> np.ndarray:
        """``[N]`` int64 prompt token counts of every pair (BOS included)."""
        return np.fromiter((len(self._prompts[k]) for k in self._pair_prompt), dtype=np.int64, count=len(self))

    def pair_tokens(self, shared_prompt: bool = False) -> np.ndarray:
        """``[N]`` tokens a pair costs packed: both sequences, or with ``shared_prompt`` the prompt's first
        ``len - 1`` tokens once (:func:`~megatron_qrm.data.packing.pack_pairs_shared_prompt`)."""
        if shared_prompt:
            return shared_prompt_pair_tokens(self.sequence_lengths(), self.prompt_lengths())
        return self.sequence_lengths().sum(axis=1)

    def __repr__(self) -> str:
        return f"PreferenceDataset({self.cfg.path!r}, {self.stats})"


def pad_multiple_for(tensor_parallel_size: int, sequence_parallel: bool, base: int = 8) -> int:
    """The multiple to pad sequence lengths to.

    ``base`` keeps matmul shapes friendly; with sequence parallelism the sequence is also split across
    the ``tensor_parallel_size`` ranks, so it must be divisible by it too: ``lcm(base, tp)``. Without
    sequence parallelism the sequence is not split and ``base`` is returned.
    """
    if tensor_parallel_size < 1 or base < 1:
        raise ValueError(f"tensor_parallel_size and base must be >= 1, got {tensor_parallel_size}, {base}")
    return math.lcm(base, tensor_parallel_size) if sequence_parallel else base


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple: int = 8,
) -> dict[str, torch.Tensor]:
    """Stack ``N`` (prompt, response) id lists into one right-padded batch.

    ``S`` is the longest ``prompt + response`` length rounded up to a multiple of ``pad_to_multiple``.

    Returns:
        ``tokens`` LongTensor ``[N, S]`` prompt+response padded with ``pad_id``;
        ``position_ids`` LongTensor ``[N, S]``: ``arange(S)`` in every row;
        ``response_mask`` FloatTensor ``[N, S]``: 1 at response positions (EOS included), 0 on prompt and
            padding -- the positions whose token-level score ``Z`` enters the Q-RM mean;
        ``labels`` LongTensor ``[N, S]``: ``tokens`` shifted left by one (next token), last column ``pad_id``;
        ``label_mask`` FloatTensor ``[N, S]``: ``response_mask`` shifted left by one (positions whose next
            token is a response token, for next-token losses / log-probs), last column 0.
    """
    if not prompts:
        raise ValueError("collate needs at least one sequence")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # [N]
    seq_len = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # [N]
    S = max(1, math.ceil(int(seq_len.max()) / pad_to_multiple)) * pad_to_multiple

    tokens = torch.tensor([s + [pad_id] * (S - len(s)) for s in seqs], dtype=torch.long)  # [N, S]
    positions = torch.arange(S, dtype=torch.long)  # [S]
    response_mask = (
        (positions[None, :] >= prompt_len[:, None]) & (positions[None, :] < seq_len[:, None])
    ).float()  # [N, S]
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    label_mask = torch.zeros_like(response_mask)
    label_mask[:, :-1] = response_mask[:, 1:]
    return {
        "tokens": tokens,
        "position_ids": positions.expand(len(seqs), S).contiguous(),
        "response_mask": response_mask,
        "labels": labels,
        "label_mask": label_mask,
    }


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    pad_to_multiple: int = 8,
    indices: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Stack ``B`` pairs into one right-padded batch of ``2B`` sequences (chosen rows first), laid out as
    :func:`collate_sequences` describes, plus ``index`` LongTensor ``[B]``: ``indices`` (dataset indices
    of the pairs) or ``arange(B)``."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    B = len(pairs)
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id, pad_to_multiple)
    if indices is None:
        index = torch.arange(B, dtype=torch.long)
    else:
        if len(indices) != B:
            raise ValueError(f"collate_pairs got {len(indices)} indices for {B} pairs")
        index = torch.as_tensor(list(indices), dtype=torch.long)
    batch["index"] = index
    return batch


def pair_microbatch(dataset, indices, pad_id: int, pad_multiple: int, *, pack: bool = False,
                    share_prompts: bool = False, ref_sums: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch of the pairs ``indices`` of a :class:`PreferenceDataset`: the ``[2B, S]`` right-padded
    pair batch of :func:`collate_pairs` (rows padded to a multiple of ``pad_multiple``), or with ``pack`` one
    packed stream of its ``2B`` sequences (:func:`~megatron_qrm.data.packing.pack_collated`), with
    ``share_prompts`` each pair's prompt once (:func:`~megatron_qrm.data.packing.pack_pairs_shared_prompt`).
    ``ref_sums`` ``[N, 2]`` (DPO-RM reference log-prob sums of (chosen, rejected) per pair) become
    ``ref_logps_sum`` ``[2B]`` in the batch's row order."""
    idx = [int(i) for i in indices]
    batch = collate_pairs([dataset[i] for i in idx], pad_id, 1 if pack else pad_multiple, indices=idx)
    if ref_sums is not None:
        sel = ref_sums[torch.as_tensor(idx)]
        batch["ref_logps_sum"] = torch.cat([sel[:, 0], sel[:, 1]])
    if not pack:
        return batch
    return (pack_pairs_shared_prompt if share_prompts else pack_collated)(batch, pad_id, pad_multiple)
