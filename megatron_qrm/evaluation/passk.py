"""Unbiased Pass@k from ``n`` samples per problem of which ``c`` are correct.

For one problem, the probability that at least one of ``k`` samples drawn without replacement from the ``n``
is correct is ``1 - C(n-c, k) / C(n, k)``. The ratio is computed as the product
``prod_{i=0}^{k-1} (n-c-i) / (n-i)`` (each factor in [0, 1], no large binomials), vectorised over problems.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import numpy as np

ArrayLike = Union[int, Sequence[int], np.ndarray]


def pass_at_k(n: ArrayLike, c: ArrayLike, k: ArrayLike) -> np.ndarray:
    """Per-problem unbiased Pass@k. ``n``, ``c`` and ``k`` broadcast against each other; the result has their
    broadcast shape (a 0-d array for scalars; use ``float(...)``).

    Raises ``ValueError`` unless ``0 <= c <= n`` and ``1 <= k <= n`` everywhere."""
    n, c, k = np.broadcast_arrays(np.asarray(n), np.asarray(c), np.asarray(k))
    for name, a in (("n", n), ("c", c), ("k", k)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if not np.all(np.equal(np.mod(a, 1), 0)):
                raise ValueError(f"{name} must hold integers")
    n, c, k = n.astype(np.int64), c.astype(np.int64), k.astype(np.int64)
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= c <= n for every problem")
    if np.any(k < 1) or np.any(k > n):
        raise ValueError("need 1 <= k <= n for every problem (Pass@k is undefined with fewer than k samples)")
    if n.size == 0:
        return np.zeros(n.shape, dtype=np.float64)
    kmax = int(k.max())
    i = np.arange(kmax, dtype=np.int64).reshape((1,) * n.ndim + (kmax,))
    nn, cc, kk = n[..., None], c[..., None], k[..., None]
    # factor (n-c-i)/(n-i) for i < k, else 1; a factor <= 0 means every k-subset holds a correct sample
    num = np.clip(nn - cc - i, 0, None).astype(np.float64)
    den = (nn - i).astype(np.float64)
    factors = np.where(i < kk, num / np.where(den > 0, den, 1.0), 1.0)
    return 1.0 - np.prod(factors, axis=-1)


def mean_pass_at_k(n: ArrayLike, c: ArrayLike, k: int) -> float:
    """Pass@k averaged over problems."""
    return float(np.mean(pass_at_k(n, c, k)))


def pass_at_k_from_judgements(judgements: Iterable[Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """``{k: mean Pass@k}`` from per-problem lists of per-sample correctness (problems may have different
    sample counts; each k must not exceed any problem's count)."""
    rows = [list(map(bool, j)) for j in judgements]
    if not rows:
        raise ValueError("no problems")
    n = np.array([len(r) for r in rows])
    c = np.array([sum(r) for r in rows])
    return {int(k): mean_pass_at_k(n, c, int(k)) for k in ks}


__all__ = ["pass_at_k", "mean_pass_at_k", "pass_at_k_from_judgements"]
