"""Train/val/test split of CelebAMask-HQ: pure functions of attribute arrays, seeded, deterministic.

The 30,000 images split 24,000 / 3,000 / 3,000 (80/10/10, rounded so the sizes always sum to N). The split is
stratified over the 8 strata Male x Wearing_Lipstick x Smiling: the attributes a face prompt names most and
that the test-set FID is most sensitive to, so every split must hold them in the same proportions.
"""

from __future__ import annotations

import numpy as np

from sd3_lora_celeba.layout import ATTRIBUTES

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test
STRATIFY_ON = ("Male", "Wearing_Lipstick", "Smiling")
NUM_STRATA = 2 ** len(STRATIFY_ON)


def split_sizes(n: int, fractions: tuple[float, ...] = SPLIT_FRACTIONS) -> tuple[int, ...]:
    """Sizes of the splits of ``n`` examples: val and test rounded, train takes the rest (sums to ``n``)."""
    rest = [round(n * f) for f in fractions[1:]]
    return (n - sum(rest), *rest)


def strata(attributes: np.ndarray) -> np.ndarray:
    """Stratum 0..7 of each example from its (N, 40) bool attributes: bits Male, Wearing_Lipstick, Smiling."""
    columns = [ATTRIBUTES.index(name) for name in STRATIFY_ON]
    bits = attributes[:, columns].astype(np.int64)  # (N, 3)
    return bits @ (1 << np.arange(len(columns)))


def allocate(counts: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """How many of each stratum go to each split: (K, S) ints with row sums ``counts``, column sums ``sizes``.

    Starts from the floor of the proportional quotas, then hands out the missing units to the cells with the
    largest fractional parts; any cell may take a unit, so the fill always reaches both margins exactly.
    """
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    assert sum(sizes) == total, "split sizes must sum to the number of examples"
    quotas = counts[:, None] * np.asarray(sizes, dtype=np.float64)[None, :] / max(total, 1)  # (K, S)
    table = np.floor(quotas).astype(np.int64)
    row_need = counts - table.sum(axis=1)
    col_need = np.asarray(sizes, dtype=np.int64) - table.sum(axis=0)
    order = np.argsort(-(quotas - table), axis=None, kind="stable")
    for k, s in zip(*np.unravel_index(order, table.shape), strict=True):
        if row_need[k] > 0 and col_need[s] > 0:
            table[k, s] += 1
            row_need[k] -= 1
            col_need[s] -= 1
    for k in range(len(counts)):  # leftovers (rare): any cell with both needs works
        for s in range(len(sizes)):
            take = min(row_need[k], col_need[s])
            table[k, s] += take
            row_need[k] -= take
            col_need[s] -= take
    return table


def stratified_split(
    attributes: np.ndarray, seed: int, fractions: tuple[float, ...] = SPLIT_FRACTIONS
) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) of each example, stratified on Male x Wearing_Lipstick x Smiling."""
    n = len(attributes)
    sizes = split_sizes(n, fractions)
    labels = strata(attributes)
    table = allocate(np.bincount(labels, minlength=NUM_STRATA), sizes)
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    for k in range(NUM_STRATA):
        members = rng.permutation(np.flatnonzero(labels == k))
        assignment[members] = np.repeat(np.arange(len(sizes)), table[k])
    return assignment


def identity_split(
    attributes: np.ndarray,
    identities: list[int | None],
    seed: int,
    fractions: tuple[float, ...] = SPLIT_FRACTIONS,
) -> np.ndarray:
    """Split index of each example such that all images of one identity land in the same split.

    Identities are placed greedily, largest first (shuffled by ``seed`` among equal sizes), each in the split
    that still needs most of its strata among the splits it fits into; sizes come out as close to the 80/10/10
    targets as whole identities allow. ``None`` identities count as identities of their own.
    """
    n = len(attributes)
    sizes = np.asarray(split_sizes(n, fractions), dtype=np.int64)
    labels = strata(attributes)
    need = allocate(np.bincount(labels, minlength=NUM_STRATA), tuple(sizes)).astype(np.float64)  # (K, S)
    room = sizes.astype(np.float64).copy()
    groups: dict[object, list[int]] = {}
    for i, ident in enumerate(identities):
        groups.setdefault(("id", ident) if ident is not None else ("row", i), []).append(i)
    rng = np.random.default_rng(seed)
    members = [np.asarray(m) for m in groups.values()]
    shuffled = rng.permutation(len(members))
    order = sorted(shuffled, key=lambda g: -len(members[g]))  # stable: the shuffle breaks size ties
    assignment = np.empty(n, dtype=np.int64)
    for g in order:
        rows = members[g]
        group_strata = np.bincount(labels[rows], minlength=NUM_STRATA)  # (K,)
        fits = room >= len(rows)
        if fits.any():
            # Stratum need per split, relative to the split's size so small splits are not starved.
            score = (group_strata @ need) / np.maximum(sizes, 1)
            score[~fits] = -np.inf
        else:
            score = room / np.maximum(sizes, 1)
        s = int(np.argmax(score))
        assignment[rows] = s
        room[s] -= len(rows)
        need[:, s] -= group_strata
    return assignment
