"""The task registry (evaluation/tasks.py): built-in tasks, entry-point plugins, user registrations."""

import subprocess
import sys

import pytest

from megatron_qrm.evaluation import tasks


def test_builtin_tasks_judge_with_their_checkers():
    judges = tasks.task_judges("gsm8k")
    assert list(judges) == ["reference", "strict"]  # the first is the primary checker
    correct, parsable = next(iter(judges.values()))("so the answer is 42", "42")
    assert parsable and correct
    correct, _ = next(iter(judges.values()))("so the answer is 41", "42")
    assert not correct


def test_demo_task_comes_from_the_entry_point_without_importing_the_demo():
    # a fresh interpreter: nothing has imported megatron_qrm.demo; the registry must find `arith` itself
    code = ("import sys; from megatron_qrm.evaluation.tasks import task_judges; "
            "assert 'megatron_qrm.demo.task' not in sys.modules; "
            "print(task_judges('arith')['exact']('Answer: 17', '17'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(True, True)"


def test_registered_task_and_unknown_task_error():
    tasks.register_task("echo-test", {"exact": lambda r, label: (r.strip() == label, True)})
    assert tasks.task_judges("echo-test")["exact"](" x ", "x") == (True, True)
    with pytest.raises(ValueError, match=r"unknown --task 'no-such-task'; known: .*echo-test"):
        tasks.task_judges("no-such-task")
    with pytest.raises(ValueError, match="at least one judge"):
        tasks.register_task("empty", {})
