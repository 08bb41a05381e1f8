"""NCUT colours of image tokens, fitted jointly over several images so a colour means the same in each.

Normalized Cut (ncut-pytorch 3.x, Nystrom approximation) turns the per-token attention outputs of every shown
image into spectral eigenvectors *in one graph*; a t-SNE (or UMAP) of the eigenvectors, mapped onto the RGB cube,
gives each token a colour. Because base and LoRA images share the graph, equal colours mark tokens the models
treat alike. Everything is seeded, so the same features and seed give identical colours.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

ColorMethod = Literal["tsne", "umap"]
MAX_COLOR_SAMPLES = 1000  # tokens the 3-D embedding is fitted on; the rest are propagated (Nystrom)


def _seed_everything(seed: int) -> None:
    # ncut-pytorch samples with torch (farthest-point seeds), the embeddings with numpy/sklearn.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ncut_eigenvectors(
    features: torch.Tensor, n_eig: int = 20, seed: int = 0, device: str | None = None
) -> torch.Tensor:
    """Joint NCUT eigenvectors (num_images, N, n_eig) of ``features`` (num_images, N, D), float32 on the CPU.

    The tokens of all images are fitted as one graph and split back per image afterwards. ``n_eig`` is at most
    the total token count minus one. Features are cast to float32: ncut-pytorch's eigensolver fails in bfloat16.
    """
    from ncut_pytorch import Ncut

    num_images, num_tokens, dim = features.shape
    total = num_images * num_tokens
    if not 1 <= n_eig < total:
        raise ValueError(
            f"n_eig must be between 1 and {total - 1} (the number of tokens minus one), got {n_eig}"
        )
    device = device or "cpu"
    x = features.reshape(total, dim).to(device=device, dtype=torch.float32)  # (num_images * N, D)
    _seed_everything(seed)
    eigvec = Ncut(n_eig=n_eig, device=device).fit_transform(x)  # (num_images * N, n_eig)
    return eigvec.float().cpu().reshape(num_images, num_tokens, n_eig)


def ncut_colors(
    features: torch.Tensor,
    grid: tuple[int, int],
    n_eig: int = 20,
    seed: int = 0,
    method: ColorMethod = "tsne",
    device: str | None = None,
) -> np.ndarray:
    """RGB colours in [0, 1], float32 (num_images, h, w, 3), of ``features`` (num_images, h * w, D).

    Joint :func:`ncut_eigenvectors`, then one t-SNE/UMAP embedding of all tokens' eigenvectors onto the RGB cube.
    """
    from ncut_pytorch.color import tsne_color, umap_color

    num_images, num_tokens, _ = features.shape
    h, w = grid
    if h * w != num_tokens:
        raise ValueError(f"grid {h}x{w} does not match {num_tokens} tokens per image")
    if method not in ("tsne", "umap"):
        raise ValueError(f"unknown colour method {method!r}; use tsne or umap")
    eigvec = ncut_eigenvectors(features, n_eig=n_eig, seed=seed, device=device)
    eigvec = eigvec.reshape(num_images * num_tokens, n_eig)
    total = eigvec.shape[0]
    num_sample = min(MAX_COLOR_SAMPLES, total)
    _seed_everything(seed)
    if method == "tsne":
        # sklearn needs perplexity < samples; ncut-pytorch would lower it too, with a warning.
        perplexity = max(1, min(150, num_sample // 2 - 1))
        rgb = tsne_color(eigvec, num_sample=num_sample, perplexity=perplexity, seed=seed, device="cpu")
    else:
        n_neighbors = max(2, min(150, num_sample - 1))
        rgb = umap_color(eigvec, num_sample=num_sample, n_neighbors=n_neighbors, seed=seed, device="cpu")
    rgb = torch.as_tensor(rgb).float().cpu().clamp(0, 1)
    return rgb.reshape(num_images, h, w, 3).numpy()
