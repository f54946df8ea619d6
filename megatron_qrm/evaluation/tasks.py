"""The task registry: a task is a set of judges ``(response, label) -> (correct, parsable)``, keyed by checker.

Evaluation owns the registry; tasks come from two places, and evaluation imports neither by name:

* GSM8K and MATH, registered here from :mod:`megatron_qrm.evaluation.answers` (the reference extraction
  rule and a strict checker);
* any installed package's entry point in the group ``megatron_qrm.tasks`` (a callable that calls
  :func:`register_task`), loaded the first time an unknown task is asked for. The demo's ``arith`` task is
  one (see ``pyproject.toml``); another project can add its own the same way, or call
  :func:`register_task` directly.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable

from megatron_qrm.errors import UserError
from megatron_qrm.evaluation import answers

Judge = Callable[[str, str], tuple[bool, bool]]
ENTRY_POINT_GROUP = "megatron_qrm.tasks"
_TASKS: dict[str, dict[str, Judge]] = {}
_plugins_loaded = False


def register_task(name: str, judges: dict[str, Judge]) -> None:
    """Register a task's judges, keyed by checker name (the first one is the primary checker)."""
    if not judges:
        raise ValueError(f"task {name!r}: at least one judge is needed")
    _TASKS[name] = dict(judges)


def _answers_judge(task: str, checker: str) -> Judge:
    def judge(response: str, label: str) -> tuple[bool, bool]:
        j = answers.judge(response, label, task, checker)
        return j.correct, j.parsable

    return judge


for _task in answers.TASKS:
    register_task(_task, {c: _answers_judge(_task, c) for c in answers.CHECKERS})


def _load_plugins() -> None:
    """Call every ``megatron_qrm.tasks`` entry point once (each registers its task)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()()


def known_tasks() -> list[str]:
    _load_plugins()
    return sorted(_TASKS)


def task_judges(task: str) -> dict[str, Judge]:
    """The judges of ``task``; ``ValueError`` naming ``--task`` and the known tasks when there is none."""
    if task not in _TASKS:
        _load_plugins()
    if task not in _TASKS:
        raise UserError(f"unknown --task {task!r}; known: {', '.join(known_tasks())}")
    return _TASKS[task]
