"""A tiny, learnable preference set generated on the spot (tests, benchmarks, smoke runs).

Each prompt asks to list some numbers in increasing order; the chosen response does, the rejected
one breaks the order at one step (a known first error). A token-level RM can learn that the credit
of a response drops at the first step that is not larger than the previous one.
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
