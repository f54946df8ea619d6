"""Credit localisation: does a reward model's lowest-credit step sit on the first wrong step?

For an incorrect response of the arithmetic task the checker knows the index of its first wrong step
(:func:`megatron_qrm.demo.task.check`). A token-level reward model gives every response token a credit
(Q-RM: ``Z(s_t, a_t)``; DPO-RM: ``beta * (log pi - log pi_ref)``), dumped per token by
``qrm eval-rm --dump-token-scores``. Tokens are mapped to lines through their decoded texts; a line's
newline token belongs to the line it ends, EOS to none. The **steps** are the ``a op b = c`` lines (the
first ``len(ops)`` lines; the ``Answer:`` line is a restatement, not a step). A step's credit is the
**mean** of its tokens' credits (the primary rule; the **min** is reported too).

A Q-function is low on every step from the first error on (the trajectory is doomed there), so its
lowest step can be any of them. Reported beside the lowest-credit rule: the **first-low** rule (the first
step whose credit is at or below the midpoint of the response's highest and lowest step credit), how
often the lowest step lies at or after the first error (vs chance), and the mean credit **profile**
around the first error (offsets -2..+2, in standard units).

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


def step_credits(tokens: list[str], scores: list[float], how: str = "mean") -> list[float]:
    """Credit of each step: the mean (or min) of its tokens' credits."""
    steps = token_steps(tokens)
    n = max((s for s in steps if s is not None), default=-1) + 1
    groups: list[list[float]] = [[] for _ in range(n)]
    for s, x in zip(steps, scores):
        if s is not None:
            groups[s].append(float(x))
    agg = (lambda g: sum(g) / len(g)) if how == "mean" else min
    return [agg(g) if g else math.inf for g in groups]


def localize(prompt: str, tokens: list[str], scores: list[float]) -> Optional[dict]:
    """Localisation record of one response, or ``None`` when it is correct, or its first wrong step is not
    one of its ``a op b = c`` steps (the answer line, or a missing line: nothing to point at)."""
    text = response_text(tokens)
    c = arith.check(prompt, text)
    if c.correct or c.first_error is None:
        return None
    n_ops = c.n_steps - 1  # the a op b = c steps; the last "step" of the checker is the answer line
    mean_c = step_credits(tokens, scores, "mean")[:n_ops]
    min_c = step_credits(tokens, scores, "min")[:n_ops]
    if c.first_error >= len(mean_c):
        return None
    argmin = lambda xs: min(range(len(xs)), key=lambda i: xs[i])  # noqa: E731
    mid = (max(mean_c) + min(mean_c)) / 2
    first_low = next(i for i, x in enumerate(mean_c) if x <= mid)
    return {"first_error": c.first_error, "steps": len(mean_c), "argmin_mean": argmin(mean_c),
            "argmin_min": argmin(min_c), "first_low": first_low, "step_credit_mean": mean_c,
            "step_credit_min": min_c, "lowest_after_error": argmin(mean_c) >= c.first_error,
            "hit_mean": argmin(mean_c) == c.first_error,
            "hit_min": argmin(min_c) == c.first_error, "hit_first_low": first_low == c.first_error}


def credit_profile(recs: list[dict], span: int = 2) -> dict[str, Optional[float]]:
    """Mean step credit (mean rule) at each offset from the first wrong step (-span..+span), in standard
    units of all the step credits of these responses: how the credit moves around the first error."""
    vals = [x for r in recs for x in r["step_credit_mean"] if math.isfinite(x)]
    if len(vals) < 2:
        return {}
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / len(vals)) or 1.0
    out: dict[str, list[float]] = {}
    for r in recs:
        for i, x in enumerate(r["step_credit_mean"]):
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
        by_pos[key][0] += int(r["hit_mean"])
        by_pos[key][1] += 1
    return {
        "responses": n,
        "skipped": skipped,
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
