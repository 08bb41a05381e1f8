"""Joint NCUT colours: shape, range, determinism, and that the fit is joint over images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd3_lora_celeba.visualize.ncut import ncut_colors, ncut_eigenvectors


def _features(seed: int = 0) -> torch.Tensor:
    # Two token clusters per image so the spectral embedding has structure to find.
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 32, generator=generator) * 4
    labels = torch.arange(3 * 36) % 2
    x = centres[labels] + 0.3 * torch.randn(3 * 36, 32, generator=generator)
    return x.reshape(3, 36, 32).to(torch.bfloat16)  # bf16 input must work too (cast to float32 inside)


def test_ncut_colors_shape_range_and_determinism():
    features = _features()
    a = ncut_colors(features, grid=(6, 6), n_eig=8, seed=0)
    b = ncut_colors(features, grid=(6, 6), n_eig=8, seed=0)
    assert a.shape == (3, 6, 6, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
    np.testing.assert_array_equal(a, b)


def test_ncut_is_joint_over_images():
    # Image 0 holds only cluster-A tokens, image 1 only cluster-B tokens, image 2 both. Fitted per image, image 0
    # and 1 would have no cluster split at all; fitted jointly, the split is the same in every image.
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(2, 32, generator=generator) * 4
    labels = torch.stack([torch.zeros(36), torch.ones(36), torch.arange(36) % 2]).long()  # (3, 36)
    features = centres[labels] + 0.3 * torch.randn(3, 36, 32, generator=generator)
    eigvec = ncut_eigenvectors(features, n_eig=6, seed=1)
    assert eigvec.shape == (3, 36, 6)
    # The first non-trivial eigenvector separates A from B with one sign convention across all three images.
    side = eigvec[..., 1] > 0  # (3, 36)
    np.testing.assert_array_equal(side.numpy(), (labels == labels[0, 0]).numpy() == side[0, 0].item())
    assert side[0].all() != side[1].all()


def test_ncut_rejects_bad_arguments():
    with pytest.raises(ValueError, match="does not match"):
        ncut_colors(_features(), grid=(5, 6))
    with pytest.raises(ValueError, match="n_eig must be between 1 and 107"):
        ncut_colors(_features(), grid=(6, 6), n_eig=200)
