"""Every ``qrm`` flag reaches the run, and ``--help`` shows the defaults the parser really uses.

For each subcommand the command line is parsed with its required flags only, then the subcommand's own
function runs on a namespace that records which flags it reads; the heavy work it would start (training,
evaluation, serving) is replaced by a stub that captures the config and stops. A flag that is parsed but
never read -- what ``train-ppo --log-interval`` was -- fails the test. For the RL commands, whose flags are
generated from :class:`~megatron_qrm.rl.config.RLConfig`, every config field must also be read somewhere in
the package outside the config and CLI modules (a field no code reads is a flag that does nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from megatron_qrm.cli import build_parser

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_qrm"


class _Captured(Exception):
    pass


class RecordingNamespace(argparse.Namespace):
    """A namespace that remembers which attributes were read."""

    def __init__(self, **kw):
        super().__init__(**kw)
        object.__setattr__(self, "_read", set())

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)


#: subcommand -> (module, function the command hands its config to: replaced by a stub), or None to run it
SINKS = {
    "train-rm": ("megatron_qrm.training.reward_trainer", "train_reward_model"),
    "train-sft": ("megatron_qrm.training.sft_trainer", "train_sft"),
    "eval-rm": ("megatron_qrm.evaluation.rm_eval", "evaluate_reward_model"),
    "eval-policy": ("megatron_qrm.evaluation.policy_eval", "evaluate_policy"),
    "train-ppo": ("megatron_qrm.rl.trainer", "train_rl"),
    "train-reinforce": ("megatron_qrm.rl.trainer", "train_rl"),
    "check-answers": ("megatron_qrm.evaluation.check_answers", "check_answers"),
    "plan": None,  # light (no torch): runs for real
    "demo": ("megatron_qrm.demo.pipeline", "run_demo"),
    "serve": ("megatron_qrm.serving.server", "serve"),
}
#: flags read by argparse itself or only on another branch of the same command (checked by its own runs)
NOT_READ_BY_DESIGN = {"help", "command", "func"}
#: extra command lines per subcommand, so that flags read only on another branch are read once
EXTRA_RUNS = {"demo": [["--study", "--seeds", "2"]], "plan": [["--role", "ppo", "--json"]]}
#: required flags whose placeholder would not be valid
REQUIRED_VALUES = {"plan": {"--model": "llama3-8b"}}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _required_argv(sub: argparse.ArgumentParser, tmp_path: Path) -> list[str]:
    """The subcommand's required flags with placeholder values of the right type."""
    argv = []
    given = REQUIRED_VALUES.get(sub.prog.split()[-1], {})
    for a in sub._actions:
        if a.required and a.option_strings:
            if a.option_strings[0] in given:
                value = given[a.option_strings[0]]
            elif a.choices:
                value = str(next(iter(a.choices)))
            elif a.type in (int, float):
                value = "2"
            else:
                value = str(tmp_path / a.dest)
            argv += [a.option_strings[0], value]
    return argv


def _dests(sub: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in sub._actions if a.dest not in NOT_READ_BY_DESIGN and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)}


def _run(name: str, argv: list[str], monkeypatch) -> set[str]:
    import importlib

    def sink(*a, **k):
        raise _Captured()

    if SINKS[name] is not None:
        module, func = SINKS[name]
        monkeypatch.setattr(importlib.import_module(module), func, sink)
    parser = build_parser()
    ns = parser.parse_args([name, *argv], namespace=RecordingNamespace())
    try:
        ns.func(ns)
    except _Captured:
        pass
    except SystemExit:
        pass
    return object.__getattribute__(ns, "_read")


@pytest.mark.parametrize("name", sorted(SINKS))
def test_every_flag_is_read_by_the_command(name, monkeypatch, tmp_path):
    sub = _subparsers(build_parser())[name]
    base = _required_argv(sub, tmp_path)
    read = _run(name, base, monkeypatch)
    for extra in EXTRA_RUNS.get(name, []):
        read |= _run(name, base + extra, monkeypatch)
    unread = sorted(_dests(sub) - read)
    assert not unread, f"qrm {name}: flags parsed but never read: {unread}"


def test_make_pairs_reads_every_flag(monkeypatch, tmp_path):
    """make-pairs hands its namespace to the pair builder itself: run it for real on a two-line file."""
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"instruction": "Compute: 1 + 2", "label": "3",
                                     "responses": ["1 + 2 = 3\nAnswer: 3", "1 + 2 = 4\nAnswer: 4"]}) + "\n")
    sub = _subparsers(build_parser())["make-pairs"]
    ns = build_parser().parse_args(["make-pairs", "--responses", str(responses), "--task", "arith",
                                    "--output", str(tmp_path / "pairs.jsonl")], namespace=RecordingNamespace())
    assert ns.func(ns) == 0
    unread = sorted(_dests(sub) - object.__getattribute__(ns, "_read"))
    assert not unread, f"qrm make-pairs: flags parsed but never read: {unread}"


@pytest.mark.parametrize("name", sorted([*SINKS, "make-pairs"]))
def test_help_defaults_equal_parsed_defaults(name, tmp_path):
    """What ``--help`` prints as each flag's default is the value the parser gives when the flag is absent,
    and flags sharing a destination (``--x`` / ``--no-x``) agree on it. (A default described in words --
    "default: the checkpoint's" -- is one resolved later: the parser's value is then None.)"""
    parser = build_parser()
    sub = _subparsers(parser)[name]
    ns = parser.parse_args([name, *_required_argv(sub, tmp_path)])
    shown = re.compile(r"\(default: (.*)\)$")
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help in (None, argparse.SUPPRESS) or action.required:
            continue
        m = shown.search(action.help % {"default": action.default} if "%(default)" in action.help else action.help)
        parsed = getattr(ns, action.dest)
        if isinstance(parsed, tuple):  # comma-separated lists are shown as they are typed
            parsed = ",".join(str(x) for x in parsed)
        if m and parsed is not None:
            assert m.group(1) == str(parsed), (f"qrm {name} {action.option_strings[0]}: --help says default "
                                               f"{m.group(1)!r}, the parser gives {parsed!r}")
        if m and parsed is None:
            assert not re.fullmatch(r"True|False|-?[0-9.e+-]+", m.group(1)), (
                f"qrm {name} {action.option_strings[0]}: --help says default {m.group(1)!r}, the parser gives None")
        for twin in (a for a in sub._actions if a.dest == action.dest and a is not action):
            assert twin.default == action.default or twin.default is argparse.SUPPRESS, (
                f"qrm {name}: {action.option_strings} and {twin.option_strings} default differently")


def test_rl_config_fields_are_read_by_the_package():
    """Each RLConfig field is read somewhere outside the config / CLI modules (else its flag does nothing)."""
    from megatron_qrm.rl.config import RLConfig

    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py")
                        if p.name not in ("config.py", "cli.py") or p.parent.name not in ("rl",))
    unused = [f.name for f in dataclasses.fields(RLConfig) if not re.search(rf"\.{f.name}\b", sources)]
    assert not unused, f"RLConfig fields no code reads: {unused}"


def test_deprecated_spelling_still_works():
    """One name for one concept: the DPO-RM's reference is --reference-checkpoint in every command; RL's old
    --dpo-reference is kept as a hidden alias."""
    parser = build_parser()
    for spelling in ("--reference-checkpoint", "--dpo-reference"):
        ns = parser.parse_args(["train-ppo", "--reward-model", "rm", "--prompt-data", "p", "--train-iters", "1",
                                spelling, "ref"])
        assert ns.dpo_reference == "ref"
    assert "--dpo-reference" not in _subparsers(parser)["train-ppo"].format_help()
