"""Figures of the attention app, rendered with matplotlib (Agg) into PIL images (PNG-ready, no UI).

Every figure shows all models side by side, base first, so a LoRA's effect reads left to right. Heatmaps share
one colour scale across models: a brighter patch means more attention, whichever image it is in.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display; figures become PNG images

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from sd3_lora_celeba.visualize.explorer import Generation, TextToken  # noqa: E402

PANEL_INCHES = 3.0
DISPLAY_MIN_SIDE = 256


def _to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _display_factor(side: int) -> int:
    # Small (tiny-model) images are enlarged by a whole factor so patches stay clickable; big ones stay as they are.
    return max(1, -(-DISPLAY_MIN_SIDE // side))


def side_by_side(images: list[Image.Image]) -> Image.Image:
    """The generated images in one row, enlarged to at least DISPLAY_MIN_SIDE px (nearest, so patches stay sharp)."""
    w, h = images[0].size
    k = _display_factor(min(w, h))
    row = Image.new("RGB", (w * k * len(images), h * k))
    for i, image in enumerate(images):
        row.paste(image.resize((w * k, h * k), Image.Resampling.NEAREST), (i * w * k, 0))
    return row


def locate_patch(generation: Generation, x: int, y: int) -> tuple[int, int, int]:
    """(model index, patch row, patch column) under pixel (x, y) of :func:`side_by_side`."""
    w, h = generation.images[0].size
    k = _display_factor(min(w, h))
    w, h = w * k, h * k
    gh, gw = generation.grid
    model = min(max(x // w, 0), len(generation.images) - 1)
    col = min(max((x - model * w) * gw // w, 0), gw - 1)
    row = min(max(y * gh // h, 0), gh - 1)
    return model, row, col


def token_heatmaps(generation: Generation, token: TextToken) -> Image.Image:
    """How much each image patch attends to ``token``, over each model's image, one shared colour scale."""
    gh, gw = generation.grid
    maps = [m.image_to_text[0, :, token.column].reshape(gh, gw).numpy() for m in generation.maps]
    vmin, vmax = min(float(a.min()) for a in maps), max(float(a.max()) for a in maps)
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(PANEL_INCHES * n + 0.8, PANEL_INCHES + 0.4), squeeze=False)
    for ax, name, image, heat in zip(axes[0], generation.names, generation.images, maps, strict=True):
        w, h = image.size
        ax.imshow(image)
        mesh = ax.imshow(
            heat,
            cmap="inferno",
            alpha=0.6,
            vmin=vmin,
            vmax=vmax,
            extent=(0, w, h, 0),
            interpolation="bilinear",
        )
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.colorbar(mesh, ax=axes[0].tolist(), fraction=0.025, label="attention probability")
    fig.suptitle(
        f"image patches attending to '{token.text}' ({token.encoder} position {token.column})", fontsize=10
    )
    return _to_image(fig)


def patch_bars(generation: Generation, row: int, col: int) -> Image.Image:
    """Which prompt tokens the patch at (row, col) attends to, in every model (grouped bars)."""
    gh, gw = generation.grid
    patch = row * gw + col
    tokens = generation.tokens
    columns = [t.column for t in tokens]
    values = np.stack(
        [m.image_to_text[0, patch, columns].numpy() for m in generation.maps]
    )  # (models, tokens)
    n_models = len(generation.names)
    width = 0.8 / n_models
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(tokens) + 1.5), 3.6))
    x = np.arange(len(tokens))
    for i, name in enumerate(generation.names):
        ax.bar(x + (i - (n_models - 1) / 2) * width, values[i], width=width, label=name)
    ax.set_xticks(x, [t.label for t in tokens], rotation=70, fontsize=7)
    ax.set_ylabel("attention probability")
    ax.set_title(f"text tokens attended by patch (row {row}, column {col}) of a {gh}x{gw} grid", fontsize=10)
    ax.legend(fontsize=7)
    return _to_image(fig)


def ncut_panels(generation: Generation, colors: np.ndarray, n_eig: int) -> Image.Image:
    """NCUT colours (num_models, h, w, 3) next to each image; one joint fit, so colours compare across models."""
    n = len(generation.names)
    fig, axes = plt.subplots(2, n, figsize=(PANEL_INCHES * n, 2 * PANEL_INCHES + 0.4), squeeze=False)
    for i, (name, image) in enumerate(zip(generation.names, generation.images, strict=True)):
        axes[0, i].imshow(image)
        axes[0, i].set_title(name, fontsize=9)
        axes[1, i].imshow(colors[i], interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(f"joint NCUT of image-token attention outputs ({n_eig} eigenvectors)", fontsize=10)
    return _to_image(fig)


def lora_norm_plot(norms: dict[str, dict[int, float]], num_blocks: int) -> Image.Image:
    """Per-block Frobenius norm of each checkpoint's LoRA weight change."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    blocks = np.arange(num_blocks)
    for name, per_block in norms.items():
        ax.plot(blocks, [per_block.get(int(b), 0.0) for b in blocks], marker="o", markersize=3, label=name)
    if not norms:
        ax.text(0.5, 0.5, "no LoRA checkpoint loaded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("||scale * B A||_F")
    ax.set_title("LoRA weight change per block", fontsize=10)
    if norms:
        ax.legend(fontsize=7)
    return _to_image(fig)
