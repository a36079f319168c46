import math

import numpy as np
import pytest

from scalelab.errors import ScalelabError
from scalelab.evals.ngram import KneserNeyLM


def markov2_stream(n: int, vocab: int, seed: int, concentration: float = 0.1) -> np.ndarray:
    """A second-order Markov chain with peaked (low-concentration Dirichlet) transitions."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(1234).dirichlet(np.full(vocab, concentration), size=(vocab, vocab))
    cdf = table.cumsum(-1)
    out = np.empty(n, dtype=np.int64)
    out[:2] = rng.integers(0, vocab, 2)
    u = rng.random(n)
    for i in range(2, n):
        out[i] = min(int(np.searchsorted(cdf[out[i - 2], out[i - 1]], u[i])), vocab - 1)
    return out


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("discount", [None, 0.7])
def test_distribution_sums_to_one_for_any_context(order, discount):
    vocab = 20
    rng = np.random.default_rng(order)
    train = rng.integers(0, 18, 3000)  # ids 18 and 19 never appear in training
    lm = KneserNeyLM(order, discount, vocab_size=vocab).fit(train)
    contexts = [
        (),
        tuple(train[100:103]),            # seen
        tuple(train[-3:]),                # only at the end of training: no successor
        tuple(train[-1:]),
        (18, 19, 18),                     # unseen tokens
        (19,),
        (int(train[5]), 19, int(train[7])),
        tuple(train[:2]),                 # the stream start
    ] + [tuple(rng.integers(0, vocab, rng.integers(1, 5))) for _ in range(8)]
    for ctx in contexts:
        by_token = np.array([lm.logprob(ctx, w) for w in range(vocab)])
        assert math.isclose(np.exp(by_token).sum(), 1.0, rel_tol=1e-9), ctx
        assert np.isfinite(by_token).all()
        np.testing.assert_allclose(lm.next_logprobs(ctx), by_token, rtol=1e-12, atol=1e-12)


def test_bigram_hand_computed_interpolated_kn():
    # Training stream 0 1 0 1 2 with vocab 4 (token 3 unseen), fixed D = 0.5.
    # Bigram counts: (0,1)=2, (1,0)=1, (1,2)=1.
    # Unigram continuation counts (distinct left contexts, stream start counting
    # as one): 0 <- {start, 1} = 2, 1 <- {0} = 1, 2 <- {1} = 1, 3 = 0; total 4.
    # Unigram: gamma = 0.5 * 3 / 4, p1(w) = (N(w) - D[N>0]) / 4 + gamma / 4
    #   p1(0) = 1.5/4 + 0.375/4 = 0.46875, p1(1) = p1(2) = 0.21875, p1(3) = 0.09375
    # Bigram after 0: c = 2, one type -> gamma = 0.5 / 2
    #   p(1|0) = (2 - 0.5)/2 + 0.25 * p1(1) = 0.8046875, p(3|0) = 0.25 * 0.09375
    # Bigram after 1: c = 2, two types -> gamma = 1.0 / 2
    #   p(0|1) = 0.5/2 + 0.5 * 0.46875 = 0.484375, p(2|1) = 0.25 + 0.5 * 0.21875 = 0.359375
    # After 2 (seen only as the last token) and after 3 (unseen): back to p1.
    lm = KneserNeyLM(2, 0.5, vocab_size=4).fit(np.array([0, 1, 0, 1, 2], dtype=np.uint16))
    expected = {
        ((), 0): 0.46875, ((), 1): 0.21875, ((), 2): 0.21875, ((), 3): 0.09375,
        ((0,), 1): 0.8046875, ((0,), 0): 0.25 * 0.46875, ((0,), 3): 0.25 * 0.09375,
        ((1,), 0): 0.484375, ((1,), 2): 0.359375, ((1,), 1): 0.5 * 0.21875, ((1,), 3): 0.5 * 0.09375,
        ((2,), 0): 0.46875, ((3,), 3): 0.09375, ((3, 0), 1): 0.8046875,
    }
    for (ctx, w), p in expected.items():
        assert math.isclose(lm.logprob(ctx, w), math.log(p), rel_tol=1e-12), (ctx, w)
    assert math.isclose(lm.nll(np.array([0, 1, 0])), -(math.log(0.8046875) + math.log(0.484375)) / 2, rel_tol=1e-12)
    assert lm.discounts == [(0.5, 0.5, 0.5), (0.5, 0.5, 0.5)]


def test_nll_matches_per_token_logprob():
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 15, 2000), rng.integers(0, 16, 60)
    lm = KneserNeyLM(3, vocab_size=16).fit(train)
    by_token = [-lm.logprob(tuple(val[max(0, i - 2):i]), int(val[i])) for i in range(1, val.size)]
    assert math.isclose(lm.nll(val), float(np.mean(by_token)), rel_tol=1e-12)


def test_modified_discounts_are_estimated_and_ordered():
    lm = KneserNeyLM(3, vocab_size=30).fit(markov2_stream(50_000, 30, seed=1))
    for d1, d2, d3 in lm.discounts:
        assert 0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3
    assert len(set(lm.discounts[-1])) == 3  # three distinct discounts, not a single fallback


def test_more_training_data_lowers_val_nll():
    vocab = 30
    stream = markov2_stream(120_000, vocab, seed=2)
    train, val = stream[:100_000], stream[100_000:]
    small = KneserNeyLM(3, vocab_size=vocab).fit(train[:3_000]).nll(val)
    large = KneserNeyLM(3, vocab_size=vocab).fit(train).nll(val)
    assert large < small - 0.05


def test_order3_beats_unigram_on_second_order_markov_chain():
    vocab = 30
    stream = markov2_stream(120_000, vocab, seed=3)
    train, val = stream[:100_000], stream[100_000:]
    uni = KneserNeyLM(1, vocab_size=vocab).fit(train).nll(val)
    bi = KneserNeyLM(2, vocab_size=vocab).fit(train).nll(val)
    tri = KneserNeyLM(3, vocab_size=vocab).fit(train).nll(val)
    assert tri < bi < uni
    assert tri < uni - 0.5  # nats per token
    assert uni <= math.log(vocab) + 0.05


def test_unseen_token_in_validation_is_finite():
    train = np.random.default_rng(0).integers(0, 10, 5000)
    lm = KneserNeyLM(4, vocab_size=12).fit(train)
    val = np.array([1, 2, 11, 3, 10, 11, 4], dtype=np.uint32)
    nll = lm.nll(val)
    assert math.isfinite(nll) and nll > 0
    assert math.isfinite(lm.logprob((11, 10), 11))


def test_dtypes_and_bits_per_byte():
    rng = np.random.default_rng(5)
    train, val = rng.integers(0, 50, 4000), rng.integers(0, 50, 500)
    lm = KneserNeyLM(3, vocab_size=50).fit(train.astype(np.uint16))
    ref = KneserNeyLM(3, vocab_size=50).fit(train)
    for dt in (np.uint16, np.uint32, np.int64):
        assert lm.nll(val.astype(dt)) == ref.nll(val)
    bpb = lm.bits_per_byte(val, n_bytes=1234)
    assert math.isclose(bpb, lm.nll(val) * (val.size - 1) / (math.log(2) * 1234), rel_tol=1e-12)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: KneserNeyLM(3, vocab_size=10).fit(np.array([], dtype=np.int64)), "need at least 3 tokens"),
        (lambda: KneserNeyLM(3, vocab_size=10).fit(np.array([1, 2])), "need at least 3 tokens"),
        (lambda: KneserNeyLM(1, vocab_size=10).fit(np.array([1])), "need at least 2 tokens"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.array([1, 10, 2])), "token id 10 outside vocabulary"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.array([1, -1, 2])), "token id -1 outside vocabulary"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.zeros((3, 3), dtype=np.int64)), "1-D"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.array([0.5, 1.0, 2.0])), "integer token ids"),
        (lambda: KneserNeyLM(2, vocab_size=10).nll(np.array([1, 2, 3])), "not fitted"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.arange(10)).nll(np.array([3])), "need at least 2 tokens"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.arange(10)).nll(np.array([], dtype=np.int64)), "at least 2"),
        (lambda: KneserNeyLM(2, vocab_size=10).fit(np.arange(10)).bits_per_byte(np.arange(5), 0), "byte count"),
        (lambda: KneserNeyLM(0, vocab_size=10), "order must be a positive integer"),
        (lambda: KneserNeyLM(2, vocab_size=0), "vocab_size must be a positive integer"),
        (lambda: KneserNeyLM(2, 1.5, vocab_size=10), "discount must be in (0, 1]"),
        (lambda: KneserNeyLM(2, 0.0, vocab_size=10), "discount must be in (0, 1]"),
    ],
)
def test_bad_input_raises_scalelab_error(call, message):
    with pytest.raises(ScalelabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call()


def test_order3_matches_brute_force_reference():
    # Independent dict-and-loop restatement of the same definition, to pin the
    # continuation counts and per-order discounts that the hand test (bigram) can't reach.
    from collections import Counter, defaultdict

    rng = np.random.default_rng(3)
    vocab, n = 12, 3
    t = [int(x) for x in rng.integers(0, 10, 400)]
    lm = KneserNeyLM(n, vocab_size=vocab).fit(np.array(t))
    counts = {n: Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))}
    for k in range(1, n):
        left = defaultdict(set)
        for i in range(len(t) - k + 1):
            left[tuple(t[i:i + k])].add(t[i - 1] if i > 0 else "start")
        counts[k] = {g: len(s) for g, s in left.items()}

    def disc(k, c):
        return 0.0 if c == 0 else lm.discounts[k - 1][min(c, 3) - 1]

    def prob(ctx, w):
        p = 1.0 / vocab
        for k in range(1, min(n, len(ctx) + 1) + 1):
            h = tuple(ctx[len(ctx) - (k - 1):]) if k > 1 else ()
            ext = {g[-1]: c for g, c in counts[k].items() if g[:-1] == h}
            if sum(ext.values()) == 0:
                continue
            gamma = sum(disc(k, c) for c in ext.values())
            c = ext.get(w, 0)
            p = (c - disc(k, c) + gamma * p) / sum(ext.values())
        return p

    for ctx in [(), (t[5],), tuple(t[10:12]), (11, 3), (t[-1],), tuple(t[-2:]), (2, 11), tuple(t[:2])]:
        for w in range(vocab):
            assert math.isclose(lm.logprob(ctx, w), math.log(prob(ctx, w)), rel_tol=1e-10, abs_tol=1e-12)
