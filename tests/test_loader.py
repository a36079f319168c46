"""TokenLoader: determinism, epochs, resume, data-parallel sharding; eval_batches."""

import json

import numpy as np
import pytest
import torch

from scalelab.data.loader import TokenLoader, eval_batches
from scalelab.data.shards import build_shards, load_shards
from scalelab.errors import ScalelabError
from scalelab.tokenizer import ByteTokenizer


def positions(n=1000):
    # each token equals its own position, so a row's first token is the window's start
    return np.arange(n, dtype=np.uint32)


def test_batches_are_long_shifted_and_deterministic():
    a, b = TokenLoader(positions(), 4, 16, seed=1), TokenLoader(positions(), 4, 16, seed=1)
    for _ in range(30):  # crosses several epochs
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.dtype == ya.dtype == torch.long and xa.shape == ya.shape == (4, 16)
        assert xa.is_contiguous() and ya.is_contiguous()
        assert xa.equal(xb) and ya.equal(yb)
        assert torch.equal(ya, xa + 1)  # y is x shifted by one token
    assert a.state_dict()["epoch"] > 0
    other = TokenLoader(positions(), 4, 16, seed=2).next_batch()[0]
    assert not other.equal(TokenLoader(positions(), 4, 16, seed=1).next_batch()[0])


def test_iteration_matches_next_batch():
    it = iter(TokenLoader(positions(), 2, 8, seed=0))
    ref = TokenLoader(positions(), 2, 8, seed=0)
    for _ in range(5):
        assert next(it)[0].equal(ref.next_batch()[0])


def epoch_starts(loader) -> list[list[int]]:
    """Window starts seen in each epoch, read one window at a time."""
    by_epoch: dict[int, list[int]] = {}
    while loader.state_dict()["epoch"] < 4:
        epoch = loader.state_dict()["epoch"]
        x, _ = loader.next_batch()
        # a batch that wraps into the next epoch is attributed to where it started; batch size 1 avoids that
        by_epoch.setdefault(epoch, []).append(int(x[0, 0]))
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_an_epoch_is_a_shuffled_grid_of_non_overlapping_windows():
    n, block = 203, 10
    epochs = epoch_starts(TokenLoader(positions(n), 1, block, seed=7))
    for starts in epochs[1:3]:  # whole epochs only
        offset = min(starts)
        assert 0 <= offset < block
        assert sorted(starts) == list(range(offset, n - block, block))  # every window once, none overlap
        assert starts != sorted(starts)  # visited in a shuffled order
    assert len(set(map(tuple, epochs[1:3]))) == 2


def test_epochs_shift_the_window_grid():
    offsets = {min(s) for s in epoch_starts(TokenLoader(positions(500), 1, 50, seed=0))[1:]}
    assert len(offsets) > 1


def test_resume_gives_the_batches_that_would_have_come_next():
    straight = TokenLoader(positions(), 4, 16, seed=0)
    expected = [straight.next_batch() for _ in range(40)]
    for cut in (0, 7, 23):  # 23 lands mid-epoch after an epoch boundary
        first = TokenLoader(positions(), 4, 16, seed=0)
        for _ in range(cut):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        assert all(type(v) is int for v in state.values())
        resumed = TokenLoader(positions(), 4, 16, seed=0)
        resumed.load_state_dict(state)
        for x, y in expected[cut:]:
            rx, ry = resumed.next_batch()
            assert rx.equal(x) and ry.equal(y)


def test_resume_refuses_a_different_run():
    state = TokenLoader(positions(), 4, 16, seed=0).state_dict()
    with pytest.raises(ScalelabError, match="seed=0, this run has 1"):
        TokenLoader(positions(), 4, 16, seed=1).load_state_dict(state)
    with pytest.raises(ScalelabError, match="n_tokens"):
        TokenLoader(positions(900), 4, 16, seed=0).load_state_dict(state)
    with pytest.raises(ScalelabError, match="out of range"):
        TokenLoader(positions(), 4, 16, seed=0).load_state_dict({"epoch": 0, "position": 10_000})


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_global_batch(world_size):
    whole = TokenLoader(positions(), 6, 8, seed=5)
    ranks = [TokenLoader(positions(), 6, 8, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(40):
        x, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p[0].shape == (6 // world_size, 8) for p in parts)
        assert x.equal(torch.cat([p[0] for p in parts])) and y.equal(torch.cat([p[1] for p in parts]))
    assert ranks[-1].state_dict() == whole.state_dict()  # the state is global, so any rank can save it


def test_tiny_corpus_with_one_window_still_serves_batches():
    loader = TokenLoader(positions(9), 3, 8, seed=0)
    x, y = loader.next_batch()
    assert x.tolist() == [list(range(8))] * 3 and y[0].tolist() == list(range(1, 9))


def test_loader_reads_token_shards(tmp_path):
    tok = ByteTokenizer()
    build_shards(["hello world"] * 10, tok, tmp_path)
    train = load_shards(tmp_path, "train")
    x, y = TokenLoader(train, 2, 8, seed=0).next_batch()
    assert int(x.max()) < tok.vocab_size and bool((x == tok.bos_id).any() or (y == tok.bos_id).any())


def test_loader_errors():
    with pytest.raises(ScalelabError, match="corpus has 10 tokens, shorter than one block of 17"):
        TokenLoader(positions(10), 2, 16)
    with pytest.raises(ScalelabError, match="batch size 3 is not divisible by 2"):
        TokenLoader(positions(), 3, 8, world_size=2)
    with pytest.raises(ScalelabError, match="rank 2 is outside"):
        TokenLoader(positions(), 4, 8, rank=2, world_size=2)
    with pytest.raises(ScalelabError, match="must be positive"):
        TokenLoader(positions(), 0, 8)


def test_eval_batches_cover_the_split_in_order():
    batches = list(eval_batches(positions(100), 3, 10))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.flatten().tolist() == list(range(90)) and ys.flatten().tolist() == list(range(1, 91))
    assert [x.shape[0] for x, _ in eval_batches(positions(101), 4, 10)] == [4, 4, 2]  # the last may be short
    assert len(list(eval_batches(positions(100), 3, 10, max_batches=2))) == 2
    assert list(eval_batches(positions(10), 2, 16)) == []
    again = list(eval_batches(positions(100), 3, 10))
    assert all(a[0].equal(b[0]) for a, b in zip(batches, again))
