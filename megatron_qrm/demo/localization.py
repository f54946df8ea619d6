"""Credit localisation: does a reward model's lowest-credit step sit on the first wrong step?

For an incorrect response of the arithmetic task the checker knows the index of its first wrong step
(:func:`megatron_qrm.demo.task.check`). A token-level reward model gives every response token a credit
(Q-RM: ``Z(s_t, a_t)``; DPO-RM: ``beta * (log pi - log pi_ref)``), dumped per token by
``qrm eval-rm --dump-token-scores``. Tokens are mapped to steps (the response's non-empty lines) through
their decoded texts; a step's credit is the **mean** of its tokens' credits (the primary rule; the
**min** is reported too). Newline and special tokens (EOS) belong to no step.

The hit rate is the share of incorrect responses whose lowest-credit step is the first wrong step;
chance is the expected hit rate of picking a step uniformly at random, ``mean(1 / steps)``. An ORM
scores only the last token, so it has no step credits: its localisation is chance.
"""

from __future__ import annotations

import json
import math
from typing import Optional

from megatron_qrm.demo import task as arith

_SPECIAL = {"<s>", "</s>", "<pad>", "<unk>"}


def token_steps(tokens: list[str]) -> list[Optional[int]]:
    """Step (non-empty line) index of each token; ``None`` for newlines, whitespace and special tokens."""
    out: list[Optional[int]] = []
    line, has_content = 0, False
    for t in tokens:
        if t in _SPECIAL:
            out.append(None)
            continue
        if not t.strip():
            out.append(None)
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
    """Localisation record of one response, or ``None`` when it is correct, or its first wrong step has
    no tokens (a missing line: nothing to point at)."""
    text = response_text(tokens)
    c = arith.check(prompt, text)
    if c.correct or c.first_error is None:
        return None
    mean_c = step_credits(tokens, scores, "mean")
    min_c = step_credits(tokens, scores, "min")
    if c.first_error >= len(mean_c):
        return None
    argmin = lambda xs: min(range(len(xs)), key=lambda i: xs[i])  # noqa: E731
    return {"first_error": c.first_error, "steps": len(mean_c), "argmin_mean": argmin(mean_c),
            "argmin_min": argmin(min_c), "step_credit_mean": mean_c, "step_credit_min": min_c,
            "hit_mean": argmin(mean_c) == c.first_error, "hit_min": argmin(min_c) == c.first_error}


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
        key = "answer line" if r["first_error"] == r["steps"] - 1 else f"step {r['first_error'] + 1}"
        by_pos.setdefault(key, [0, 0])
        by_pos[key][0] += int(r["hit_mean"])
        by_pos[key][1] += 1
    return {
        "responses": n,
        "skipped": skipped,
        "hit_rate_mean": sum(r["hit_mean"] for r in recs) / n if n else nan,
        "hit_rate_min": sum(r["hit_min"] for r in recs) / n if n else nan,
        "chance": sum(1.0 / r["steps"] for r in recs) / n if n else nan,
        "by_first_error": {k: {"hits": v[0], "responses": v[1]} for k, v in sorted(by_pos.items())},
        "examples": recs,
    }
