"""What a new user meets first (issue 12): the chat-template default, `-tp`/`-pp` everywhere, each default
shown once in `--help`, folders written with normal permissions, the empty-response warning, and no
third-party warning noise. Fast: no model is built except in the warning-noise test (one tiny run)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers_tokenizers import make_hf_tokenizer_dir  # noqa: E402


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def commands():
    from megatron_qrm.cli import build_parser

    return _subparsers(build_parser())


def test_help_shows_every_default_once(commands):
    from megatron_qrm.conversion.cli import build_parser as convert_parser

    helps = {name: p.format_help() for name, p in commands.items()}
    helps.update({f"convert_hf.py {n}": p.format_help() for n, p in _subparsers(convert_parser()).items()})
    for name, text in helps.items():
        # options' help is wrapped: join continuation lines to the option they belong to
        entries = re.split(r"\n  (?=-)", text)
        for entry in entries:
            assert entry.count("(default") <= 1, (name, entry)
            assert "default: None" not in entry, (name, entry)
    # options without a help string still show their default (issue: --max-new-tokens showed nothing)
    policy = " ".join(helps["eval-policy"].split())
    assert "--max-new-tokens MAX_NEW_TOKENS (default: 512)" in policy
    assert "--seq-length SEQ_LENGTH prompt + response tokens (default: the checkpoint's, else 1024)" in policy
    assert " ".join(helps["train-rm"].split()).count("--qrm-beta QRM_BETA (default: 0.2)") == 1


def test_tp_pp_aliases_everywhere(commands):
    checked = 0
    for name, p in commands.items():
        opts = {s for a in p._actions for s in a.option_strings}
        if "--pipeline-model-parallel-size" not in opts:
            continue
        assert {"-tp", "-pp"} <= opts, name
        checked += 1
    assert checked >= 6  # train-rm, train-sft, eval-rm, train-ppo, train-reinforce, eval-policy, ...
    from megatron_qrm.cli import build_parser

    args = build_parser().parse_args(["eval-rm", "--load", "x", "--data", "y", "-tp", "3", "-pp", "2"])
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (3, 2)


@pytest.mark.parametrize("command", ["train-rm", "train-sft", "eval-rm", "eval-policy", "train-ppo",
                                     "train-reinforce"])
def test_chat_template_flag_is_tristate(commands, command):
    p = commands[command]
    req = {"train-rm": ["--train-data", "d", "--train-iters", "1"], "train-sft": ["--train-data", "d", "--train-iters", "1"],
           "eval-rm": ["--load", "x", "--data", "d"], "eval-policy": ["--load", "x", "--task", "gsm8k", "--data", "d"],
           "train-ppo": ["--reward-model", "r", "--prompt-data", "d", "--train-iters", "1"],
           "train-reinforce": ["--reward-model", "r", "--prompt-data", "d", "--train-iters", "1"]}[command]
    assert p.parse_args(req).chat_template is None
    assert p.parse_args(req + ["--chat-template"]).chat_template is True
    assert p.parse_args(req + ["--no-chat-template"]).chat_template is False


class _Tok:
    def __init__(self, has: bool):
        self._has, self.name_or_path = has, "tok"

    def has_chat_template(self) -> bool:
        return self._has


@pytest.mark.parametrize("requested,has,saved,expected", [
    (None, True, None, True),  # an instruct tokenizer: on by default
    (None, False, None, False),
    (False, True, None, False),  # --no-chat-template
    (True, True, {"chat_template": False}, True),  # the flag beats the record
    (None, True, {"chat_template": False}, False),  # a checkpoint trained without it keeps it off
    (None, True, {"chat_template": True}, True),
    (None, False, {"chat_template": True}, False),  # recorded on, but this tokenizer has none
    (None, True, {"kind": "old checkpoint"}, True),  # nothing recorded: the tokenizer decides
])
def test_resolve_chat_template(requested, has, saved, expected, caplog):
    from megatron_qrm.data import chat

    chat._announced.clear()
    with caplog.at_level(logging.INFO, logger="megatron_qrm"):
        assert chat.resolve_chat_template(requested, _Tok(has), saved) is expected
        chat.resolve_chat_template(requested, _Tok(has), saved)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chat template:")]
    assert len(lines) == 1 and lines[0].startswith(f"chat template: {'on' if expected else 'off'}")  # said once


def test_chat_template_requested_without_one_is_an_error():
    from megatron_qrm.data.chat import resolve_chat_template

    with pytest.raises(ValueError, match="--chat-template"):
        resolve_chat_template(True, _Tok(False))


def test_import_records_whether_the_tokenizer_has_a_template(tmp_path):
    from megatron_qrm.conversion.common import has_chat_template
    from megatron_qrm.data import load_tokenizer

    with_t = make_hf_tokenizer_dir(tmp_path / "a", with_chat_template=True)
    without = make_hf_tokenizer_dir(tmp_path / "b", with_chat_template=False)
    # the file-level check agrees with the loaded tokenizer's
    assert has_chat_template(with_t) is True and load_tokenizer(with_t).has_chat_template()
    assert has_chat_template(without) is False and not load_tokenizer(without).has_chat_template()
    assert has_chat_template(str(tmp_path / "missing")) is False


def test_staged_output_gets_normal_permissions(tmp_path):
    from megatron_qrm.conversion.common import current_umask, staged_output

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        with staged_output(str(out)) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            path = os.path.join(tmp, "sub", "weights.bin")
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors writes
            os.close(fd)
        assert current_umask() == 0o022
        assert oct(out.stat().st_mode & 0o777) == oct(0o755)
        assert oct((out / "sub").stat().st_mode & 0o777) == oct(0o755)
        assert oct((out / "sub" / "weights.bin").stat().st_mode & 0o777) == oct(0o644)
        os.umask(0o027)  # a stricter umask is respected
        with staged_output(str(tmp_path / "strict")) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
        assert oct((tmp_path / "strict").stat().st_mode & 0o777) == oct(0o750)
        assert oct((tmp_path / "strict" / "f").stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


@pytest.mark.parametrize("empty,total,warned", [(3, 5, True), (2, 4, False), (0, 3, False)])
def test_mostly_empty_responses_warn(caplog, empty, total, warned):
    from megatron_qrm.evaluation.policy_eval import warn_if_mostly_empty

    responses = [" "] * empty + ["The answer is 4."] * (total - empty)
    with caplog.at_level(logging.WARNING, logger="megatron_qrm"):
        warn_if_mostly_empty(responses, chat_template=False)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(msgs) is warned
    if warned:
        assert f"{empty} of {total} responses are empty" in msgs[0] and "--chat-template" in msgs[0]


def test_a_plain_command_prints_no_third_party_noise(qrm_data, tiny_flags, tmp_path):
    """A tiny `qrm train-rm` with Python's default warning filters (as a user's shell has): none of the
    known third-party warnings, the layer spec and the CPU memory note once each, the project's own
    messages kept."""
    from launch import qrm

    from megatron_qrm.arguments import KNOWN_THIRD_PARTY_WARNINGS

    proc = qrm(["train-rm", "--train-data", qrm_data.pairs, "--tokenizer", qrm_data.tokenizer, *tiny_flags,
                "--train-iters", "2", "--global-batch-size", "2", "--save", str(tmp_path / "rm"), "--no-tensorboard"],
               env={"PYTHONWARNINGS": ""})
    err = proc.stderr
    for needle in ("Apex is not installed", "Transformer Engine and Apex", "full scope is deprecated",
                   "`load_state_dict` is deprecated", "deprecating ShardedTensor", "not a leaf Tensor",
                   "`torch.distributed.reduce_scatter_tensor` is deprecated"):
        assert needle not in err, needle
    assert len(KNOWN_THIRD_PARTY_WARNINGS) == 6
    assert err.count("layer spec:") == 1, err
    assert err.count("memory check: skipped on CPU") == 1, err
    assert "chat template: off (the tokenizer has none)" in err  # the project's own start-up note
    assert "Warning:" not in err, [line for line in err.splitlines() if "Warning:" in line]
