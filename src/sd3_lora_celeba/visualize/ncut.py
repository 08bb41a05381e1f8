"""NCUT colours of tokens, fitted jointly over several images so a colour means the same in each, by construction.

Normalized Cut (ncut-pytorch 3.x) is fitted once on the tokens of every shown image together (one graph, one
eigen-decomposition). Every token's eigenvector is then *propagated* from the fitted sample points by a weighted
sum over its nearest neighbours (Nystrom), so it is a function of that token's features alone: two images with
the same features get the same eigenvectors, whatever the eigen-solver did with near-equal eigenvalues. The
colours are made the same way: a 3-D embedding (t-SNE, or the first three eigenvectors for ``spectral``) is fitted
on a sample and propagated to every token, then mapped onto the RGB cube. Runs on the GPU when one is given.

With few tokens per image (the tiny test model has 16) the graph is too small for stable colours:
:func:`too_few_tokens` says so, and the app shows that message beside the figure.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

ColorMethod = Literal["tsne", "spectral"]
MAX_COLOR_SAMPLES = 300  # tokens the 3-D t-SNE embedding is fitted on; the rest are propagated
MIN_TOKENS_PER_IMAGE = 64
PCA_DIMS = 128  # features are projected to this many principal directions before the graph is built
NEIGHBOURS = 8
SHARPNESS = 8.0  # kernel width: the k-th nearest anchor weighs exp(-8) of a token on an anchor


def propagate(
    values: torch.Tensor, x: torch.Tensor, anchors: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """``values`` of ``anchors`` carried to every row of ``x``: RBF-weighted mean over its nearest anchors.

    A pure function of each row of ``x`` (equal rows get equal results), chunked so memory stays small.
    """
    k = min(NEIGHBOURS, anchors.shape[0])
    values, anchors = values.to(x.device, torch.float32), anchors.to(x.device, torch.float32)
    out = []
    for start in range(0, x.shape[0], chunk):
        d2 = torch.cdist(x[start : start + chunk], anchors).pow(2)
        near, index = d2.topk(k, dim=1, largest=False)
        scale = near[:, -1:].clamp_min(1e-12)
        weights = torch.exp(-SHARPNESS * near / scale)
        weights = weights / weights.sum(1, keepdim=True)
        out.append((weights[..., None] * values[index]).sum(1))
    return torch.cat(out)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def too_few_tokens(num_tokens: int) -> str | None:
    """A message for the page when ``num_tokens`` per image is too few for colours to compare across images."""
    if num_tokens >= MIN_TOKENS_PER_IMAGE:
        return None
    return (
        f"only {num_tokens} tokens per image: NCUT needs at least {MIN_TOKENS_PER_IMAGE} for colours that "
        "compare across images; read these colours within one image only"
    )


def ncut_eigenvectors(
    features: torch.Tensor, n_eig: int = 20, seed: int = 0, device: str | None = None
) -> torch.Tensor:
    """Joint NCUT eigenvectors (num_images, N, n_eig) of ``features`` (num_images, N, D), float32 on the CPU.

    ``n_eig`` is at most N - 1 (the tokens of one image minus one). Features are cast to float32 (ncut-pytorch's
    eigensolver fails in bfloat16).
    """
    from ncut_pytorch import Ncut

    num_images, num_tokens, dim = features.shape
    if not 1 <= n_eig < num_tokens:
        raise ValueError(
            f"n_eig must be between 1 and {num_tokens - 1} (the tokens of one image minus one), got {n_eig}"
        )
    device = device or "cpu"
    x = features.reshape(num_images * num_tokens, dim).to(device=device, dtype=torch.float32)
    _seed_everything(seed)
    if dim > PCA_DIMS and x.shape[0] > PCA_DIMS:
        # Distances (and so the RBF graph) are kept by the top principal directions: a much cheaper graph.
        x = x - x.mean(0)
        _, _, v = torch.pca_lowrank(x, q=PCA_DIMS, center=False, niter=2)
        x = x @ v
    ncut = Ncut(n_eig=n_eig, device=device).fit(x)
    # Propagate to every token, fitted ones included, so equal features give equal eigenvectors.
    eigvec = propagate(ncut._nystrom_eigvec, x, ncut._nystrom_x)
    return eigvec.float().cpu().reshape(num_images, num_tokens, n_eig)


def _embed_3d(eigvec: torch.Tensor, method: ColorMethod, seed: int, device: str) -> torch.Tensor:
    from ncut_pytorch.color.coloring import rgb_from_3d_rgb_cube
    from ncut_pytorch.utils.sample import farthest_point_sampling
    from sklearn.manifold import TSNE

    if method == "spectral":
        return rgb_from_3d_rgb_cube(eigvec[:, 1:4] if eigvec.shape[1] > 3 else eigvec[:, :3])
    sample = farthest_point_sampling(eigvec, n_sample=min(MAX_COLOR_SAMPLES, eigvec.shape[0]), device=device)
    anchors = eigvec[sample]
    perplexity = max(1.0, min(30.0, (len(sample) - 1) / 3))
    embedded = TSNE(n_components=3, perplexity=perplexity, metric="cosine", random_state=seed, init="pca")
    anchor_xyz = torch.as_tensor(embedded.fit_transform(anchors.numpy()), dtype=torch.float32)
    # Every token, sampled ones included, is placed from its nearest anchors: equal inputs, equal colours.
    return rgb_from_3d_rgb_cube(propagate(anchor_xyz, eigvec.to(device), anchors.to(device)).cpu())


def ncut_colors(
    features: torch.Tensor,
    n_eig: int = 20,
    seed: int = 0,
    method: ColorMethod = "tsne",
    device: str | None = None,
) -> np.ndarray:
    """RGB colours in [0, 1], float32 (num_images, N, 3), of ``features`` (num_images, N, D)."""
    if method not in ("tsne", "spectral"):
        raise ValueError(f"unknown colour method {method!r}; use tsne or spectral")
    num_images, num_tokens, _ = features.shape
    if method == "spectral" and n_eig < 3:
        raise ValueError("spectral colours need at least 3 eigenvectors")
    eigvec = ncut_eigenvectors(features, n_eig=n_eig, seed=seed, device=device)
    eigvec = eigvec.reshape(num_images * num_tokens, n_eig)
    _seed_everything(seed)
    rgb = _embed_3d(eigvec, method, seed, device or "cpu")
    rgb = torch.as_tensor(rgb).float().cpu().clamp(0, 1)
    return rgb.reshape(num_images, num_tokens, 3).numpy()
