"""Tiny tokenizers built from scratch for tests (no downloads).

Two builders, both deterministic and fast (well under a second each):

* :func:`make_sentencepiece_model` trains a small SentencePiece BPE model and returns the ``.model`` path;
* :func:`make_hf_tokenizer_dir` trains a small byte-level BPE with the ``tokenizers`` library, wraps it in
  ``transformers.PreTrainedTokenizerFast`` (``<s>``/``</s>``/``<pad>``/``<unk>``, a BOS-adding
  post-processor like Llama's, optionally a small Jinja chat template) and saves it with
  ``save_pretrained``; returns the directory.

Other test modules import these (``from helpers_tokenizers import ...``); pytest puts ``tests/`` on
``sys.path`` because the folder has no ``__init__.py``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

#: The chat template of the HF test tokenizer. It starts with the BOS token text, as Llama-3's does, so the
#: dataset must not add a second BOS in front of it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_WORDS = (
    "the a of to and in is was for on that with as at by from it an be this are or have has which not "
    "but had they one all were we can her there been if more when will would who so no about out up "
    "number eggs day dollars each total left after twice half three four five six seven eight nine ten "
    "how many much does she he make every morning friends market sells price per answer step first then "
    "so therefore calculate need we let x y equals plus minus times divided remaining cost apples books"
).split()


def sample_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Generate ``n`` deterministic pseudo-sentences (words, digits, punctuation, a few non-ASCII chars)."""
    rng = random.Random(seed)
    extra = ["’", "é", "$", "%", "=", "+", "-", "*", "/", "(", ")", ".", ",", "?", ":", "\n"]
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(_WORDS))
            elif r < 0.9:
                parts.append(str(rng.randint(0, 999)))
            else:
                parts.append(rng.choice(extra))
        line = " ".join(parts)
        lines.append(line[0].upper() + line[1:] + ".")
    return lines


def make_sentencepiece_model(
    tmpdir: str | os.PathLike,
    texts: Iterable[str] | None = None,
    vocab_size: int = 400,
    model_type: str = "bpe",
) -> str:
    """Train a tiny SentencePiece model in ``tmpdir`` and return the path of its ``.model`` file.

    Ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3. ``byte_fallback`` is on, so any text
    encodes without ``<unk>`` (the 256 byte pieces are why the vocabulary is a bit over 256).
    """
    import sentencepiece as spm

    out = Path(tmpdir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"sp_{model_type}_{vocab_size}"
    lines = list(texts) if texts is not None else sample_texts()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        character_coverage=1.0,
        # A tiny corpus: do not let the trainer complain that the vocabulary is too large for it.
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return str(prefix) + ".model"


def make_hf_tokenizer_dir(
    tmpdir: str | os.PathLike,
    with_chat_template: bool = True,
    texts: Iterable[str] | None = None,
    vocab_size: int = 400,
) -> str:
    """Build a tiny Hugging Face fast tokenizer, save it under ``tmpdir`` and return the directory.

    Byte-level BPE (every string encodes, no ``<unk>`` in practice); special tokens ``<pad>`` = 0,
    ``<unk>`` = 1, ``<s>`` = 2, ``</s>`` = 3. Encoding with special tokens prepends ``<s>`` (like Llama),
    so :func:`megatron_qrm.data.load_tokenizer` reports ``bos_id = 2``. With ``with_chat_template`` the
    saved tokenizer carries :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = list(texts) if texts is not None else sample_texts()
    tok.train_from_iterator(lines, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if with_chat_template:
        hf.chat_template = CHAT_TEMPLATE
    out = Path(tmpdir) / ("hf_tok_chat" if with_chat_template else "hf_tok_plain")
    hf.save_pretrained(str(out))
    return str(out)
