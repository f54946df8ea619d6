"""User errors of ``qrm train-rm`` / ``qrm eval-rm``: a non-zero exit status and one clear line on stderr
that names the offending ``FILE:LINE`` or flag, never a Python traceback.

Every case is a real process (the exit status and stderr are the subject). They are started together,
two at a time, by one module fixture; each test then checks its own case.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from launch import qrm

TRAIN_1_STEP = ["--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "2", "--no-tensorboard"]


def _cases(qrm_data, tiny_flags, d) -> dict[str, dict]:
    """name -> {argv, nproc, ok, expect: substrings of the error line (or of the output when ok)}."""
    rows = qrm_data.rows
    J = json.dumps

    def write(name: str, lines: list[str]) -> str:
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    malformed = write("malformed.jsonl", [J(rows[0]), '{"instruction": "x", "chosen": ', J(rows[1])])
    no_rejected = {k: v for k, v in rows[2].items() if k != "rejected"}
    missing = write("missing.jsonl", [J(rows[0]), J(rows[1]), J(no_rejected)])
    nonstring = write("nonstring.jsonl", [J(rows[0]), J(dict(rows[1], chosen=5))])
    long_instruction = "Keep the even numbers: " + " ".join(str(i % 39 + 1) for i in range(80))  # > 64 tokens
    long = write("long.jsonl", [J(rows[0]), J(dict(rows[1], instruction=long_instruction)), *map(J, rows[2:8])])
    empty_dir = os.path.join(d, "no_checkpoint")
    os.makedirs(empty_dir)
    with open(os.path.join(empty_dir, "notes.txt"), "w") as f:
        f.write("not a checkpoint")
    missing_dir = os.path.join(d, "does_not_exist")

    train = ["train-rm", "--tokenizer", qrm_data.tokenizer, *TRAIN_1_STEP]
    tiny = list(tiny_flags)
    pairs = qrm_data.pairs
    return {
        "malformed_json": dict(argv=[*train, *tiny, "--train-data", malformed],
                               expect=[f"{malformed}:2", "malformed JSON"]),
        "missing_field": dict(argv=[*train, *tiny, "--train-data", missing],
                              expect=[f"{missing}:3", "missing field 'rejected'"]),
        "non_string_response": dict(argv=[*train, *tiny, "--train-data", nonstring],
                                    expect=[f"{nonstring}:2", "'chosen'", "must be a string"]),
        "prompt_too_long": dict(argv=[*train, *tiny, "--train-data", long],
                                expect=[f"{long}:2", "--seq-length 64", "--skip-long-prompts"]),
        "prompt_too_long_skipped": dict(argv=[*train, *tiny, "--train-data", long, "--skip-long-prompts"],
                                        ok=True, expect=["'skipped_long_prompt': 1", "'pairs': 7"]),
        "unknown_reward_loss": dict(argv=[*train, *tiny, "--train-data", pairs, "--reward-loss", "prm"],
                                    expect=["--reward-loss", "invalid choice: 'prm'"]),
        "tp_does_not_divide_heads": dict(
            argv=[*train, "--train-data", pairs, "--num-layers", "2", "--hidden-size", "48", "--num-attention-heads",
                  "3", "--num-query-groups", "3", "--ffn-hidden-size", "128", "--seq-length", "64",
                  "--tensor-model-parallel-size", "2"],
            nproc=2, expect=["--tensor-model-parallel-size 2", "attention heads (3)"]),
        "train_data_missing": dict(argv=[*train, *tiny, "--train-data", os.path.join(d, "nope.jsonl")],
                                   expect=[os.path.join(d, "nope.jsonl"), "no such file"]),
        "tokenizer_missing": dict(argv=["train-rm", "--tokenizer", os.path.join(d, "nope.model"), *TRAIN_1_STEP,
                                        *tiny, "--train-data", pairs],
                                  expect=["--tokenizer", os.path.join(d, "nope.model")]),
        "load_nonexistent": dict(argv=[*train, *tiny, "--train-data", pairs, "--load", missing_dir],
                                 expect=[f"--load {missing_dir}", "no complete checkpoint"]),
        "load_nonexistent_without_model_flags": dict(argv=[*train, "--train-data", pairs, "--load", missing_dir],
                                                     expect=[f"--load {missing_dir}", "no complete checkpoint"]),
        "pretrained_checkpoint_nonexistent": dict(
            argv=[*train, *tiny, "--train-data", pairs, "--pretrained-checkpoint", missing_dir],
            expect=[f"--pretrained-checkpoint {missing_dir}", "no complete checkpoint"]),
        "eval_load_without_checkpoint": dict(argv=["eval-rm", "--load", empty_dir, "--data", pairs],
                                             expect=[empty_dir, "--load", "no complete checkpoint"]),
    }


@pytest.fixture(scope="module")
def outcomes(qrm_data, tiny_flags, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli_errors"))
    cases = _cases(qrm_data, tiny_flags, d)
    assert sorted(cases) == sorted(CASE_NAMES)

    def run(case: dict):
        return qrm([str(a) for a in case["argv"]], nproc=case.get("nproc", 1), check=False, timeout=300, cwd=d)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(run, cases.values())))
    return {name: (cases[name], procs[name]) for name in cases}


CASE_NAMES = ["malformed_json", "missing_field", "non_string_response", "prompt_too_long", "prompt_too_long_skipped",
              "unknown_reward_loss", "tp_does_not_divide_heads", "train_data_missing", "tokenizer_missing",
              "load_nonexistent", "load_nonexistent_without_model_flags", "pretrained_checkpoint_nonexistent",
              "eval_load_without_checkpoint"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.dist) if n == "tp_does_not_divide_heads" else n
                                  for n in CASE_NAMES])
def test_user_error(outcomes, name):
    case, proc = outcomes[name]
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    if case.get("ok"):
        assert proc.returncode == 0, report
        assert all(s in proc.stdout + proc.stderr for s in case["expect"]), report
        return
    assert proc.returncode != 0, report
    command = case["argv"][0]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"qrm {command}: error: ")]
    assert lines, f"no 'qrm {command}: error: ...' line on stderr\n{report}"
    # one line (torchrun: a layout error, which every rank raises alike, is printed by rank 0 only)
    assert len(lines) == 1, report
    missing = [s for s in case["expect"] if s not in lines[0]]
    assert not missing, f"error line lacks {missing}: {lines[0]}"
    assert "qrm " + command not in proc.stdout  # the message goes to stderr
    # no traceback from our code (torchrun reports failed workers with a traceback of its own launcher)
    assert not re.search(r'File "[^"]*megatron_qrm', proc.stderr), report
    if case.get("nproc", 1) == 1:
        assert "Traceback" not in proc.stderr, report

