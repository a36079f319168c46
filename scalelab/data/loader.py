"""A deterministic, resumable loader of fixed-length windows over a packed token stream.

The stream already holds a BOS token before every document, so windows that cross
a document boundary are ordinary packed training examples.

Determinism contract: the *global* batch at step k depends only on (tokens, seed,
batch_size, block_size). Rank r of W takes rows [r·B/W, (r+1)·B/W), so any number of
data-parallel processes sees exactly the single-process global batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scalelab.errors import ScalelabError


class TokenLoader:
    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size % world_size:
            raise ScalelabError(f"batch size {batch_size} is not divisible by {world_size} data-parallel processes")
        if len(tokens) < block_size + 1:
            raise ScalelabError(f"corpus has {len(tokens)} tokens, shorter than one block of {block_size + 1}; "
                                "add text or lower model.block_size")
        self.tokens = tokens
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._starts = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        # Each epoch shifts the window grid by a random offset, so epochs see different cuts of the text.
        rng = np.random.default_rng([self.seed, epoch])
        slack = len(self.tokens) - 1 - self.block_size
        offset = int(rng.integers(0, min(self.block_size, slack) + 1))
        n_windows = (len(self.tokens) - 1 - offset) // self.block_size
        return offset + rng.permutation(n_windows) * self.block_size

    def _next_starts(self, n: int) -> np.ndarray:
        out = []
        while n:
            if self.position >= len(self._starts):
                self.epoch += 1
                self.position = 0
                self._starts = self._epoch_starts(self.epoch)
            take = min(n, len(self._starts) - self.position)
            out.append(self._starts[self.position : self.position + take])
            self.position += take
            n -= take
        return np.concatenate(out)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._next_starts(self.batch_size)
        per_rank = self.batch_size // self.world_size
        mine = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        windows = np.stack([np.asarray(self.tokens[s : s + self.block_size + 1], dtype=np.int64) for s in mine])
        w = torch.from_numpy(windows)
        return w[:, :-1], w[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._starts = self._epoch_starts(self.epoch)


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None):
    """Consecutive non-overlapping windows from the start of ``tokens``, in batches (the last may be short)."""
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for b in range(0, n_windows, batch_size):
        starts = range(b * block_size, min(b + batch_size, n_windows) * block_size, block_size)
        w = torch.from_numpy(np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts]))
        yield w[:, :-1], w[:, 1:]
