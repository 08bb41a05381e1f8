"""Bootstrap uncertainty of an FID: resample the generated images (with replacement) and recompute the FID.

The ground-truth statistics stay fixed, so the band shows how much the score moves with the choice of generated
images alone, which is what changes between two models scored on the same ground truth.

Recomputing a 2048-dimensional FID takes a matrix square root per resample; here each resample costs one
eigen-decomposition of an N x N matrix instead (N = number of generated images), from the identity
``Tr((S_r S_g)^(1/2)) = Tr((S_r^(1/2) S_g S_r^(1/2))^(1/2))`` and ``S_g = Xc^T Xc / (N - 1)``: the non-zero
eigenvalues of ``S_r^(1/2) S_g S_r^(1/2)`` are those of the Gram matrix ``Y Y^T / (N - 1)`` with
``Y = Xc S_r^(1/2)``. With every image drawn once it equals pytorch-fid's value (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapFid:
    """Summary of the bootstrap FIDs of one score."""

    std: float  # standard deviation of the resampled FIDs: the band drawn is FID +- 1.96 std
    low: float  # 2.5 % percentile of the resampled FIDs (above the FID for few images: duplicates bias it up)
    high: float  # 97.5 % percentile
    num_samples: int


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative round-off eigenvalues clipped to 0); reuse it across
    scores that share the reference statistics."""
    sigma = np.asarray(sigma, dtype=np.float64)
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class FidResampler:
    """FID of any multiset of rows of ``features`` against fixed reference statistics ``(mu_r, sigma_r)``."""

    def __init__(
        self,
        mu_r: np.ndarray,
        sigma_r: np.ndarray,
        features: np.ndarray,
        sqrt_sigma_r: np.ndarray | None = None,
    ) -> None:
        x = np.asarray(features, dtype=np.float64)  # (N, D)
        self.mu_r = np.asarray(mu_r, dtype=np.float64)  # (D,)
        self.trace_r = float(np.trace(sigma_r))
        self.x = x
        if sqrt_sigma_r is None:
            sqrt_sigma_r = sqrtm_psd(sigma_r)
        y = x @ sqrt_sigma_r  # (N, D), rows x_i S_r^(1/2)
        self.gram_y = y @ y.T  # (N, N)
        self.gram_x = x @ x.T  # (N, N)

    def fid(self, index: np.ndarray) -> float:
        """FID of the images ``index`` (repeats allowed)."""
        n = len(index)
        centre = np.eye(n) - 1.0 / n  # (n, n) centring matrix H
        gy = self.gram_y[np.ix_(index, index)]
        gx = self.gram_x[np.ix_(index, index)]
        # Tr((S_r^(1/2) S_g S_r^(1/2))^(1/2)) = sum sqrt(eig(H Gy H / (n - 1)))
        eig = np.linalg.eigvalsh(centre @ gy @ centre / (n - 1))
        trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
        trace_g = float(np.trace(centre @ gx @ centre) / (n - 1))
        mu_g = self.x[index].mean(axis=0)
        mean_term = float(((mu_g - self.mu_r) ** 2).sum())
        return mean_term + self.trace_r + trace_g - 2 * trace_sqrt


def bootstrap_fid(
    mu_r: np.ndarray,
    sigma_r: np.ndarray,
    features: np.ndarray,
    *,
    num_samples: int = 200,
    seed: int = 0,
    sqrt_sigma_r: np.ndarray | None = None,
) -> BootstrapFid:
    """Resample the generated images ``num_samples`` times; the spread and 95 % percentiles of the FIDs."""
    n = len(features)
    if n < 2 or num_samples < 2:
        raise ValueError("the bootstrap needs at least 2 generated images and 2 resamples")
    resampler = FidResampler(mu_r, sigma_r, features, sqrt_sigma_r)
    rng = np.random.default_rng(seed)
    values = np.array([resampler.fid(rng.integers(0, n, n)) for _ in range(num_samples)])
    low, high = np.percentile(values, [2.5, 97.5])
    return BootstrapFid(float(values.std(ddof=1)), float(low), float(high), num_samples)
