"""The resumable (balanced) sampler: deterministic, exactly resumable, process-count independent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sd3_lora_celeba.train.sampler import (
    ResumableBatchSampler,
    balanced_weights,
    derive_seed,
    sample_stream,
    weighted_frequencies,
)


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_stream_is_a_permutation_per_epoch_and_seeds_differ():
    items = take(sample_stream(7, seed=5), 21)
    for epoch in range(3):
        assert sorted(i for i, _ in items[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert [i for i, _ in items[:7]] != [i for i, _ in items[7:14]]  # reshuffled each epoch
    assert len({s for _, s in items}) == 21
    assert take(sample_stream(7, seed=5), 21) == items
    assert take(sample_stream(7, seed=6), 21) != items


@pytest.mark.parametrize("weighted", [False, True])
def test_resume_from_any_position_is_exact(weighted):
    weights = torch.linspace(0.2, 3.0, 7) if weighted else None
    full = take(sample_stream(7, seed=1, weights=weights), 30)
    for start in (0, 3, 7, 12, 29):
        assert take(sample_stream(7, seed=1, start=start, weights=weights), 30 - start) == full[start:]


def test_processes_share_global_batches():
    one = take(iter(ResumableBatchSampler(10, 4, seed=2)), 5)
    two = [take(iter(ResumableBatchSampler(10, 2, seed=2, num_processes=2, rank=r)), 5) for r in (0, 1)]
    for step in range(5):
        assert two[0][step] + two[1][step] == one[step]
    resumed = take(iter(ResumableBatchSampler(10, 4, seed=2, start=8)), 3)
    assert resumed == one[2:5]


def test_derive_seed_is_stable_and_spread():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(0, 0, p) for p in range(1000)}) == 1000
    assert 0 <= derive_seed(2**40, -1) < 2**63


def test_balanced_weights_move_attributes_toward_half_within_bounds():
    rng = np.random.default_rng(0)
    rates = np.array([0.05, 0.1, 0.3, 0.5, 0.8, 0.95])
    attributes = rng.random((500, 6)) < rates
    attributes[:, 5] |= attributes[:, 0]  # correlated attributes, as in CelebA
    before = weighted_frequencies(attributes)
    w = balanced_weights(attributes, max_weight=5.0)
    after = weighted_frequencies(attributes, w)
    assert np.abs(after - 0.5).mean() < 0.6 * np.abs(before - 0.5).mean()
    for j in range(6):
        assert abs(after[j] - 0.5) <= abs(before[j] - 0.5) + 1e-9, j
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w.max() / w.min()) <= 5.0**2 + 1e-6
    tight = balanced_weights(attributes, max_weight=1.5)
    assert float(tight.max() / tight.min()) <= 1.5**2 + 1e-6


def test_balanced_weights_leave_constant_attributes_alone():
    attributes = np.zeros((10, 3), dtype=bool)
    attributes[:, 1] = True
    torch.testing.assert_close(balanced_weights(attributes), torch.ones(10, dtype=torch.float64))
    with pytest.raises(ValueError):
        balanced_weights(np.zeros((0, 40), dtype=bool))
