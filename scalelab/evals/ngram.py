"""Interpolated modified Kneser–Ney n-gram model over integer token ids.

The statistical baseline the neural models are compared with: same tokens,
same validation stream, same nats-per-token and bits-per-byte units.

Written here rather than taken from nltk or kenlm: nltk's KneserNeyInterpolated
scores one n-gram at a time in pure Python (hours on a 100k-token validation
stream) and has no modified three-discount variant; kenlm needs a C++ build and
works on whitespace-separated strings, not our integer ids.  Everything below is
whole-array numpy: each n-gram order is one np.unique over the training stream
and each lookup one searchsorted, so fitting and scoring cost a few sorts.

Ids.  An order-1 gram's id is the token itself.  An order-k gram (k >= 2) is
keyed ``id(first k-1 tokens) * V + last token`` and its id is its rank among the
sorted unique keys of that order.  Keys are exact (no hashing, so no collisions)
and stay small: a prefix id is below the number of training positions.  Since
the first k-1 tokens of a k-gram are exactly its context, the key doubles as
"(context id, next token)".

Counts.  The highest order uses raw counts.  Lower orders use continuation
counts: how many distinct tokens precede the gram in training, with the start of
the stream counting as one more distinct left context for the grams that open
it (as ``<s>`` would for the first words of a sentence).

Probability of w after context h at order k, with c the order's counts:

    p_k(w | h) = (c(h w) - D(c(h w)) + gamma(h) * p_{k-1}(w | h')) / c(h)
    gamma(h)   = D1 * N1(h .) + D2 * N2(h .) + D3 * N3+(h .)

where h' drops h's oldest token and D(0) = 0.  A context never seen in
training (c(h) = 0) passes p_{k-1} through unchanged.  Below order 1 sits the
uniform distribution over the vocabulary, so every token, seen or not, gets a
positive probability and the distribution sums to one for any context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scalelab.errors import ScalelabError


@dataclass
class _Order:
    """Tables for one n-gram order k (k = 1 is the unigram level)."""

    keys: np.ndarray | None     # sorted unique gram keys; None at k = 1 where the id is the token
    counts: np.ndarray          # float64 count (raw or continuation) per gram id
    ctx_total: np.ndarray       # c(h) per context id at order k-1 (shape (1,) at k = 1)
    ctx_gamma: np.ndarray       # gamma(h) numerator per context id
    dvec: np.ndarray            # [0, D1, D2, D3+], indexed by min(count, 3)


def _lookup(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each query in the sorted ``keys``, -1 where absent (queries < 0 never match)."""
    if keys.size == 0:
        return np.full(query.shape, -1, dtype=np.int64)
    idx = np.searchsorted(keys, query)
    np.minimum(idx, keys.size - 1, out=idx)
    return np.where(keys[idx] == query, idx, -1).astype(np.int64, copy=False)


def _estimate_discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's D1, D2, D3+ from the count-of-counts n1..n4.

    Tiny or degenerate corpora (a missing n_r, or an estimate outside (0, r])
    fall back to one discount Y = n1 / (n1 + 2 n2), or 0.5 if even that is
    undefined: every D must stay in (0, r] so no discounted count goes negative
    and the uniform floor keeps some mass.
    """
    n = [int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4)]
    n1, n2, n3, n4 = n
    if n1 > 0 and n2 > 0:
        y = n1 / (n1 + 2 * n2)
        if n3 > 0 and n4 > 0:
            d = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3]
            if all(0 < d[r] <= r + 1 for r in range(3)):
                return np.array([0.0, *d])
        if 0 < y <= 1:
            return np.array([0.0, y, y, y])
    return np.array([0.0, 0.5, 0.5, 0.5])


class KneserNeyLM:
    """Interpolated Kneser–Ney language model over token ids in [0, vocab_size).

    ``discount=None`` estimates modified-KN discounts (D1, D2, D3+) per order
    from the training counts; a number in (0, 1] uses that single discount at
    every order (plain interpolated KN).
    """

    def __init__(self, order: int = 4, discount: float | None = None, *, vocab_size: int):
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ScalelabError(f"n-gram order must be a positive integer, got {order!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ScalelabError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if discount is not None and not (0.0 < float(discount) <= 1.0):
            raise ScalelabError(f"Kneser-Ney discount must be in (0, 1], got {discount!r}")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.discount = None if discount is None else float(discount)
        self._orders: list[_Order] | None = None

    # ------------------------------------------------------------------ input

    def _as_tokens(self, tokens, what: str, min_len: int) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ScalelabError(f"{what}: expected a 1-D token array, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ScalelabError(f"{what}: expected integer token ids, got dtype {arr.dtype}")
        if arr.size < min_len:
            raise ScalelabError(f"{what}: need at least {min_len} tokens, got {arr.size}")
        arr = arr.astype(np.int64, copy=False)
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ScalelabError(f"{what}: token id {bad} outside vocabulary [0, {self.vocab_size})")
        return arr

    def _require_fit(self) -> list[_Order]:
        if self._orders is None:
            raise ScalelabError("n-gram model is not fitted; call fit(tokens) first")
        return self._orders

    # -------------------------------------------------------------------- fit

    def fit(self, tokens: np.ndarray) -> "KneserNeyLM":
        n, V = self.order, self.vocab_size
        t = self._as_tokens(tokens, "n-gram training tokens", max(n, 2))
        # pos_ids[k-1][p]: id of the k-gram starting at position p.
        # first[k-1]: a position where each distinct k-gram occurs (k >= 2).
        pos_ids, keys, first = [t], [None], [None]
        for k in range(2, n + 1):
            query = pos_ids[-1][:-1] * V + t[k - 1:]
            uniq, where, inv = np.unique(query, return_index=True, return_inverse=True)
            keys.append(uniq)
            pos_ids.append(inv.reshape(-1).astype(np.int64, copy=False))
            first.append(where)

        orders = []
        for k in range(1, n + 1):
            size = V if k == 1 else keys[k - 1].size
            if k == n:
                counts = np.bincount(pos_ids[k - 1], minlength=size)
            else:
                # Each distinct (k+1)-gram gives its last k tokens one distinct
                # left context; the k-gram at p + 1 is the suffix of the (k+1)-gram at p.
                suffix = pos_ids[k - 1][first[k] + 1]
                counts = np.bincount(suffix, minlength=size)
                counts[pos_ids[k - 1][0]] += 1
            counts = counts.astype(np.float64)
            if self.discount is None:
                dvec = _estimate_discounts(counts)
            else:
                dvec = np.array([0.0, self.discount, self.discount, self.discount])
            d_per_gram = dvec[np.minimum(counts, 3).astype(np.int64)]
            if k == 1:
                ctx_total = np.array([counts.sum()])
                ctx_gamma = np.array([d_per_gram.sum()])
            else:
                ctx = keys[k - 1] // V
                n_ctx = keys[k - 2].size if k > 2 else V
                ctx_total = np.bincount(ctx, weights=counts, minlength=n_ctx)
                ctx_gamma = np.bincount(ctx, weights=d_per_gram, minlength=n_ctx)
            orders.append(_Order(keys[k - 1], counts, ctx_total, ctx_gamma, dvec))
        self._orders = orders
        return self

    @property
    def discounts(self) -> list[tuple[float, float, float]]:
        """(D1, D2, D3+) per order, lowest order first."""
        return [tuple(float(x) for x in o.dvec[1:]) for o in self._require_fit()]

    # ---------------------------------------------------------------- scoring

    def _interpolate(self, target: np.ndarray, ctx_ids: list, gram_ids: list) -> np.ndarray:
        """Log p(target) given, per order k >= 2, the context id and gram id (-1 = unseen)."""
        orders = self._require_fit()
        V = self.vocab_size
        uni = orders[0]
        c = uni.counts[target]
        p = (c - uni.dvec[np.minimum(c, 3).astype(np.int64)] + uni.ctx_gamma[0] / V) / uni.ctx_total[0]
        for k in range(2, self.order + 1):
            o = orders[k - 1]
            ctx, gram = ctx_ids[k - 2], gram_ids[k - 2]
            live = np.flatnonzero(ctx >= 0)
            total = o.ctx_total[ctx[live]]
            # A context seen only at the very end of training has no successor: c(h) = 0.
            keep = total > 0
            live, total = live[keep], total[keep]
            g = gram[live]
            c = np.where(g >= 0, o.counts[np.maximum(g, 0)], 0.0)
            disc = o.dvec[np.minimum(c, 3).astype(np.int64)]
            p[live] = (c - disc + o.ctx_gamma[ctx[live]] * p[live]) / total
        return np.log(p)

    def _stream_ids(self, t: np.ndarray) -> list[np.ndarray]:
        """Per order k, the training id of the k-gram starting at each position (-1 = unseen)."""
        orders = self._require_fit()
        V = self.vocab_size
        ids = [t]
        for k in range(2, self.order + 1):
            prev = ids[-1][:-1]
            if prev.size == 0:
                break
            query = np.where(prev >= 0, prev * V + t[k - 1:], -1)
            ids.append(_lookup(orders[k - 1].keys, query))
        return ids

    def _stream_logprobs(self, t: np.ndarray, start: int) -> np.ndarray:
        """Log p(t[i] | up to order-1 previous tokens) for i = start .. len(t)-1."""
        ids = self._stream_ids(t)
        pos = np.arange(start, t.size)
        ctx_ids, gram_ids = [], []
        for k in range(2, self.order + 1):
            s = pos - (k - 1)  # where the k-gram ending at i starts
            ok = s >= 0
            if k - 1 < len(ids) and ok.any():
                sc = np.maximum(s, 0)
                ctx_ids.append(np.where(ok, ids[k - 2][sc], -1))
                gram_ids.append(np.where(ok, ids[k - 1][sc], -1))
            else:
                ctx_ids.append(np.full(pos.size, -1, dtype=np.int64))
                gram_ids.append(ctx_ids[-1])
        return self._interpolate(t[start:], ctx_ids, gram_ids)

    def nll(self, tokens: np.ndarray) -> float:
        """Mean negative log-likelihood in nats of tokens[1:], each given up to order-1 predecessors."""
        t = self._as_tokens(tokens, "n-gram scoring tokens", 2)
        self._require_fit()
        return float(-self._stream_logprobs(t, 1).mean())

    def bits_per_byte(self, tokens: np.ndarray, n_bytes: int) -> float:
        """Total nats over tokens[1:] / (ln 2 * n_bytes); n_bytes is the text those tokens cover."""
        if not n_bytes or n_bytes <= 0:
            raise ScalelabError(f"bits_per_byte needs a positive byte count, got {n_bytes!r}")
        t = self._as_tokens(tokens, "n-gram scoring tokens", 2)
        total = self.nll(t) * (t.size - 1)
        return total / (math.log(2) * n_bytes)

    def logprob(self, context: tuple, token: int) -> float:
        """Natural log p(token | context); only the last order-1 context tokens matter."""
        self._require_fit()
        ctx = list(context)[-(self.order - 1):] if self.order > 1 else []
        t = self._as_tokens(np.array([*ctx, token], dtype=np.int64), "logprob tokens", 1)
        return float(self._stream_logprobs(t, len(ctx))[0])

    def next_logprobs(self, context: tuple) -> np.ndarray:
        """Log p(w | context) for every w in the vocabulary, shape (vocab_size,)."""
        orders = self._require_fit()
        V = self.vocab_size
        ctx = list(context)[-(self.order - 1):] if self.order > 1 else []
        c = self._as_tokens(np.array(ctx, dtype=np.int64), "context tokens", 0)
        ids = self._stream_ids(c) if c.size else []
        m = c.size
        vocab = np.arange(V, dtype=np.int64)
        ctx_ids, gram_ids = [], []
        for k in range(2, self.order + 1):
            if k - 1 <= m:
                cid = int(ids[k - 2][m - (k - 1)])
                query = np.full(V, -1, dtype=np.int64) if cid < 0 else cid * V + vocab
                ctx_ids.append(np.full(V, cid, dtype=np.int64))
                gram_ids.append(_lookup(orders[k - 1].keys, query))
            else:
                ctx_ids.append(np.full(V, -1, dtype=np.int64))
                gram_ids.append(ctx_ids[-1])
        return self._interpolate(vocab, ctx_ids, gram_ids)
