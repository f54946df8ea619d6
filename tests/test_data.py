"""Tests for megatron_qrm.data: tokenizers, record sources, the preference dataset and its collation.

Expectations are computed independently of the code under test: token ids with the ``tokenizers`` /
``sentencepiece`` libraries directly, masks and labels with plain Python loops.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers_tokenizers import CHAT_TEMPLATE, make_hf_tokenizer_dir, make_sentencepiece_model
from megatron_qrm.data import (
    DataError,
    HFTokenizer,
    PreferenceDataConfig,
    PreferenceDataset,
    SentencePieceTokenizer,
    TokenizedPair,
    collate_pairs,
    load_tokenizer,
    pad_multiple_for,
    read_records,
)
from megatron_qrm.data import preference as preference_module

BOS, EOS, PAD = 2, 3, 0  # ids fixed by both helper tokenizers

RECORDS = [
    {"instruction": "How many eggs does she sell?", "chosen": "She sells 9 eggs.", "rejected": "She sells 12."},
    {"instruction": "What is 3 plus 4?", "chosen": ["3 + 4 = 7", "ignored"], "rejected": ["It is 8.", "x"]},
    {"instruction": "How many eggs does she sell?", "chosen": "16 - 3 - 4 = 9", "rejected": "16 - 3 = 13"},
    {"instruction": "Half of ten?", "chosen": "5", "rejected": "Half of ten is 20, so the answer is 20."},
]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def hf_dir(tok_dir) -> str:
    return make_hf_tokenizer_dir(tok_dir, with_chat_template=True)


@pytest.fixture(scope="module")
def hf_plain_dir(tok_dir) -> str:
    return make_hf_tokenizer_dir(tok_dir, with_chat_template=False)


@pytest.fixture(scope="module")
def sp_model(tok_dir) -> str:
    return make_sentencepiece_model(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> HFTokenizer:
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def sp_tok(sp_model) -> SentencePieceTokenizer:
    return load_tokenizer(sp_model)


@pytest.fixture(scope="module")
def hf_ref(hf_dir):
    """The same tokenizer through the raw ``tokenizers`` library: an independent encoder."""
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    return lambda text: raw.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def sp_ref(sp_model):
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=sp_model)
    return lambda text: proc.encode(text, out_type=int)


def write_jsonl(path: Path, records: list, blank_lines: bool = False) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
            if blank_lines:
                f.write("\n")
    return str(path)


def as_tuples(ds: PreferenceDataset) -> list[tuple]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.truncated) for p in ds]


# ---------------------------------------------------------------------------------------- tokenizers


def test_hf_dir_loads_with_ids_and_encoding(hf_dir, hf_tok, hf_ref):
    assert isinstance(hf_tok, HFTokenizer)
    assert (hf_tok.vocab_size, hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (400, BOS, EOS, PAD)
    assert hf_tok.name_or_path == hf_dir
    texts = ["How many eggs’ does Janet sell?", "", "16 - 3 = 13\nSo é."]
    assert hf_tok.encode(texts[0]) == hf_ref(texts[0])
    assert hf_tok.encode(texts[0])[0] != BOS  # no special tokens added
    assert hf_tok.encode_batch(texts) == [hf_ref(t) for t in texts]
    assert hf_tok.decode(hf_tok.encode(texts[2])) == texts[2]


def test_sentencepiece_file_and_directory_load(sp_model, sp_tok, sp_ref, tmp_path):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (400, BOS, EOS, PAD)
    text = "Janet’s ducks lay 16 eggs per day."
    assert sp_tok.encode(text) == sp_ref(text)
    assert sp_tok.encode_batch([text, "a b"]) == [sp_ref(text), sp_ref("a b")]
    assert sp_tok.decode(sp_tok.encode(text)) == text
    # Meta "original" layout: a directory holding just tokenizer.model.
    d = tmp_path / "original"
    d.mkdir()
    shutil.copy(sp_model, d / "tokenizer.model")
    from_dir = load_tokenizer(str(d))
    assert isinstance(from_dir, SentencePieceTokenizer)
    assert from_dir.encode(text) == sp_ref(text)
    assert not from_dir.has_chat_template()
    with pytest.raises(ValueError, match=r"--chat-template") as err:
        from_dir.render_prompt("hi", chat_template=True)
    assert str(d) in str(err.value)
    assert from_dir.render_prompt("hi", chat_template=False) == ("hi", False)


def test_load_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--tokenizer") as err:
        load_tokenizer(missing)
    assert missing in str(err.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="--tokenizer") as err:
        load_tokenizer(str(bad))
    assert str(bad) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(empty))
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(ValueError, match="--tokenizer"):
        load_tokenizer(str(other))


def test_token_texts_one_string_per_id(hf_tok, sp_tok):
    text = "She sells 9 eggs, then 13 more."
    for tok in (hf_tok, sp_tok):
        ids = tok.encode(text)
        pieces = tok.token_texts(ids)
        assert len(pieces) == len(ids)
        # ASCII text: the pieces tile the decoded text (SentencePiece drops the first dummy-prefix space).
        assert "".join(pieces).strip() == text
    assert hf_tok.token_texts([BOS, EOS, PAD]) == ["<s>", "</s>", "<pad>"]
    assert sp_tok.token_texts([BOS, EOS, PAD]) == ["<s>", "</s>", "<pad>"]
    # Non-ASCII over several byte tokens still yields one entry per id.
    ids = hf_tok.encode("eggs’ é")
    assert len(hf_tok.token_texts(ids)) == len(ids)


def test_chat_template_render(hf_tok, hf_plain_dir):
    assert hf_tok.has_chat_template()
    assert hf_tok.render_prompt("What is 3 plus 4?", chat_template=True) == (
        "<s>User: What is 3 plus 4?\nAssistant:",
        True,
    )
    assert hf_tok.render_prompt("What is 3 plus 4?", chat_template=False) == ("What is 3 plus 4?", False)
    plain = load_tokenizer(hf_plain_dir)
    assert not plain.has_chat_template()
    with pytest.raises(ValueError, match="--chat-template") as err:
        plain.render_prompt("x", chat_template=True)
    assert hf_plain_dir in str(err.value)
    assert "bos_token" in CHAT_TEMPLATE  # the template itself emits BOS, the case the dataset must handle


# --------------------------------------------------------------------------------------- the dataset


def expected_pairs(records, encode, seq_length, prompt_prefix="", prompt_suffix="", bos=True):
    """Independent reference: one pair at a time, straight from the rules."""
    out = []
    for r in records:
        first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
        prompt = encode(prompt_prefix + r["instruction"] + prompt_suffix)
        if bos:
            prompt = [BOS] + prompt
        budget = seq_length - len(prompt)
        c = encode(first(r["chosen"])) + [EOS]
        rj = encode(first(r["rejected"])) + [EOS]
        out.append((prompt, c[:budget], rj[:budget], len(c) > budget or len(rj) > budget))
    return out


def test_dataset_plain_prompts_match_reference(tmp_path, hf_tok, hf_ref, sp_tok, sp_ref):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    for tok, ref in ((hf_tok, hf_ref), (sp_tok, sp_ref)):
        ds = PreferenceDataset(PreferenceDataConfig(path=path, seq_length=1024), tok)
        assert as_tuples(ds) == expected_pairs(RECORDS, ref, 1024)
        assert ds.stats == {"records": 4, "pairs": 4, "truncated": 0, "skipped_long_prompt": 0,
                            "skipped_empty_response": 0, "skipped_identical": 0, "skipped_blank_lines": 0}
        assert ds.locations == [f"{path}:{i}" for i in range(1, 5)]
        assert ds[-1] == ds[3] and len(ds) == 4 and ds[1:3] == [ds[1], ds[2]]
        with pytest.raises(IndexError):
            ds[4]


def test_list_responses_take_first_element(tmp_path, hf_tok, hf_ref):
    path = write_jsonl(tmp_path / "lists.jsonl", [RECORDS[1]])
    pair = PreferenceDataset(PreferenceDataConfig(path=path), hf_tok)[0]
    assert pair.chosen_ids == hf_ref("3 + 4 = 7") + [EOS]
    assert pair.rejected_ids == hf_ref("It is 8.") + [EOS]


def test_chat_template_prompt_has_exactly_one_bos(tmp_path, hf_tok, hf_ref):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    ds = PreferenceDataset(PreferenceDataConfig(path=path, chat_template=True), hf_tok)
    # The template text starts with "<s>", which the raw tokenizer maps to the BOS id itself.
    assert as_tuples(ds) == expected_pairs(
        RECORDS, hf_ref, 1024, prompt_prefix="<s>User: ", prompt_suffix="\nAssistant:", bos=False
    )
    for pair in ds:
        assert pair.prompt_ids[0] == BOS
        assert pair.prompt_ids.count(BOS) == 1


def test_custom_field_names_and_max_pairs(tmp_path, sp_tok, sp_ref):
    renamed = [{"q": r["instruction"], "good": r["chosen"], "bad": r["rejected"]} for r in RECORDS]
    path = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    cfg = PreferenceDataConfig(
        path=path, instruction_field="q", chosen_field="good", rejected_field="bad", max_pairs=3
    )
    ds = PreferenceDataset(cfg, sp_tok)
    assert as_tuples(ds) == expected_pairs(RECORDS[:3], sp_ref, 1024)
    assert ds.stats["records"] == 3 and ds.stats["pairs"] == 3


def test_truncation_keeps_prompt_and_cuts_response_end(tmp_path, hf_tok, hf_ref):
    instr, long_resp, short_resp = "How many eggs?", "one two three four five six seven eight nine ten", "9"
    prompt = [BOS] + hf_ref(instr)
    long_ids, short_ids = hf_ref(long_resp) + [EOS], hf_ref(short_resp) + [EOS]
    assert len(long_ids) > 6
    seq_length = len(prompt) + 5  # room for 5 response tokens
    records = [
        {"instruction": instr, "chosen": long_resp, "rejected": short_resp},
        {"instruction": instr, "chosen": short_resp, "rejected": "7"},  # (chosen == rejected would be skipped)
    ]
    path = write_jsonl(tmp_path / "trunc.jsonl", records)
    ds = PreferenceDataset(PreferenceDataConfig(path=path, seq_length=seq_length), hf_tok)
    cut = ds[0]
    assert cut.prompt_ids == prompt
    assert cut.chosen_ids == long_ids[:5] and cut.chosen_ids[-1] != EOS  # the end (and EOS) is lost
    assert cut.rejected_ids == short_ids  # only one side cut, the pair is still marked
    assert cut.truncated is True
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == seq_length
    assert ds[1].truncated is False and ds[1].chosen_ids == short_ids
    assert ds.stats["truncated"] == 1

    # A response that fills the sequence exactly keeps its EOS and is not truncated.
    exact = PreferenceDataset(
        PreferenceDataConfig(path=path, seq_length=len(prompt) + len(long_ids)), hf_tok
    )
    assert exact[0].chosen_ids == long_ids and not exact[0].truncated


def test_long_prompt_is_an_error_or_skipped(tmp_path, hf_tok, hf_ref):
    long_instr = " ".join(["eggs"] * 40)
    n_long = 1 + len(hf_ref(long_instr))
    records = [RECORDS[0], {"instruction": long_instr, "chosen": "a", "rejected": "b"}, RECORDS[2]]
    path = write_jsonl(tmp_path / "long.jsonl", records, blank_lines=True)  # the long one is on line 3
    seq_length = n_long  # prompt alone == seq_length: no room
    assert seq_length > 1 + len(hf_ref(RECORDS[0]["instruction"])) + 8
    with pytest.raises(DataError) as err:
        PreferenceDataset(PreferenceDataConfig(path=path, seq_length=seq_length), hf_tok)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3:")
    assert f"{n_long} tokens" in msg and "--seq-length" in msg and "--skip-long-prompts" in msg

    ds = PreferenceDataset(
        PreferenceDataConfig(path=path, seq_length=seq_length, skip_long_prompts=True), hf_tok
    )
    assert len(ds) == 2
    assert ds.stats == {"records": 3, "pairs": 2, "truncated": ds.stats["truncated"], "skipped_long_prompt": 1,
                        "skipped_empty_response": 0, "skipped_identical": 0, "skipped_blank_lines": 3}
    assert ds.locations == [f"{path}:1", f"{path}:5"]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([RECORDS[0], "", '{"instruction": "x" "chosen": 1}'], r":3: malformed JSON \(Expecting ',' delimiter"),
        ([RECORDS[0], "[1, 2]"], r":2: expected a JSON object"),
        ([RECORDS[0], {"instruction": "x", "rejected": "y"}], r":2: missing field 'chosen'"),
        ([{"instruction": "x", "chosen": 5, "rejected": "y"}], r":1: field 'chosen' must be a string, got int"),
        ([{"instruction": "x", "chosen": "a", "rejected": []}], r":1: field 'rejected' must be a string, got an empty"),
        ([{"instruction": None, "chosen": "a", "rejected": "b"}], r":1: field 'instruction' must be .*, got null"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, hf_tok, lines, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError, match=pattern) as err:
        PreferenceDataset(PreferenceDataConfig(path=str(path)), hf_tok)
    assert str(err.value).startswith(f"{path}:")


def test_missing_configured_field_is_named(tmp_path, hf_tok):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:1: missing field 'preferred'")):
        PreferenceDataset(PreferenceDataConfig(path=path, chosen_field="preferred"), hf_tok)


def test_nonexistent_source(tmp_path, hf_tok):
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file") as err:
        read_records(missing)
    assert missing in str(err.value)
    with pytest.raises(DataError):
        PreferenceDataset(PreferenceDataConfig(path=missing), hf_tok)


def test_all_formats_give_the_same_pairs(tmp_path, hf_tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Columns with a consistent type for Arrow: all list responses, as in some released sets.
    records = [
        {"instruction": r["instruction"], "chosen": r["chosen"] if isinstance(r["chosen"], list) else [r["chosen"]],
         "rejected": r["rejected"] if isinstance(r["rejected"], list) else [r["rejected"]]}
        for r in RECORDS
    ]
    jsonl = write_jsonl(tmp_path / "p.jsonl", records)
    gz = str(tmp_path / "p.jsonl.gz")
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    parquet = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(records), parquet)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_list(records).save_to_disk(saved)
    saved_dict = str(tmp_path / "saved_dict")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(saved_dict)

    reference = as_tuples(PreferenceDataset(PreferenceDataConfig(path=jsonl), hf_tok))
    for path, split in ((gz, "train"), (parquet, "train"), (saved, "train"), (saved_dict, "test")):
        ds = PreferenceDataset(PreferenceDataConfig(path=path, split=split), hf_tok)
        assert as_tuples(ds) == reference, path

    assert [loc for loc, _ in read_records(gz)] == [f"{gz}:{i}" for i in range(1, 5)]
    assert [loc for loc, _ in read_records(parquet)] == [f"{parquet}:row {i}" for i in range(4)]
    assert [loc for loc, _ in read_records(saved)][-1] == f"{saved}:row 3"
    with pytest.raises(DataError, match="no split 'train'"):
        read_records(saved_dict, split="train")


def test_tokenises_in_batches(tmp_path, hf_tok, monkeypatch):
    path = write_jsonl(tmp_path / "many.jsonl", RECORDS * 5)  # 20 records
    reference = as_tuples(PreferenceDataset(PreferenceDataConfig(path=path), hf_tok))

    calls = []

    class Counting(HFTokenizer):
        def __init__(self, inner):
            self.__dict__.update(inner.__dict__)

        def encode(self, text):  # a per-record path must not be taken
            raise AssertionError("encode() called per record")

        def encode_batch(self, texts):
            calls.append(len(texts))
            return super().encode_batch(texts)

    monkeypatch.setattr(preference_module, "TOKENIZE_CHUNK", 8)
    ds = PreferenceDataset(PreferenceDataConfig(path=path), Counting(hf_tok))
    assert as_tuples(ds) == reference
    assert len(calls) == math.ceil(20 / 8)


# -------------------------------------------------------------------------------------- collation


def test_collate_pairs_exact():
    pairs = [
        TokenizedPair(prompt_ids=[2, 10, 11], chosen_ids=[20, 21, 3], rejected_ids=[30, 3], truncated=False),
        TokenizedPair(prompt_ids=[2, 12], chosen_ids=[22, 23, 24, 25, 26, 3], rejected_ids=[31], truncated=True),
    ]
    pad = 0
    for multiple in (1, 8):
        batch = collate_pairs(pairs, pad_id=pad, pad_to_multiple=multiple, indices=[7, 4])
        rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
        longest = max(len(r) for r in rows)  # 8
        S = longest if multiple == 1 else 8 * math.ceil(longest / 8)
        tokens, resp, labels, lmask = [], [], [], []
        for r, pl in zip(rows, prompt_lens):
            t = r + [pad] * (S - len(r))
            m = [1.0 if pl <= p < len(r) else 0.0 for p in range(S)]
            tokens.append(t)
            resp.append(m)
            labels.append([t[p + 1] if p + 1 < S else pad for p in range(S)])
            lmask.append([m[p + 1] if p + 1 < S else 0.0 for p in range(S)])
        assert batch["tokens"].dtype == torch.long and batch["tokens"].tolist() == tokens
        assert batch["response_mask"].dtype == torch.float32 and batch["response_mask"].tolist() == resp
        assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == labels
        assert batch["label_mask"].dtype == torch.float32 and batch["label_mask"].tolist() == lmask
        assert batch["position_ids"].tolist() == [list(range(S))] * 4
        assert batch["index"].tolist() == [7, 4]
        assert batch["tokens"].shape == (4, S)
    assert collate_pairs(pairs, pad_id=pad)["index"].tolist() == [0, 1]
    assert collate_pairs(pairs, pad_id=pad, pad_to_multiple=3)["tokens"].shape == (4, 9)


def test_collate_dataset_batch_masks_cover_responses(tmp_path, hf_tok):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    ds = PreferenceDataset(PreferenceDataConfig(path=path), hf_tok)
    batch = collate_pairs([ds[0], ds[1]], pad_id=hf_tok.pad_id)
    assert batch["response_mask"][0].sum().item() == len(ds[0].chosen_ids)
    assert batch["response_mask"][2].sum().item() == len(ds[0].rejected_ids)
    # The masked tokens are exactly the response ids.
    sel = batch["tokens"][3][batch["response_mask"][3].bool()].tolist()
    assert sel == ds[1].rejected_ids


def test_pad_multiple_for():
    assert pad_multiple_for(1, False) == 8
    assert pad_multiple_for(4, False) == 8
    assert pad_multiple_for(4, True) == 8
    assert pad_multiple_for(3, True) == 24
    assert pad_multiple_for(16, True) == 16
    assert pad_multiple_for(6, True, base=4) == 12
    with pytest.raises(ValueError):
        pad_multiple_for(0, True)


# ---------------------------------------------------------------------------- real data (optional)


def test_gsm8k_test_pairs(hf_tok):
    root = Path(__file__).resolve().parent.parent
    shared = Path(os.environ.get("QRM_SHARED_DATA", "../shared/data"))
    path = (shared if shared.is_absolute() else root / shared) / "gsm8k" / "test_pairwise.jsonl"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (set QRM_SHARED_DATA to the shared data folder)")
    ds = PreferenceDataset(PreferenceDataConfig(path=str(path), chat_template=True, seq_length=1024), hf_tok)
    assert len(ds) == 787
    assert ds.stats["records"] == 787 and ds.stats["skipped_long_prompt"] == 0
    for pair in ds:
        assert pair.prompt_ids[0] == BOS and pair.prompt_ids.count(BOS) == 1
        for resp in (pair.chosen_ids, pair.rejected_ids):
            assert 0 < len(resp) and len(pair.prompt_ids) + len(resp) <= 1024
        if not pair.truncated:
            assert pair.chosen_ids[-1] == EOS and pair.rejected_ids[-1] == EOS
