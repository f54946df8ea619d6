"""Train the demo's SentencePiece tokenizer on the task's own text (no downloads).

The result is an ordinary SentencePiece ``.model`` that every command loads through
:func:`megatron_qrm.data.load_tokenizer` (``--tokenizer DIR/tokenizer.model``), like Llama-2's.
Settings chosen for the task: BPE; every number of the task is one piece (the corpus lists them all,
and the vocabulary is large enough for the merges); newlines are kept (identity normalisation, no
whitespace folding), because they separate the solution's steps; byte fallback, so any text encodes.
Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3.
"""

from __future__ import annotations

import os


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 400) -> str:
    """Train on ``texts``; returns the path of ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        split_digits=False,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"
