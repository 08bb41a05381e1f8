"""The two FID figures of the README: FID vs training step, FID vs guidance scale (best point marked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sd3_lora_celeba.io import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 4), dpi=120)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def plot_fid_vs_step(steps: Sequence[int], fids: Sequence[float], path: Path, title: str = "") -> None:
    plt, fig, ax = _figure()
    ax.plot(steps, fids, marker="o")
    ax.set_xlabel("Training step")
    ax.set_ylabel("FID")
    ax.set_title(title or "FID score vs. step")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_fid_vs_guidance(scales: Sequence[float], fids: Sequence[float], path: Path, title: str = "") -> None:
    plt, fig, ax = _figure()
    ax.plot(scales, fids, marker="o")
    best = min(range(len(fids)), key=lambda i: fids[i])
    ax.plot([scales[best]], [fids[best]], marker="*", markersize=16, color="tab:red", linestyle="none")
    ax.annotate(
        f"best {fids[best]:.2f} at {scales[best]:g}",
        (scales[best], fids[best]),
        textcoords="offset points",
        xytext=(8, 8),
    )
    ax.set_xlabel("Guidance scale")
    ax.set_ylabel("FID")
    ax.set_title(title or "FID score vs. guidance scale")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
