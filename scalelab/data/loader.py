"""A deterministic, resumable loader of fixed-length windows over a packed token stream.

The stream already holds a BOS token before every document, so windows that cross
a document boundary are ordinary packed training examples.

Determinism contract: the *global* batch at step k depends only on (tokens, seed,
batch_size, block_size). Rank r of W takes rows [r·B/W, (r+1)·B/W), so any number of
data-parallel processes sees exactly the single-process global batch.

Resuming at step k from the saved (epoch, position) gives exactly the global batches k+1, k+2, ... of an
uninterrupted run, token for token. With another number of data-parallel ranks W', "exactly" means the
global batch: the same rows in the same order, now cut into W' blocks instead of W, so a given row is
read by another rank, but the step's data, and with a mean loss its gradient, are those of the
uninterrupted run (up to float summation order across ranks).

The token stream may be a memmap or a ShardedTokens view over many shard files: a batch reads only its
windows, never a whole shard. The per-epoch window order is one int64 per window (8 bytes per
block_size tokens: 8 MB for 1B tokens at block size 1024).

Epoch e visits every window of a grid shifted by a random offset in [0, block_size), in a random
order; both come from a generator seeded by (seed, e), so epochs see different cuts of the text
and a run resumes from just (epoch, position).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from scalelab.errors import ScalelabError


class TokenLoader:
    """Endless (x, y) batches of shape (batch_size // world_size, block_size); y is x shifted by one."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1 or block_size < 1:
            raise ScalelabError(f"batch size ({batch_size}) and block size ({block_size}) must be positive")
        if seed < 0:
            raise ScalelabError(f"data loader seed must be non-negative, got {seed}")
        if not 0 <= rank < world_size:
            raise ScalelabError(f"rank {rank} is outside a world of {world_size} processes")
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
        # (seed, epoch) as a pair, not seed + epoch: seed 1 epoch 0 must not replay seed 0 epoch 1
        rng = np.random.default_rng([self.seed, epoch])
        slack = len(self.tokens) - 1 - self.block_size
        offset = int(rng.integers(0, min(self.block_size - 1, slack) + 1))
        n_windows = (len(self.tokens) - 1 - offset) // self.block_size
        return offset + rng.permutation(n_windows) * self.block_size

    def _next_starts(self, n: int) -> np.ndarray:
        out = []
        while n:
            take = min(n, len(self._starts) - self.position)
            out.append(self._starts[self.position : self.position + take])
            self.position += take
            n -= take
            # roll over eagerly, so (epoch, position) always names the next window to be served
            if self.position >= len(self._starts):
                self.epoch += 1
                self.position = 0
                self._starts = self._epoch_starts(self.epoch)
        return np.concatenate(out)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._next_starts(self.batch_size)
        per_rank = self.batch_size // self.world_size
        mine = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
        return _windows(self.tokens, mine, self.block_size)

    def skip_batches(self, n: int) -> None:
        """Move past ``n`` global batches unseen: the spike guard drops the data window that preceded a spike."""
        if n < 0:
            raise ScalelabError(f"cannot skip a negative number of batches ({n})")
        if n:
            self._next_starts(n * self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain ints (JSON-safe). Position counts windows, so it does not depend on the rank."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "block_size": self.block_size, "n_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        # Resuming onto another seed, block size or corpus would silently replay different data.
        for key, mine in (("seed", self.seed), ("block_size", self.block_size), ("n_tokens", len(self.tokens))):
            if key in state and int(state[key]) != mine:
                raise ScalelabError(f"cannot resume the data loader: checkpoint has {key}={state[key]}, this run has {mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        starts = self._epoch_starts(max(epoch, 0))
        if epoch < 0 or not 0 <= position <= len(starts):
            raise ScalelabError(f"cannot resume the data loader: position {position} of epoch {epoch} is out of range")
        self.epoch, self.position, self._starts = epoch, position, starts


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int | None = None):
    """Consecutive non-overlapping windows from the start of ``tokens``, in batches (the last may be short).

    Every token is predicted once except the final < block_size tail, which no full window covers.
    Yields nothing when ``tokens`` is shorter than one block + 1; callers report that.
    """
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    for b in range(0, n_windows, batch_size):
        starts = np.arange(b, min(b + batch_size, n_windows)) * block_size
        yield _windows(tokens, starts, block_size)


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
    # contiguous copies: callers may .view() them, and a slice of w would not allow that
    return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))
