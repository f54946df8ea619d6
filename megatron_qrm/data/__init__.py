"""Tokenizers, raw record sources and the preference-pair dataset with its collation."""

from .preference import (
    TOKENIZE_CHUNK,
    PreferenceDataConfig,
    PreferenceDataset,
    TokenizedPair,
    collate_pairs,
    pad_multiple_for,
)
from .prompts import PromptDataConfig, PromptDataset
from .sources import DataError, read_records
from .tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerMismatchError,
    check_tokenizer_identity,
    load_tokenizer,
    tokenizer_identity,
)

__all__ = [
    "DataError",
    "HFTokenizer",
    "PreferenceDataConfig",
    "PreferenceDataset",
    "PromptDataConfig",
    "PromptDataset",
    "SentencePieceTokenizer",
    "TOKENIZE_CHUNK",
    "TokenizedPair",
    "Tokenizer",
    "TokenizerMismatchError",
    "check_tokenizer_identity",
    "collate_pairs",
    "load_tokenizer",
    "pad_multiple_for",
    "read_records",
    "tokenizer_identity",
]
