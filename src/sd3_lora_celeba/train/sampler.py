"""The resumable training sampler: an endless stream of ``(index, sample_seed)`` pairs.

Everything random about a training sample (which example, its flip, latent noise, caption variant, caption
dropout, diffusion noise and timestep) is derived from ``(seed, epoch, position)``. The stream is therefore a pure
function of the seed and of how many samples were consumed, so resuming needs only that count, and the stream does
not depend on the number of processes: process ``r`` of ``N`` takes its slice of each global micro-batch.

Optional attribute balancing (:func:`balanced_weights`) turns each epoch into ``len(dataset)`` draws with
replacement, weighted toward examples whose attributes are rare.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sd3_lora_celeba.seeding import derive_seed

# Recorded in checkpoints: a resumed run must derive the same stream (sd3_lora_celeba.seeding's sha256 scheme).
SEED_SCHEME = "sha256-v1"


def epoch_order(
    num_examples: int, seed: int, epoch: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Example indices of one epoch: a permutation, or ``num_examples`` weighted draws with replacement."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    if weights is None:
        return torch.randperm(num_examples, generator=generator)
    return torch.multinomial(weights.double(), num_examples, replacement=True, generator=generator)


def sample_stream(
    num_examples: int, seed: int, start: int = 0, weights: torch.Tensor | None = None
) -> Iterator[tuple[int, int]]:
    """Endless ``(index, sample_seed)`` pairs, starting after ``start`` consumed samples."""
    if num_examples < 1:
        raise ValueError("the training set is empty")
    epoch, position = divmod(start, num_examples)
    while True:
        order = epoch_order(num_examples, seed, epoch, weights).tolist()
        for p in range(position, num_examples):
            yield order[p], derive_seed(seed, epoch, p + 1)
        epoch, position = epoch + 1, 0


class ResumableBatchSampler:
    """Micro-batches of ``(index, sample_seed)`` pairs for one process, resumable from a consumed-sample count.

    A global micro-batch holds ``batch_size * num_processes`` consecutive stream items; process ``rank`` gets
    items ``[rank * batch_size, (rank + 1) * batch_size)`` of it, so a run on N processes sees the same global
    batches as a run on one process with N times the batch size. Use as a DataLoader ``batch_sampler``.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int,
        weights: torch.Tensor | None = None,
        num_processes: int = 1,
        rank: int = 0,
        start: int = 0,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.weights = weights
        self.num_processes = num_processes
        self.rank = rank
        self.start = start

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_processes

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        stream = sample_stream(self.num_examples, self.seed, self.start, self.weights)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while True:
            global_batch = [next(stream) for _ in range(self.global_batch_size)]
            yield global_batch[lo:hi]

    def epoch_of(self, consumed: int) -> float:
        """Fractional epoch after ``consumed`` samples (for logging)."""
        return consumed / self.num_examples


def balanced_weights(
    attributes: np.ndarray, *, max_weight: float = 5.0, iterations: int = 50, damping: float = 0.5
) -> torch.Tensor:
    """Per-example sampling weights that move each attribute's frequency toward 50%, within bounds.

    Damped iterative raking: for each attribute with weighted frequency ``p``, multiply the weights of examples
    that have it by ``(0.5 / p) ** damping`` and of the others by ``(0.5 / (1 - p)) ** damping``, then clip every
    weight to ``[1 / max_weight, max_weight]`` times the mean. 40 correlated attributes cannot all reach 50%; the
    bounds keep any example from dominating (or vanishing from) an epoch: no weight is more than ``max_weight ** 2``
    times another. Attributes that every example has, or none has, cannot be balanced and are left alone.
    Returns weights of mean 1, shape (N,), float64.
    """
    a = np.asarray(attributes, dtype=bool)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError("attributes must be a non-empty (N, num_attributes) array")
    if max_weight < 1:
        raise ValueError("max_weight must be >= 1")
    w = np.ones(a.shape[0], dtype=np.float64)
    counts = a.sum(0)
    usable = [j for j in range(a.shape[1]) if 0 < counts[j] < a.shape[0]]
    for _ in range(iterations):
        for j in usable:
            has = a[:, j]
            p = w[has].sum() / w.sum()
            w[has] *= (0.5 / p) ** damping
            w[~has] *= (0.5 / (1 - p)) ** damping
            w /= w.mean()
            np.clip(w, 1 / max_weight, max_weight, out=w)
    return torch.from_numpy(w / w.mean())


def weighted_frequencies(
    attributes: np.ndarray, weights: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """Frequency of each attribute when examples are drawn with ``weights`` (uniform when None)."""
    a = np.asarray(attributes, dtype=np.float64)
    w = np.ones(a.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    return (w[:, None] * a).sum(0) / w.sum()
