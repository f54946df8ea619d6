"""Tiny, learnable preference sets generated on the spot (tests, benchmarks, smoke runs).

* :func:`sorting_pairs`: each prompt asks to list some numbers in increasing order; the chosen response
  does, the rejected one breaks the order at one step (a known first error). A token-level RM can learn
  that the credit of a response drops at the first step that is not larger than the previous one.
* :func:`parity_pairs` (easier): each prompt asks to keep the even numbers of a list; the chosen response
  does, the rejected one has one of them replaced by an odd number of the list (a known wrong token).
  Every response token can be judged on its own, so even a very small model learns it in a few dozen
  steps, with any of the reward losses.
"""

from __future__ import annotations

import json
import random
from typing import Iterable


def sorting_pairs(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(min_len, max_len)
        nums = rng.sample(range(1, 40), k)
        good = sorted(nums)
        bad = list(good)
        i = rng.randrange(1, k)
        bad[i - 1], bad[i] = bad[i], bad[i - 1]  # first error at step i
        rows.append({
            "instruction": "Sort ascending: " + " ".join(map(str, nums)),
            "chosen": " " + " ".join(map(str, good)),
            "rejected": " " + " ".join(map(str, bad)),
        })
    return rows


def parity_pairs(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6) -> list[dict]:
    """``n`` pairs: prompt "Keep the even numbers: <list>", chosen = its even numbers in order,
    rejected = the same with the number at a random position replaced by one of the list's odd numbers
    (so both responses have the same length and differ in exactly one number)."""
    rng = random.Random(seed)
    evens, odds = list(range(2, 40, 2)), list(range(1, 40, 2))
    rows = []
    for _ in range(n):
        k = rng.randint(min_len, max_len)
        good = rng.sample(evens, k)
        distractors = rng.sample(odds, rng.randint(1, 3))
        nums = good + distractors
        rng.shuffle(nums)
        good = [x for x in nums if x % 2 == 0]  # in the order of the prompt
        bad = list(good)
        bad[rng.randrange(k)] = rng.choice(distractors)
        rows.append({
            "instruction": "Keep the even numbers: " + " ".join(map(str, nums)),
            "chosen": " " + " ".join(map(str, good)),
            "rejected": " " + " ".join(map(str, bad)),
        })
    return rows


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def corpus(rows: Iterable[dict]) -> list[str]:
    """Texts to train a tokenizer on."""
    out = []
    for r in rows:
        out += [r["instruction"], r["chosen"], r["rejected"]]
    return out
