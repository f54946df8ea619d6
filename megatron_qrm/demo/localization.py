"""Credit localisation: does a reward model's lowest-credit step sit on the first wrong step?

For an incorrect response of the arithmetic task the checker knows the index of its first wrong step
(:func:`megatron_qrm.demo.task.check`). A token-level reward model gives every response token a credit
(Q-RM: ``Z(s_t, a_t)``; DPO-RM: ``beta * (log pi - log pi_ref)``), dumped per token by
``qrm eval-rm --dump-token-scores``. Tokens are mapped to lines through their decoded texts; a line's
newline token belongs to the line it ends, EOS to none. The **steps** are the ``a op b = c`` lines (the
first ``len(ops)`` lines; the ``Answer:`` line is a restatement, not a step).

A step's credit (the primary rule) is the credit of its **result**: the lowest credit among the tokens
of the number after ``=``. That number is the one thing in a step the policy computes; the operands and
the operator are copies (of the previous result and of the prompt), and the flaws this task plants (a
sign slip, a result off by a few) sit in it. The copied tokens are identical in the chosen and rejected
responses of a pair, so a reward model's loss barely constrains their credit (a Q-RM's ``Z`` there can
sit anywhere); averaging them in (the **mean** over the step's tokens) or taking the **min** over all of
them is reported as a second and third rule.

A Q-function is low on every step from the first error on (the trajectory is doomed there), so its
lowest step can be any of them. Reported beside the lowest-credit rule: the **first-low** rule (the first
step whose result credit is at or below the midpoint of the response's highest and lowest), how often
the lowest step lies at or after the first error (vs chance), and the mean credit **profile** around
the first error (offsets -2..+2, in standard units).

The hit rate is the share of incorrect responses whose lowest-credit step is the first wrong step, over
the responses whose first wrong step is one of their steps (an error only in the answer line, or a
missing line, is skipped and counted). Chance is the expected hit rate of picking a step uniformly at
random, ``mean(1 / steps)``. An ORM scores only the last token, so it has no step credits: chance.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from megatron_qrm.demo import task as arith

_SPECIAL = {"<s>", "</s>", "<pad>", "<unk>"}


def token_steps(tokens: list[str]) -> list[Optional[int]]:
    """Line index (among non-empty lines) of each token: a newline belongs to the line it ends; special
    tokens (EOS), blank-line newlines and other whitespace-only tokens outside a line are ``None``."""
    out: list[Optional[int]] = []
    line, has_content = 0, False
    for t in tokens:
        if t in _SPECIAL:
            out.append(None)
            continue
        if not t.strip():
            out.append(line if has_content else None)
            if "\n" in t and has_content:
                line, has_content = line + 1, False
            continue
        out.append(line)
        has_content = True
        if t.endswith("\n"):  # a piece that ends a line (not produced by the demo's tokenizer)
            line, has_content = line + 1, False
    return out


def response_text(tokens: list[str]) -> str:
    return "".join(t for t in tokens if t not in _SPECIAL)


def step_credits_by_rule(tokens: list[str], scores: list[float]) -> dict[str, list[float]]:
    """Credit of each line under every rule (one pass over the tokens): ``"result"``, the min over the
    tokens of the number after ``=`` (the whole line's min when it has no ``=``); ``"mean"`` / ``"min"``,
    the mean / min over all its tokens. A line with no scored token gets ``inf``."""
    steps = token_steps(tokens)
    n = max((s for s in steps if s is not None), default=-1) + 1
    groups: list[list[float]] = [[] for _ in range(n)]
    results: list[list[float]] = [[] for _ in range(n)]
    after_eq = [False] * n
    for t, s, x in zip(tokens, steps, scores):
        if s is None:
            continue
        groups[s].append(float(x))
        if after_eq[s] and t.strip():
            results[s].append(float(x))
        elif "=" in t:
            after_eq[s] = True
            if t.split("=", 1)[1].strip():  # a piece "= 12" carries the result too
                results[s].append(float(x))
    return {"result": [min(r) if r else (min(g) if g else math.inf) for r, g in zip(results, groups)],
            "mean": [sum(g) / len(g) if g else math.inf for g in groups],
            "min": [min(g) if g else math.inf for g in groups]}


def step_credits(tokens: list[str], scores: list[float], how: str = "result") -> list[float]:
    """Credit of each line under one rule of :func:`step_credits_by_rule`."""
    return step_credits_by_rule(tokens, scores)[how]


def _argmin(xs: list[float]) -> int:
    return min(range(len(xs)), key=lambda i: xs[i])


def localize(prompt: str, tokens: list[str], scores: list[float]) -> Optional[dict]:
    """Localisation record of one response, or ``None`` when it is correct, or its first wrong step is not
    one of its ``a op b = c`` steps (the answer line, or a missing line: nothing to point at)."""
    text = response_text(tokens)
    c = arith.check(prompt, text)
    if c.correct or c.first_error is None:
        return None
    n_ops = c.n_steps - 1  # the a op b = c steps; the last "step" of the checker is the answer line
    credits = {how: xs[:n_ops] for how, xs in step_credits_by_rule(tokens, scores).items()}
    res = credits["result"]
    if c.first_error >= len(res):
        return None
    mid = (max(res) + min(res)) / 2
    first_low = next(i for i, x in enumerate(res) if x <= mid)
    rec = {"first_error": c.first_error, "steps": len(res), "first_low": first_low,
           "hit_first_low": first_low == c.first_error}
    for how, xs in credits.items():
        rec[f"step_credit_{how}"] = xs
        rec[f"argmin_{how}"] = _argmin(xs)
        rec[f"hit_{how}"] = rec[f"argmin_{how}"] == c.first_error
    rec["lowest_after_error"] = rec["argmin_result"] >= c.first_error
    return rec


def credit_profile(recs: list[dict], span: int = 2) -> dict[str, Optional[float]]:
    """Mean step credit (result rule) at each offset from the first wrong step (-span..+span), in standard
    units of all the step credits of these responses: how the credit moves around the first error."""
    vals = [x for r in recs for x in r["step_credit_result"] if math.isfinite(x)]
    if len(vals) < 2:
        return {}
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / len(vals)) or 1.0
    out: dict[str, list[float]] = {}
    for r in recs:
        for i, x in enumerate(r["step_credit_result"]):
            off = i - r["first_error"]
            if -span <= off <= span and math.isfinite(x):
                out.setdefault(f"{off:+d}" if off else "0", []).append((x - mu) / sd)
    keys = [f"{o:+d}" if o else "0" for o in range(-span, span + 1)]
    return {k: (sum(out[k]) / len(out[k]) if out.get(k) else None) for k in keys}


def localization_from_dumps(path: str, task_cfg: Optional[arith.TaskConfig] = None) -> dict:
    """Hit rates over the rejected (incorrect) responses of an ``eval-rm --dump-token-scores`` file."""
    recs, skipped = [], 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["side"] != "rejected":
                continue
            r = localize(row["prompt"], row["tokens"], row["scores"])
            if r is None:
                skipped += 1
                continue
            r["index"] = row["index"]
            recs.append(r)
    n = len(recs)
    nan = float("nan")
    by_pos: dict[str, list[int]] = {}
    for r in recs:
        key = f"step {r['first_error'] + 1}"
        by_pos.setdefault(key, [0, 0])
        by_pos[key][0] += int(r["hit_result"])
        by_pos[key][1] += 1
    return {
        "responses": n,
        "skipped": skipped,
        "hit_rate": sum(r["hit_result"] for r in recs) / n if n else nan,  # the primary (result) rule
        "hit_rate_mean": sum(r["hit_mean"] for r in recs) / n if n else nan,
        "hit_rate_min": sum(r["hit_min"] for r in recs) / n if n else nan,
        "hit_rate_first_low": sum(r["hit_first_low"] for r in recs) / n if n else nan,
        "chance": sum(1.0 / r["steps"] for r in recs) / n if n else nan,
        # a Q-function is low on every step from the first error on: is the lowest step in that part?
        "lowest_at_or_after_error": sum(r["lowest_after_error"] for r in recs) / n if n else nan,
        "lowest_at_or_after_error_chance": sum((r["steps"] - r["first_error"]) / r["steps"] for r in recs) / n
        if n else nan,
        "profile": credit_profile(recs),
        "by_first_error": {k: {"hits": v[0], "responses": v[1]} for k, v in sorted(by_pos.items())},
        "examples": recs,
    }
