"""The BPR sampler over many draws: negatives are never the user's training positives nor new items, every training
pair is used once per epoch, draws change between epochs, are uniform over the allowed items, and repeat exactly
with the same seed (and after restoring the generator state)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from dgmrec.training.sampler import NegativeSampler

N_USERS, N_ITEMS = 40, 30


@pytest.fixture(scope="module")
def pairs() -> np.ndarray:
    """Training pairs where some users hold most of the catalogue (so first draws often hit positives); items
    25..29 never occur in training."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        k = 22 if u % 5 == 0 else int(rng.integers(1, 8))
        rows += [(u, int(i)) for i in rng.choice(25, size=k, replace=False)]
    return np.asarray(rows, dtype=np.int64)


@pytest.fixture(scope="module")
def new_items() -> np.ndarray:
    new = np.zeros(N_ITEMS, dtype=bool)
    new[[3, 11, 17]] = True
    return new


def epochs(sampler: NegativeSampler, n: int, batch_size: int = 64) -> list[list[tuple[np.ndarray, ...]]]:
    return [[(b.users.numpy(), b.pos.numpy(), b.neg.numpy()) for b in sampler.epoch(batch_size)] for _ in range(n)]


def flat(epoch: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([b[k] for b in epoch]) for k in range(3))


def test_negatives_are_never_positives_nor_new_items(pairs, new_items):
    """Even when the pairs mention new items (the contract excludes them, not just their absence from training)."""
    assert new_items[pairs[:, 1]].any()
    sampler = NegativeSampler(pairs, N_ITEMS, new_items, seed=0)
    positives = {(int(u), int(i)) for u, i in pairs}
    allowed = set(np.unique(pairs[:, 1]).tolist()) - set(np.flatnonzero(new_items).tolist())
    drawn = 0
    for epoch in epochs(sampler, 40):
        users, _, neg = flat(epoch)
        assert all((int(u), int(n)) not in positives for u, n in zip(users, neg, strict=True))
        assert not new_items[neg].any()
        assert set(neg.tolist()) <= allowed  # only items that occur in training
        drawn += len(neg)
    assert drawn > 10_000


def test_every_training_pair_once_per_epoch(pairs):
    with_duplicates = np.concatenate([pairs, pairs[:7]])  # the raw list, duplicate rows included
    sampler = NegativeSampler(with_duplicates, N_ITEMS, seed=1)
    expected = Counter(map(tuple, with_duplicates.tolist()))
    assert sampler.n_batches(64) == -(-len(with_duplicates) // 64)
    for epoch in epochs(sampler, 5):
        assert len(epoch) == sampler.n_batches(64)
        assert all(len(b[0]) == 64 for b in epoch[:-1])
        users, pos, _ = flat(epoch)
        assert Counter(zip(users.tolist(), pos.tolist(), strict=True)) == expected


def test_draws_change_between_epochs(pairs):
    first, second = (flat(e) for e in epochs(NegativeSampler(pairs, N_ITEMS, seed=2), 2))
    assert not np.array_equal(first[0], second[0])  # a new shuffle
    # the negatives of each pair (matched by position in the raw list) are re-drawn
    def negatives_by_pair(users, pos, neg):
        return {(u, p): n for u, p, n in zip(users.tolist(), pos.tolist(), neg.tolist(), strict=True)}

    a, b = negatives_by_pair(*first), negatives_by_pair(*second)
    same = np.mean([a[k] == b[k] for k in a])
    assert same < 0.5  # about 1 / (allowed items) by chance


def test_same_seed_same_draws_other_seed_other_draws(pairs, new_items):
    a = epochs(NegativeSampler(pairs, N_ITEMS, new_items, seed=7), 3)
    b = epochs(NegativeSampler(pairs, N_ITEMS, new_items, seed=7), 3)
    c = epochs(NegativeSampler(pairs, N_ITEMS, new_items, seed=8), 3)
    for ea, eb in zip(a, b, strict=True):
        for x, y in zip(flat(ea), flat(eb), strict=True):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(flat(a[0])[0], flat(c[0])[0])
    # the global torch seed plays no part
    torch.manual_seed(123)
    d = epochs(NegativeSampler(pairs, N_ITEMS, new_items, seed=7), 1)
    np.testing.assert_array_equal(flat(d[0])[2], flat(a[0])[2])


def test_restored_state_repeats_the_draws(pairs):
    sampler = NegativeSampler(pairs, N_ITEMS, seed=4)
    epochs(sampler, 1)
    state = sampler.state()
    after = epochs(sampler, 2)
    sampler.set_state(state)
    again = epochs(sampler, 2)
    for ea, eb in zip(after, again, strict=True):
        for x, y in zip(flat(ea), flat(eb), strict=True):
            np.testing.assert_array_equal(x, y)


def test_negatives_are_uniform_over_allowed_items(pairs, new_items):
    """For a user with few positives, each allowed item is drawn ``n / |allowed|`` times up to sampling noise."""
    sampler = NegativeSampler(pairs, N_ITEMS, new_items, seed=5)
    user = int(np.argmin(np.bincount(pairs[:, 0], minlength=N_USERS)))
    own = set(pairs[pairs[:, 0] == user, 1].tolist())
    allowed = sorted(set(np.unique(pairs[:, 1]).tolist()) - own - set(np.flatnonzero(new_items).tolist()))
    n = 20_000
    neg = sampler.sample_negatives(torch.full((n,), user, dtype=torch.long)).numpy()
    counts = np.bincount(neg, minlength=N_ITEMS)
    assert set(np.flatnonzero(counts).tolist()) == set(allowed)
    expected = n / len(allowed)
    # binomial standard deviation; 5 of them is far outside what a uniform draw produces
    assert np.abs(counts[allowed] - expected).max() < 5 * np.sqrt(expected)


def test_without_negatives_the_positive_is_repeated(pairs):
    sampler = NegativeSampler(pairs, N_ITEMS, seed=0)
    for batch in sampler.epoch(50, with_negatives=False):
        assert torch.equal(batch.neg, batch.pos)
