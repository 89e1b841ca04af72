"""Batch loaders: shapes, determinism, exact resume, epochs, DDP sharding, val pass, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hyperloop_lm.data import BatchLoader, SequentialLoader
from hyperloop_lm.utils import UserError

T = 16


@pytest.fixture
def tokens(small_data) -> np.ndarray:
    return small_data[2]["train"].tokens  # a uint16 memmap, ~20k tokens


def take(loader, n):
    return [tuple(t.clone() for t in b) for b in itertools.islice(loader, n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_are_shifted_windows_of_the_data(tokens):
    loader = BatchLoader(tokens, batch_size=4, seq_len=T, seed=0)
    x, y = next(loader)
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = torch.from_numpy(np.asarray(tokens[: len(tokens) // (T + 1) * (T + 1)], dtype=np.int64)).view(-1, T + 1)
    for row_x, row_y in zip(x, y):  # every row is one aligned window of T+1 tokens
        full = torch.cat([row_x, row_y[-1:]])
        assert (windows == full).all(dim=1).any()


def test_same_seed_same_stream_other_seed_other_stream(tokens):
    a = take(BatchLoader(tokens, 4, T, seed=7), 5)
    assert_same(a, take(BatchLoader(tokens, 4, T, seed=7), 5))
    b = take(BatchLoader(tokens, 4, T, seed=8), 5)
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def test_an_epoch_visits_each_window_once_and_epochs_differ(tokens):
    loader = BatchLoader(tokens, 8, T, seed=0)
    n = loader.steps_per_epoch
    assert n == (len(tokens) // (T + 1)) // 8
    seen = [tuple(r.tolist()) for x, _ in take(loader, n) for r in x]
    assert len(set(seen)) == len(seen) == n * 8  # no repeats inside an epoch (drop_last: < 8 unseen)
    assert loader.epoch == 0
    nxt = take(loader, n)
    assert loader.epoch == 1
    assert [tuple(r.tolist()) for x, _ in nxt for r in x] != seen  # reshuffled


@pytest.mark.parametrize("k", [1, 5, "epoch_end"])
def test_resume_is_exact(tokens, k):
    ref = BatchLoader(tokens, 4, T, seed=3)
    k = ref.steps_per_epoch if k == "epoch_end" else k  # resume exactly at an epoch boundary too
    uninterrupted = take(ref, k + 6)
    first = BatchLoader(tokens, 4, T, seed=3)
    take(first, k)
    state = first.state_dict()
    resumed = BatchLoader(tokens, 4, T, seed=3)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 6), uninterrupted[k:])


def test_ddp_ranks_partition_the_global_batch(tokens):
    single = take(BatchLoader(tokens, 6, T, seed=1), 4)
    ranks = [take(BatchLoader(tokens, 2, T, seed=1, rank=r, world_size=3), 4) for r in range(3)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(3)]), y)


def test_resume_on_a_different_world_size(tokens):
    # The state counts global batches, so 2 ranks can resume a 1-rank run with the same global batch.
    one = BatchLoader(tokens, 4, T, seed=2)
    take(one, 3)
    expected = take(BatchLoader(tokens, 4, T, seed=2), 5)[3:]
    ranks = [BatchLoader(tokens, 2, T, seed=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    got = list(zip(*(take(r, 2) for r in ranks)))
    for (x, y), parts in zip(expected, got):
        assert torch.equal(torch.cat([p[0] for p in parts]), x)


def test_resume_with_other_settings_is_a_user_error(tokens):
    state = BatchLoader(tokens, 4, T).state_dict()
    with pytest.raises(UserError, match=r"global_batch=4 but this run has 8"):
        BatchLoader(tokens, 8, T).load_state_dict(state)


def test_too_small_corpus_says_how_many_tokens(tokens):
    with pytest.raises(UserError, match=rf"has {len(tokens):,} tokens, but one batch of 64 x 1025 tokens needs 65,600"):
        BatchLoader(tokens, 64, 1024)
    with pytest.raises(UserError, match=r"has 10 tokens"):
        BatchLoader(np.arange(10, dtype=np.uint16), 1, T)


def test_sequential_val_pass(small_data):
    val = small_data[2]["val"].tokens
    loader = SequentialLoader(val, batch_size=3, seq_len=T)
    batches = list(loader)
    assert len(batches) == len(loader) and list(loader)[0][0].equal(batches[0][0])  # re-iterable
    x = torch.cat([b[0] for b in batches])
    n = len(val) // (T + 1)
    assert x.shape == (n, T) and loader.n_targets == n * T
    expected = torch.from_numpy(np.asarray(val[: n * (T + 1)], dtype=np.int64)).view(n, T + 1)
    assert torch.equal(x, expected[:, :-1])
    capped = SequentialLoader(val, batch_size=3, seq_len=T, max_tokens=5 * T - 3)
    assert capped.n_targets == 5 * T and sum(b[0].shape[0] for b in capped) == 5
    with pytest.raises(UserError, match=r"validation split has 3 tokens"):
        SequentialLoader(val[:3], 2, T)
