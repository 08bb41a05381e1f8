"""Figures of the attention app (no UI): heatmaps drawn on the images, word rows, NCUT, exports.

Every figure shows all models side by side, base first, so a LoRA's effect reads left to right. Heatmaps share
one colour scale across models: a brighter patch means more attention, whichever image it is in. The on-screen
figures are drawn with PIL/numpy (fast, pixel-exact for patch clicks); exports go through matplotlib (PNG at
:data:`EXPORT_DPI` with the settings in its metadata, and SVG).
"""

from __future__ import annotations

import html
import io
import json
import re

import matplotlib

matplotlib.use("Agg")  # no display; figures become PNG images

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from sd3_lora_celeba.visualize.explorer import Generation  # noqa: E402

DISPLAY_MIN_SIDE = 512  # small images are enlarged to this side, so the page can scale the row to its width
GAP = 4
EXPORT_DPI = 200
HEAT_ALPHA = 0.6


def _display_factor(side: int) -> int:
    # Small (tiny-model) images are enlarged by a whole factor so patches stay clickable; big ones stay as they are.
    return max(1, -(-DISPLAY_MIN_SIDE // side))


def _panel_size(generation: Generation) -> tuple[int, int]:
    w, h = generation.prompts[0].images[0].size
    k = _display_factor(min(w, h))
    return w * k, h * k


def _colour(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    span = vmax - vmin if vmax > vmin else 1.0
    return plt.get_cmap(cmap)(np.clip((values - vmin) / span, 0, 1))[..., :3]


def overlay_row(
    generation: Generation,
    prompt: int,
    heat: np.ndarray | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "inferno",
    patch: tuple[int, int] | None = None,
    alpha: float = HEAT_ALPHA,
    panels: np.ndarray | None = None,
) -> Image.Image:
    """The images of one prompt in a row, ``heat`` (models, h, w) drawn on each, the clicked patch outlined.

    ``panels`` (models, h, w, 3) in [0, 1] replaces the heat colours (NCUT). Patches stay sharp (nearest).
    """
    pw, ph = _panel_size(generation)
    images = generation.prompts[prompt].images
    row = Image.new("RGB", (len(images) * pw + (len(images) - 1) * GAP, ph), "white")
    gh, gw = generation.grid
    for i, image in enumerate(images):
        base = (
            np.asarray(image.convert("RGB").resize((pw, ph), Image.Resampling.BICUBIC), dtype=np.float32)
            / 255
        )
        layer = None
        if panels is not None:
            layer = panels[i]
        elif heat is not None:
            layer = _colour(heat[i], cmap, vmin, vmax)
        if layer is not None:
            big = np.asarray(
                Image.fromarray((layer * 255).astype(np.uint8)).resize((pw, ph), Image.Resampling.NEAREST)
            )
            base = (1 - alpha) * base + alpha * big.astype(np.float32) / 255
        panel = Image.fromarray((base * 255).round().astype(np.uint8))
        if patch is not None:
            r, c = patch
            draw = ImageDraw.Draw(panel)
            box = (c * pw // gw, r * ph // gh, (c + 1) * pw // gw - 1, (r + 1) * ph // gh - 1)
            draw.rectangle(box, outline=(0, 255, 255), width=max(2, pw // 128))
        row.paste(panel, (i * (pw + GAP), 0))
    return row


def locate_patch(generation: Generation, x: int, y: int) -> tuple[int, int, int]:
    """(model index, patch row, patch column) under pixel (x, y) of :func:`overlay_row`."""
    pw, ph = _panel_size(generation)
    gh, gw = generation.grid
    model = min(max(x // (pw + GAP), 0), len(generation.names) - 1)
    col = min(max((x - model * (pw + GAP)) * gw // pw, 0), gw - 1)
    row = min(max(y * gh // ph, 0), gh - 1)
    return model, row, col


def words_html(words, scores: np.ndarray | None, selected: set[int], encoder: str) -> str:
    """One row of clickable words of ``encoder``, each tinted by its score (darker = more attention)."""
    top = float(scores.max()) if scores is not None and len(scores) and scores.max() > 0 else 1.0
    spans = []
    for i, word in enumerate(words):
        if word.encoder != encoder:
            continue
        level = 0.0 if scores is None else float(scores[i]) / top
        style = f"background: rgba(255, 140, 0, {0.08 + 0.8 * level:.2f});"
        mark = " selected" if i in selected else ""
        title = f"{word.encoder} tokens {', '.join(map(str, word.columns))}"
        if scores is not None:
            title += f"; attention {float(scores[i]):.4f}"
        spans.append(
            f'<span class="word{mark}" data-word="{i}" title="{html.escape(title)}" style="{style}">'
            f"{html.escape(word.text)}</span>"
        )
    return f'<div class="word-row" data-encoder="{encoder}"><b>{encoder}</b> ' + " ".join(spans) + "</div>"


def colour_scale(vmin: float, vmax: float, cmap: str, label: str) -> str:
    """A small HTML legend of the shared colour scale."""
    stops = ", ".join(
        "rgb({}, {}, {})".format(*(int(255 * v) for v in plt.get_cmap(cmap)(t)[:3]))
        for t in np.linspace(0, 1, 6)
    )
    return (
        f'<div class="scale"><span>{vmin:.3g}</span><span class="bar" style="background: linear-gradient(90deg, '
        f'{stops});"></span><span>{vmax:.3g}</span> <small>{html.escape(label)}</small></div>'
    )


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe slug of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "prompt"


def export_figure(
    generation: Generation, prompt: int, heat: np.ndarray | None, title: str, settings: dict, cmap="inferno"
) -> tuple[bytes, bytes]:
    """(PNG at EXPORT_DPI with ``settings`` in its metadata, SVG) of the images with ``heat`` on them."""
    result = generation.prompts[prompt]
    n = len(result.images)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n + 0.8, 3.4), squeeze=False)
    mesh = None
    if heat is not None:
        vmin, vmax = (-abs(heat).max(), abs(heat).max()) if cmap == "RdBu_r" else (heat.min(), heat.max())
    for i, (ax, name, image) in enumerate(zip(axes[0], generation.names, result.images, strict=True)):
        w, h = image.size
        ax.imshow(image)
        if heat is not None:
            mesh = ax.imshow(
                heat[i],
                cmap=cmap,
                alpha=HEAT_ALPHA,
                vmin=vmin,
                vmax=vmax,
                extent=(0, w, h, 0),
                interpolation="nearest",
            )
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if mesh is not None:
        fig.colorbar(mesh, ax=axes[0].tolist(), fraction=0.025, label="attention probability")
    fig.suptitle(title, fontsize=9)
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(svg, format="svg", bbox_inches="tight")
    fig.savefig(png, format="png", dpi=EXPORT_DPI, bbox_inches="tight")
    plt.close(fig)
    png.seek(0)
    info = PngInfo()
    info.add_text("sd3-attention", json.dumps(settings, sort_keys=True))
    out = io.BytesIO()
    Image.open(png).save(out, format="PNG", pnginfo=info, dpi=(EXPORT_DPI, EXPORT_DPI))
    return out.getvalue(), svg.getvalue()


def lora_norm_plot(norms: dict[str, dict[int, float]], num_blocks: int) -> Image.Image:
    """Per-block Frobenius norm of each checkpoint's LoRA weight change."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
