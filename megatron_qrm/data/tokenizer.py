"""A thin, uniform tokenizer interface over Hugging Face tokenizers and SentencePiece models.

Everything downstream (preference data, rollouts, per-token score dumps) talks to :class:`Tokenizer`
only, so it never needs to know which library produced the ids. :func:`load_tokenizer` picks the backend
from what the ``--tokenizer`` path points at:

* a directory with Hugging Face tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``) ->
  ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``;
* a SentencePiece ``.model`` file -> ``sentencepiece.SentencePieceProcessor``;
* a directory holding a ``tokenizer.model`` and no Hugging Face files (Meta's "original" checkpoint
  layout) -> SentencePiece on that file.

Conventions shared by both backends:

* :meth:`Tokenizer.encode` never adds special tokens. Callers add BOS / EOS explicitly, because the
  Q-RM sequence layout (``[BOS] prompt ++ response [EOS]``) is built from two separately encoded parts.
* ``bos_id`` is the id to put in front of a sequence, or ``None`` when the model is not trained with one.
  For Hugging Face tokenizers this means: the tokenizer defines a BOS token *and* its own default encoding
  prepends it (Llama, Mistral, Gemma do; GPT-2 defines ``<|endoftext|>`` as BOS but never prepends it,
  Qwen defines none). Prepending a BOS the model never saw in pre-training would shift its inputs.
* ``pad_id`` falls back to ``eos_id`` when there is no pad token; padded positions are always masked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_qrm.errors import UserError, UserFileNotFoundError

#: Files whose presence marks a directory as a Hugging Face tokenizer directory.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")

#: How many preceding ids :meth:`Tokenizer.token_texts` decodes together with each id. Enough context for
#: SentencePiece's leading-space handling and for multi-byte UTF-8 characters split over byte tokens.
_TOKEN_TEXT_CONTEXT = 6

#: Fewest texts :meth:`SentencePieceTokenizer.encode_batch` encodes in SentencePiece's multi-threaded call.
_SP_THREADED_MIN = 32


class Tokenizer:
    """Uniform tokenizer interface; use :func:`load_tokenizer` to get one.

    Attributes:
        name_or_path: the path it was loaded from (used in error messages).
        vocab_size: number of token ids, added tokens included (``len(tokenizer)`` for HF).
        bos_id: id to prepend to a sequence, or ``None`` (see the module docstring).
        eos_id: end-of-response id, appended after every response.
        pad_id: padding id; the pad token when the tokenizer has one, else ``eos_id``.
    """

    name_or_path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added), in one backend call."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens kept where the backend can render them)."""
        raise NotImplementedError

    def token_texts(self, ids: list[int]) -> list[str]:
        """One display string per id, for per-token score dumps (``len(result) == len(ids)``).

        Decoding each id on its own loses SentencePiece's leading spaces and splits multi-byte characters,
        so each id is decoded together with a few preceding ids and its text is what it adds to that
        prefix. An id that only completes part of a UTF-8 character shows the replacement character.
        """
        ids = [int(i) for i in ids]
        out: list[str] = []
        for k, tid in enumerate(ids):
            special = self._special_text(tid)
            if special is not None:
                out.append(special)
                continue
            start = max(0, k - _TOKEN_TEXT_CONTEXT)
            context = [i for i in ids[start:k] if self._special_text(i) is None]
            prev = self.decode(context) if context else ""
            cur = self.decode(context + [tid])
            # A prefix ending in an incomplete character decodes to U+FFFD; once completed, the full
            # decode no longer starts with it, so compare without the trailing replacement characters.
            stem = prev.rstrip("\ufffd")
            out.append(cur[len(stem):] if cur.startswith(stem) else self.decode([tid]))
        return out

    def _special_text(self, token_id: int) -> str | None:
        """Display text of a special/control token, or ``None`` for an ordinary token."""
        return None

    def has_chat_template(self) -> bool:
        """Whether :meth:`render_prompt` can apply a chat template."""
        return False

    def render_prompt(self, instruction: str, chat_template: bool) -> tuple[str, bool]:
        """Prompt text for ``instruction`` and whether that text already contains the BOS token.

        With ``chat_template`` the tokenizer's chat template is applied to a single user turn with the
        generation prompt appended (Llama-3 style templates emit the BOS text themselves, which is why the
        second value exists: the caller must not prepend another BOS id). Without it the instruction is
        returned unchanged.

        Raises:
            ValueError: ``chat_template`` is requested and the tokenizer has none.
        """
        if not chat_template:
            return instruction, False
        raise UserError(
            f"--chat-template was given but the tokenizer at {self.name_or_path!r} "
            f"({type(self).__name__}) has no chat template; drop --chat-template or use a Hugging Face "
            "tokenizer directory whose tokenizer_config.json / chat_template.jinja defines one"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )


class HFTokenizer(Tokenizer):
    """:class:`Tokenizer` over a ``transformers`` tokenizer (fast or slow)."""

    def __init__(self, hf_tokenizer: Any, name_or_path: str) -> None:
        self._tok = hf_tokenizer
        self.name_or_path = name_or_path
        self.vocab_size = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise UserError(
                f"--tokenizer {name_or_path!r}: the tokenizer defines no EOS token (eos_token), which is "
                "needed to end responses; set eos_token in its tokenizer_config.json"
            )
        self.eos_id = int(eos)
        self.pad_id = int(hf_tokenizer.pad_token_id) if hf_tokenizer.pad_token_id is not None else self.eos_id
        bos = hf_tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None and self._prepends_bos(int(bos)) else None
        self._special_ids = set(int(i) for i in hf_tokenizer.all_special_ids)

    def _prepends_bos(self, bos: int) -> bool:
        # Probe the tokenizer's own default encoding: it is the only reliable sign of whether the model
        # was trained with a BOS in front (the flag that controls it differs between tokenizer classes).
        ids = self._tok("a", add_special_tokens=True)["input_ids"]
        return len(ids) > 0 and ids[0] == bos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: the "sequence longer than model_max_length" warning is irrelevant, truncation to
        # --seq-length happens in the dataset.
        enc = self._tok(
            list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _special_text(self, token_id: int) -> str | None:
        if token_id in self._special_ids:
            return self._tok.convert_ids_to_tokens(token_id)
        return None

    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def render_prompt(self, instruction: str, chat_template: bool) -> tuple[str, bool]:
        if not chat_template:
            return instruction, False
        if not self.has_chat_template():
            return super().render_prompt(instruction, chat_template)
        text = self._tok.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        bos_text = self._tok.bos_token
        return text, bool(bos_text) and bos_text in text


class SentencePieceTokenizer(Tokenizer):
    """:class:`Tokenizer` over a SentencePiece model (Llama-1/2 style ``tokenizer.model``)."""

    def __init__(self, processor: Any, name_or_path: str) -> None:
        self._sp = processor
        self.name_or_path = name_or_path
        self.vocab_size = int(processor.get_piece_size())
        eos = int(processor.eos_id())
        if eos < 0:
            raise UserError(
                f"--tokenizer {name_or_path!r}: the SentencePiece model has no EOS piece (eos_id < 0), "
                "which is needed to end responses"
            )
        self.eos_id = eos
        bos = int(processor.bos_id())
        self.bos_id = bos if bos >= 0 else None
        pad = int(processor.pad_id())
        self.pad_id = pad if pad >= 0 else eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if len(texts) < _SP_THREADED_MIN:
            # a few texts (a served request): on this thread. SentencePiece's list call starts worker
            # threads, which on a busy machine wait for a core while the caller (an event loop) blocks.
            return [list(map(int, self._sp.encode(t, out_type=int))) for t in texts]
        # A list input is encoded by SentencePiece in one (multi-threaded) native call.
        return [list(map(int, ids)) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _special_text(self, token_id: int) -> str | None:
        # Control pieces (<s>, </s>, <pad>) decode to "" in SentencePiece; show their names instead.
        if 0 <= token_id < self.vocab_size and (
            self._sp.is_control(token_id) or self._sp.is_unknown(token_id)
        ):
            return self._sp.id_to_piece(token_id)
        return None


def _load_sentencepiece(model_file: Path, name_or_path: str) -> SentencePieceTokenizer:
    import sentencepiece as spm

    try:
        processor = spm.SentencePieceProcessor(model_file=str(model_file))
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"--tokenizer {name_or_path!r}: cannot read {str(model_file)!r} as a SentencePiece model ({err})"
        ) from err
    return SentencePieceTokenizer(processor, name_or_path)


def _load_hf(directory: Path, name_or_path: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... depending on what is off
        raise UserError(
            f"--tokenizer {name_or_path!r}: cannot load the Hugging Face tokenizer in this directory "
            f"({type(err).__name__}: {err})"
        ) from err
    return HFTokenizer(hf, name_or_path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer that ``--tokenizer path`` points at (see the module docstring for the forms).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` exists but holds no tokenizer this function can read.
    """
    name = os.fspath(path)
    p = Path(name).expanduser()
    if not p.exists():
        raise UserFileNotFoundError(
            f"--tokenizer {name!r}: no such file or directory (expected a Hugging Face tokenizer directory "
            "or a SentencePiece .model file)"
        )
    if p.is_file():
        if p.suffix == ".model":
            return _load_sentencepiece(p, name)
        raise UserError(
            f"--tokenizer {name!r}: a file, but not a SentencePiece .model file; pass the directory that "
            "holds the Hugging Face tokenizer files instead"
        )
    if any((p / f).is_file() for f in _HF_FILES):
        return _load_hf(p, name)
    if (p / "tokenizer.model").is_file():
        return _load_sentencepiece(p / "tokenizer.model", name)
    raise UserError(
        f"--tokenizer {name!r}: the directory contains neither Hugging Face tokenizer files "
        f"({', '.join(_HF_FILES)}) nor a SentencePiece tokenizer.model"
    )


# ----------------------------------------------------------------------------- tokenizer identity
#: Files of a tokenizer directory that define its ids (hashed, in this order, when present).
_IDENTITY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def tokenizer_fingerprint(path: str | os.PathLike, legacy: bool = False) -> str:
    """SHA-256 (hex, first 16 characters) of the files that define a tokenizer's ids: the contents of the
    ``.model`` file itself, or the known tokenizer files of a directory (each file's role, i.e. its fixed
    name, and contents). Moving, copying or renaming the tokenizer keeps its fingerprint; editing,
    retraining or swapping it changes it.

    ``legacy``: the fingerprint of older versions, which also hashed a single file's own name (a renamed
    byte-identical copy then differed); :func:`check_tokenizer_identity` accepts it for their checkpoints."""
    import hashlib

    p = Path(os.fspath(path)).expanduser()
    h = hashlib.sha256()
    single = p.is_file()
    files = [p] if single else [p / f for f in _IDENTITY_FILES if (p / f).is_file()]
    for f in files:
        if not single or legacy:  # a directory's file names say what each file is; a lone file's says nothing
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def tokenizer_identity(tokenizer: Tokenizer, path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint records about its tokenizer (``qrm_config.json["tokenizer_identity"]``)."""
    return {"vocab_size": int(tokenizer.vocab_size), "fingerprint": tokenizer_fingerprint(path),
            "path": os.path.abspath(os.fspath(path))}


class TokenizerMismatchError(UserError):
    """The tokenizer given differs from the one a checkpoint was trained with."""


def check_tokenizer_identity(saved_config: dict[str, Any], tokenizer: Tokenizer, path: str | os.PathLike, *,
                             checkpoint: str, model_vocab_size: int | None = None, flag: str = "--tokenizer",
                             allow_change: bool = False) -> dict[str, Any] | None:
    """Refuse a tokenizer other than the checkpoint's. For every reader of a checkpoint: resume, eval,
    RL, serving (``megatron_qrm.serving`` calls this with its ``--tokenizer``).

    ``saved_config``: the checkpoint's ``qrm_config.json``; ``tokenizer``/``path``: the tokenizer about to
    be used; ``model_vocab_size``: the model's embedding rows (default: the saved model config's).

    * A tokenizer with more ids than the model's vocabulary is always refused (its ids would index past
      the embedding table: a raw ``IndexError`` deep in the forward pass otherwise).
    * A checkpoint that records ``tokenizer_identity`` (vocabulary size + :func:`tokenizer_fingerprint`)
      must match it; with ``allow_change`` (``--allow-tokenizer-change``) a different one is accepted and
      the returned record (``{"from": ..., "to": ...}``) is to be appended to the new checkpoint's
      ``tokenizer_changes``. Older checkpoints without the record are checked on the vocabulary bound only.

    Raises :class:`TokenizerMismatchError` (a ``ValueError``) naming both tokenizers.
    """
    vocab_rows = model_vocab_size or int((saved_config.get("model") or {}).get("vocab_size") or 0)
    if vocab_rows and tokenizer.vocab_size > vocab_rows:
        raise TokenizerMismatchError(
            f"{flag} {path}: {tokenizer.vocab_size} token ids, but the model in {checkpoint} has a vocabulary of "
            f"{vocab_rows}; its ids would index past the embedding table")
    saved = saved_config.get("tokenizer_identity")
    if not saved:
        return None
    current = tokenizer_identity(tokenizer, path)
    same_vocab = current["vocab_size"] == saved.get("vocab_size")
    if same_vocab and saved.get("fingerprint") in (current["fingerprint"], tokenizer_fingerprint(path, legacy=True)):
        return None  # (the second: a checkpoint of an older version, whose fingerprint hashed the file's name)

    def describe(ident: dict[str, Any]) -> str:
        return f"{ident.get('path')} (vocab {ident.get('vocab_size')}, fingerprint {ident.get('fingerprint')})"

    if not allow_change:
        raise TokenizerMismatchError(
            f"{flag}: the tokenizer {describe(current)} differs from the one {checkpoint} was trained with, "
            f"{describe(saved)}; its token ids would mean other words. Use the checkpoint's tokenizer, or pass "
            "--allow-tokenizer-change for a deliberate change (it is recorded in the new checkpoints)")
    import logging

    logging.getLogger("megatron_qrm").warning(
        f"--allow-tokenizer-change: using {describe(current)} with {checkpoint}, trained with {describe(saved)}")
    return {"from": saved, "to": current, "checkpoint": os.path.abspath(checkpoint)}
