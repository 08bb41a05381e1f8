"""Split sizes, stratification, determinism and identity-disjointness of the pure split functions."""

from __future__ import annotations

import numpy as np
import pytest

from sd3_lora_celeba.data.split import (
    NUM_STRATA,
    SPLIT_FRACTIONS,
    allocate,
    identity_split,
    split_sizes,
    strata,
    stratified_split,
)
from sd3_lora_celeba.layout import ATTRIBUTES
from sd3_lora_celeba.testing.celeba_synth import random_attributes


def test_full_size_split_is_24000_3000_3000():
    assert split_sizes(30000) == (24000, 3000, 3000)
    attributes = random_attributes(np.random.default_rng(0), 30000)
    assignment = stratified_split(attributes, seed=42)
    assert np.bincount(assignment).tolist() == [24000, 3000, 3000]


@pytest.mark.parametrize("n", [1, 2, 7, 11, 40, 99, 1234])
def test_small_splits_are_proportional_and_sum_to_n(n):
    sizes = split_sizes(n)
    assert sum(sizes) == n
    for size, fraction in zip(sizes, SPLIT_FRACTIONS, strict=True):
        assert abs(size - n * fraction) <= 1
    attributes = random_attributes(np.random.default_rng(n), n)
    assert np.bincount(stratified_split(attributes, seed=3), minlength=3).tolist() == list(sizes)


def test_strata_encode_male_lipstick_smiling():
    attributes = np.zeros((3, len(ATTRIBUTES)), dtype=bool)
    attributes[1, ATTRIBUTES.index("Male")] = True
    attributes[2, ATTRIBUTES.index("Smiling")] = True
    attributes[2, ATTRIBUTES.index("Wearing_Lipstick")] = True
    attributes[:, ATTRIBUTES.index("Young")] = True  # not a stratification attribute
    assert strata(attributes).tolist() == [0, 1, 6]


def test_every_stratum_is_split_in_the_global_proportions():
    attributes = random_attributes(np.random.default_rng(1), 30000)
    labels = strata(attributes)
    assignment = stratified_split(attributes, seed=42)
    for k in range(NUM_STRATA):
        members = assignment[labels == k]
        counts = np.bincount(members, minlength=3)
        # Each stratum's split sizes are its proportional quota, rounded: off by at most one example.
        for s, fraction in enumerate(SPLIT_FRACTIONS):
            assert abs(counts[s] - len(members) * fraction) <= 1, (k, s, counts)


@pytest.mark.parametrize("seed", range(5))
def test_allocate_hits_both_margins_exactly(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=NUM_STRATA)
    sizes = split_sizes(int(counts.sum()))
    table = allocate(counts, sizes)
    assert (table >= 0).all()
    assert table.sum(axis=1).tolist() == counts.tolist()
    assert table.sum(axis=0).tolist() == list(sizes)


def test_split_is_deterministic_under_seed():
    attributes = random_attributes(np.random.default_rng(2), 500)
    first = stratified_split(attributes, seed=42)
    assert np.array_equal(first, stratified_split(attributes, seed=42))
    assert not np.array_equal(first, stratified_split(attributes, seed=43))


def _identities(rng: np.random.Generator, n: int, num_identities: int) -> list[int]:
    return [int(i) for i in rng.integers(0, num_identities, size=n)]


def test_identity_split_keeps_each_identity_in_one_split():
    rng = np.random.default_rng(4)
    n = 3000
    attributes = random_attributes(rng, n)
    identities = _identities(rng, n, 600)
    assignment = identity_split(attributes, identities, seed=42)
    split_of: dict[int, set[int]] = {}
    for ident, s in zip(identities, assignment, strict=True):
        split_of.setdefault(ident, set()).add(int(s))
    assert all(len(splits) == 1 for splits in split_of.values())
    # Whole identities still fill the 80/10/10 targets closely, and keep the strata balanced.
    sizes = np.bincount(assignment, minlength=3)
    largest_identity = max(np.bincount(identities))
    assert np.abs(sizes - np.array(split_sizes(n))).max() <= largest_identity
    male = attributes[:, ATTRIBUTES.index("Male")]
    for s in range(3):
        assert abs(male[assignment == s].mean() - male.mean()) < 0.06


def test_identity_split_is_deterministic_and_treats_unknown_identities_alone():
    rng = np.random.default_rng(5)
    attributes = random_attributes(rng, 200)
    identities: list[int | None] = [None] * 200
    first = identity_split(attributes, identities, seed=1)
    assert np.array_equal(first, identity_split(attributes, identities, seed=1))
    assert np.bincount(first, minlength=3).tolist() == list(split_sizes(200))
