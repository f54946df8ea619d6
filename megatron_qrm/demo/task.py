"""The demo's synthetic reasoning task: chained arithmetic with a known first error.

A prompt lists a start number and a few operations; the answer is written one step per line, each
step applying the next operation to the previous result, then ``Answer: N``::

    prompt:    Compute: 7 + 5 - 3 + 8
    response:  7 + 5 = 12
               12 - 3 = 9
               9 + 8 = 17
               Answer: 17

:func:`check` knows the correct chain and returns, for any response, whether its final answer is right
and the index of its **first wrong step** (a step is a line; the ``Answer:`` line is the last step).
A step is wrong when it differs from the correct step at that position (wrong left operand, operator,
right operand or result, or a malformed line); once a step is wrong the chain is doomed, whatever the
later steps do. A response with all steps right but a wrong (or missing) answer line fails at the
answer line.

Generators: SFT demonstrations (a controlled share ``flaw_rate`` of them flawed: at one step a sign slip,
``12 + 3 = 9``, or with ``flaw_kind="offby"`` a result off by 1-3; the chain continues from the wrong value,
so later steps look locally right and only the final answer is wrong: exactly the error an outcome
reward cannot place), RL prompts and a test set, all with the gold answer as ``label``.

The judge for :func:`megatron_qrm.evaluation.tasks.register_task` is :func:`judge`
(``--task arith``): registered when this module is imported.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional

TASK_NAME = "arith"
PROMPT_PREFIX = "Compute:"
ANSWER_PREFIX = "Answer:"
_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER_RE = re.compile(r"^\s*Answer:\s*(-?\d+)\s*$")
_ANSWER_ANYWHERE_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass
class TaskConfig:
    """Difficulty of the task: chain length, operand and value ranges."""

    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9  # right operands are 1..max_operand
    max_value: int = 30  # every intermediate result stays in 0..max_value
    flaw_rate: float = 0.3  # share of flawed SFT demonstrations
    flaw_kind: str = "sign"  # "sign": a step applies the opposite operation; "offby": its result is off by 1..max_flaw
    max_flaw: int = 3


@dataclass
class Problem:
    start: int
    ops: list[str]  # "+" / "-"
    operands: list[int]

    @property
    def prompt(self) -> str:
        parts = [str(self.start)]
        for op, b in zip(self.ops, self.operands):
            parts += [op, str(b)]
        return f"{PROMPT_PREFIX} " + " ".join(parts)

    def values(self) -> list[int]:
        """Running values after each step (the last is the answer)."""
        out, v = [], self.start
        for op, b in zip(self.ops, self.operands):
            v = v + b if op == "+" else v - b
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def steps(self) -> list[tuple[int, str, int, int]]:
        out, a = [], self.start
        for op, b, c in zip(self.ops, self.operands, self.values()):
            out.append((a, op, b, c))
            a = c
        return out


def format_step(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def format_response(steps: list[tuple[int, str, int, int]], answer: int) -> str:
    return "\n".join([format_step(*s) for s in steps] + [f"{ANSWER_PREFIX} {answer}"])


def correct_response(p: Problem) -> str:
    return format_response(p.steps(), p.answer)


def _chain(p: Problem, k: int, wrong: int) -> list[tuple[int, str, int, int]]:
    """The steps of ``p`` with step ``k``'s result replaced by ``wrong``, later steps computed from it."""
    steps, a = [], p.start
    for i, (op, b) in enumerate(zip(p.ops, p.operands)):
        c = wrong if i == k else (a + b if op == "+" else a - b)
        steps.append((a, op, b, c))
        a = c
    return steps


def flawed_response(p: Problem, rng: random.Random, cfg: TaskConfig) -> tuple[str, int]:
    """A response whose step ``k`` has a wrong result; the chain goes on from it (so the later steps are
    locally right and only the final answer shows that something went wrong). Returns (text, k).

    ``flaw_kind="sign"``: a sign slip, the step applies the opposite operation (``12 + 3 = 9``); ``"offby"``:
    its result is off by 1..max_flaw. Only flaws whose whole chain stays in ``0..max_value`` are drawn (so that
    no out-of-range number gives a wrong chain away), with an off-by flaw when no sign slip fits."""
    true = p.values()
    starts = [p.start] + true[:-1]

    def candidates(kind: str) -> list[tuple[int, int]]:
        out = []
        for i, (a, op, b, c) in enumerate(zip(starts, p.ops, p.operands, true)):
            wrongs = [a - b if op == "+" else a + b] if kind == "sign" else \
                [c + d for d in range(-cfg.max_flaw, cfg.max_flaw + 1) if d]
            for w in wrongs:
                if all(0 <= s[3] <= cfg.max_value for s in _chain(p, i, w)):
                    out.append((i, w))
        return out

    options = candidates("sign") if cfg.flaw_kind == "sign" else []
    options = options or candidates("offby")
    if options:
        k, w = rng.choice(options)
    else:  # nothing fits the range (not reached with the default sizes): any off-by-one
        k = rng.randrange(len(p.ops))
        w = true[k] + rng.choice((-1, 1))
    steps = _chain(p, k, w)
    return format_response(steps, steps[-1][3]), k


def parse_prompt(prompt: str) -> Problem:
    text = prompt.strip()
    if not text.startswith(PROMPT_PREFIX):
        raise ValueError(f"not an arith prompt: {prompt!r}")
    toks = text[len(PROMPT_PREFIX):].split()
    if len(toks) < 3 or len(toks) % 2 == 0:
        raise ValueError(f"not an arith prompt: {prompt!r}")
    return Problem(int(toks[0]), toks[1::2], [int(t) for t in toks[2::2]])


def random_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    n = rng.randint(cfg.min_steps, cfg.max_steps)
    start = rng.randint(1, cfg.max_value)
    ops, operands, v = [], [], start
    for _ in range(n):
        b = rng.randint(1, cfg.max_operand)
        allowed = [op for op in "+-" if 0 <= (v + b if op == "+" else v - b) <= cfg.max_value]
        op = rng.choice(allowed)  # one of the two always fits when max_value >= 2 * max_operand
        v = v + b if op == "+" else v - b
        ops.append(op)
        operands.append(b)
    return Problem(start, ops, operands)


# ----------------------------------------------------------------------------- checking
@dataclass
class Check:
    correct: bool  # final answer right
    first_error: Optional[int]  # index of the first wrong step (len(ops) = the answer line); None if none
    n_steps: int  # steps of the correct solution, the answer line included (len(ops) + 1)
    predicted: Optional[int] = None  # the answer the response gives (None: no answer line)
    lines: list[str] = field(default_factory=list)


def split_steps(response: str) -> list[str]:
    """The response's steps: its non-empty lines."""
    return [ln for ln in response.split("\n") if ln.strip()]


def check(prompt: str, response: str) -> Check:
    """Judge ``response`` to ``prompt``: final answer right, and the index of the first wrong step.

    Step ``i < len(ops)`` must be ``a op b = c`` exactly as in the correct chain; step ``len(ops)`` must be
    ``Answer: <correct>``. A missing line counts as wrong at its index; extra lines after a complete,
    correct solution are ignored for the first error, but the answer is read from the last ``Answer:``.
    """
    p = parse_prompt(prompt)
    lines = split_steps(response)
    m = list(_ANSWER_ANYWHERE_RE.finditer(response))
    predicted = int(m[-1].group(1)) if m else None
    correct = predicted is not None and predicted == p.answer
    first = None
    for i, (a, op, b, c) in enumerate(p.steps()):
        if i >= len(lines):
            first = i
            break
        mm = _STEP_RE.match(lines[i])
        if not mm or (int(mm.group(1)), mm.group(2), int(mm.group(3)), int(mm.group(4))) != (a, op, b, c):
            first = i
            break
    if first is None:
        k = len(p.ops)
        mm = _ANSWER_RE.match(lines[k]) if k < len(lines) else None
        if mm is None or int(mm.group(1)) != p.answer:
            first = k
    return Check(correct, first, len(p.ops) + 1, predicted, lines)


def judge(response: str, label: str) -> tuple[bool, bool]:
    """``(correct, parsable)`` of a response against the gold answer (the policy_eval judge)."""
    m = list(_ANSWER_ANYWHERE_RE.finditer(response or ""))
    if not m:
        return False, False
    try:
        return int(m[-1].group(1)) == int(str(label).strip()), True
    except ValueError:
        return False, True


# ----------------------------------------------------------------------------- data sets
def sft_examples(n: int, seed: int, cfg: TaskConfig) -> list[dict]:
    """``n`` demonstrations ``{instruction, response, label, flawed, first_error}``; a share
    ``cfg.flaw_rate`` of them flawed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = random_problem(rng, cfg)
        if rng.random() < cfg.flaw_rate:
            text, k = flawed_response(p, rng, cfg)
            rows.append({"instruction": p.prompt, "response": text, "label": str(p.answer), "flawed": True,
                         "first_error": k})
        else:
            rows.append({"instruction": p.prompt, "response": correct_response(p), "label": str(p.answer),
                         "flawed": False, "first_error": None})
    return rows


def prompts(n: int, seed: int, cfg: TaskConfig, exclude: Optional[set[str]] = None) -> list[dict]:
    """``n`` distinct prompts ``{instruction, label}`` (not in ``exclude``)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    tries = 0
    while len(rows) < n:
        p = random_problem(rng, cfg)
        tries += 1
        if p.prompt in seen and tries < 100 * n:
            continue
        seen.add(p.prompt)
        rows.append({"instruction": p.prompt, "label": str(p.answer)})
    return rows


def tokenizer_corpus(cfg: TaskConfig, seed: int, n: int = 2000) -> list[str]:
    """Texts to train the tokenizer on: prompts and (correct and flawed) responses, and every number."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        p = random_problem(rng, cfg)
        texts.append(p.prompt)
        texts.append(correct_response(p))
        texts.append(flawed_response(p, rng, cfg)[0])
    reach = max(cfg.max_flaw, 2 * cfg.max_operand) * 2  # a flawed chain can leave 0..max_value
    lo, hi = -reach, cfg.max_value + reach
    texts += [" ".join(str(v) for v in range(lo, hi + 1))] * 20
    return texts


def register() -> None:
    """Entry point ``megatron_qrm.tasks: arith`` (pyproject.toml): adds the task to evaluation's registry."""
    from megatron_qrm.evaluation.tasks import register_task

    register_task(TASK_NAME, {"exact": judge})


register()
