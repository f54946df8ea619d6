"""Write a small synthetic preference set and a SentencePiece tokenizer trained on it.

Everything is generated here, with no download: the pairs come from
:func:`megatron_qrm.data.synthetic.sorting_pairs` (the prompt asks to sort a few numbers; the chosen
response is sorted, the rejected one has two neighbours swapped, i.e. a first error at a known step).

Output folder::

    OUT/train.jsonl       training pairs   (fields: instruction, chosen, rejected)
    OUT/test.jsonl        held-out pairs   (different seed, so different questions)
    OUT/tokenizer.model   SentencePiece BPE model (ids: <pad>=0, <unk>=1, <s>=2, </s>=3)
    OUT/tokenizer.vocab

Usage::

    python examples/make_tiny_data.py --out runs/tiny/data [--train-pairs 2000] [--test-pairs 200]
"""

from __future__ import annotations

import argparse
import os

from megatron_qrm.data.synthetic import corpus, sorting_pairs, write_jsonl


def train_tokenizer(texts: list[str], prefix: str, vocab_size: int) -> str:
    """Train a small SentencePiece BPE model on ``texts``; returns the ``.model`` path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,  # any text encodes, nothing maps to <unk>
        character_coverage=1.0,
        hard_vocab_limit=False,  # the corpus is tiny: allow a smaller vocabulary than asked
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    return prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--train-pairs", type=int, default=2000)
    p.add_argument("--test-pairs", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=400,
                   help="SentencePiece vocabulary upper bound (256 byte pieces included; large enough for every number 1..39 to be one token)")
    p.add_argument("--seed", type=int, default=0, help="training-set seed; the test set uses seed + 1")
    args = p.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    train = sorting_pairs(args.train_pairs, seed=args.seed)
    test = sorting_pairs(args.test_pairs, seed=args.seed + 1)
    train_path = write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    test_path = write_jsonl(os.path.join(args.out, "test.jsonl"), test)
    # the tokenizer sees the training texts only
    model = train_tokenizer(corpus(train), os.path.join(args.out, "tokenizer"), args.vocab_size)
    seen = {r["instruction"] for r in train}
    overlap = sum(r["instruction"] in seen for r in test)
    print(f"wrote {train_path} ({len(train)} pairs), {test_path} ({len(test)} pairs, "
          f"{overlap} prompts also in train), tokenizer {model}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
