"""Deterministic order of training samples, resumable from a sample count.

The stream is the concatenation of one permutation per epoch (seeded by ``seed + epoch``), so the
position of a run is a single integer (``consumed_samples``) and every rank can compute its slice of
any global batch without communication.
"""

from __future__ import annotations

import numpy as np

from megatron_qrm.errors import UserError


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 1234, shuffle: bool = True):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        per_rank = global_batch_size // data_parallel_size
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise UserError(
                f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        self.n, self.gbs, self.mbs = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.per_rank = data_parallel_rank, per_rank
        self.seed, self.shuffle = seed, shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            order = (np.random.RandomState(self.seed + epoch).permutation(self.n) if self.shuffle
                     else np.arange(self.n))
            self._perm_cache = {epoch: order}  # keep one epoch in memory
        return self._perm_cache[epoch]

    def global_batch(self, consumed_samples: int) -> np.ndarray:
        """Indices of the global batch that starts at sample ``consumed_samples`` of the stream."""
        pos = np.arange(consumed_samples, consumed_samples + self.gbs)
        epochs, offsets = pos // self.n, pos % self.n
        return np.concatenate([self._epoch_order(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])

    def microbatches(self, consumed_samples: int) -> list[np.ndarray]:
        """This data-parallel rank's micro-batches (index arrays) of that global batch."""
        mine = self.global_batch(consumed_samples)[self.dp_rank * self.per_rank:(self.dp_rank + 1) * self.per_rank]
        return [mine[i:i + self.mbs] for i in range(0, self.per_rank, self.mbs)]

    def epoch_of(self, consumed_samples: int) -> float:
        return consumed_samples / self.n
