"""Joint NCUT colours: shape, range, determinism, a joint fit, and colours equal for equal features by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd3_lora_celeba.visualize.ncut import ncut_colors, ncut_eigenvectors, propagate, too_few_tokens


def _features(seed: int = 0, tokens: int = 36) -> torch.Tensor:
    # Two token clusters per image so the spectral embedding has structure to find.
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(2, 32, generator=generator) * 4
    labels = torch.arange(3 * tokens) % 2
    x = centres[labels] + 0.3 * torch.randn(3 * tokens, 32, generator=generator)
    return x.reshape(3, tokens, 32).to(torch.bfloat16)  # bf16 input must work too (cast to float32 inside)


@pytest.mark.parametrize("method", ["tsne", "spectral"])
def test_ncut_colors_shape_range_and_determinism(method):
    features = _features()
    a = ncut_colors(features, n_eig=8, seed=0, method=method)
    b = ncut_colors(features, n_eig=8, seed=0, method=method)
    assert a.shape == (3, 36, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["tsne", "spectral"])
@pytest.mark.parametrize("tokens", [16, 100])
def test_equal_features_get_equal_colours_in_every_image(method, tokens):
    """Three copies of one image's features: the same colours in each copy (the demo's 16 tokens included)."""
    generator = torch.Generator().manual_seed(1)
    one = torch.randn(1, tokens, 48, generator=generator)
    colors = ncut_colors(one.repeat(3, 1, 1), n_eig=10, seed=0, method=method)
    np.testing.assert_allclose(colors[0], colors[1], atol=1e-5)
    np.testing.assert_allclose(colors[0], colors[2], atol=1e-5)
    # ... while different tokens of one image still get different colours.
    spread = np.abs(colors[0][:, None] - colors[0][None]).mean()
    assert spread > 0.1


def test_ncut_is_joint_over_images():
    # Image 0 holds only cluster-A tokens, image 1 only cluster-B tokens, image 2 both. Fitted per image, image 0
    # and 1 would have no cluster split at all; fitted jointly, the split is the same in every image.
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(2, 32, generator=generator) * 4
    labels = torch.stack([torch.zeros(36), torch.ones(36), torch.arange(36) % 2]).long()  # (3, 36)
    features = centres[labels] + 0.3 * torch.randn(3, 36, 32, generator=generator)
    eigvec = ncut_eigenvectors(features, n_eig=6, seed=1)
    assert eigvec.shape == (3, 36, 6)
    side = eigvec[..., 1] > 0  # (3, 36)
    np.testing.assert_array_equal(side.numpy(), (labels == labels[0, 0]).numpy() == side[0, 0].item())
    assert side[0].all() != side[1].all()


def test_propagation_is_a_function_of_each_row():
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(20, 5, generator=generator)
    values = torch.randn(20, 3, generator=generator)
    x = torch.randn(7, 5, generator=generator)
    out = propagate(values, torch.cat([x, x.flip(0)]), anchors, chunk=3)
    torch.testing.assert_close(out[:7], out[7:].flip(0))
    # An anchor's own value dominates its propagated value.
    near = propagate(values, anchors[:1], anchors)
    assert torch.argmin(((values - near) ** 2).sum(1)) == 0


def test_ncut_rejects_bad_arguments_and_warns_about_few_tokens():
    with pytest.raises(ValueError, match="n_eig must be between 1 and 35"):
        ncut_colors(_features(), n_eig=36)
    with pytest.raises(ValueError, match="unknown colour method"):
        ncut_colors(_features(), method="umap")
    assert "only 16 tokens per image" in too_few_tokens(16)
    assert too_few_tokens(4096) is None
