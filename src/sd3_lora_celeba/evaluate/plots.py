"""The FID figures: FID vs training step and FID vs guidance scale, one curve per model, for a paper.

Each curve may carry a 95 % band (the experiment's bootstrap over generated images). Step 0 is the base model
and is labelled "base". The best point of the figure is marked and its label is kept inside the axes. Figures
are built with matplotlib's object API (no pyplot state, no display needed) and saved at 300 dpi; SVGs keep
their text as text (``svg.fonttype: none``) so it stays editable and searchable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sd3_lora_celeba.io import atomic_path

DPI = 300


@dataclass
class Curve:
    """One model's points: x (steps or guidance scales), FID, and optionally the band's lower/upper edges."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None


def fid_figure(
    curves: Sequence[Curve],
    *,
    xlabel: str,
    title: str,
    ylabel: str = "FID",
    base_at_zero: bool = False,
    mark_best: bool = True,
):
    """A matplotlib ``Figure`` with one line (and band) per curve; ``base_at_zero`` labels x = 0 "base"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.4, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a drawable canvas without pyplot (files only, no display)
    ax = fig.add_subplot()
    for curve in curves:
        order = sorted(range(len(curve.x)), key=lambda i: curve.x[i])
        x = [curve.x[i] for i in order]
        (line,) = ax.plot(x, [curve.y[i] for i in order], marker="o", markersize=4, label=curve.label)
        if curve.low is not None and curve.high is not None:
            ax.fill_between(
                x,
                [curve.low[i] for i in order],
                [curve.high[i] for i in order],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    xs = sorted({float(v) for c in curves for v in c.x})
    if 0 < len(xs) <= 12:
        ax.set_xticks(xs)
    if base_at_zero:
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: "base" if v == 0 else f"{v:g}"))
    points = [(x, y) for c in curves for x, y in zip(c.x, c.y, strict=True)]
    if mark_best and points:
        _mark_best(ax, points, xs, base_at_zero)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.06, y=0.18)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or any(c.low is not None for c in curves):
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    return fig


def _mark_best(ax, points: list[tuple[float, float]], xs: list[float], base_at_zero: bool) -> None:
    """Star the lowest FID and label it, the label pointing into the axes so it is never clipped."""
    bx, by = min(points, key=lambda p: p[1])
    ax.plot([bx], [by], marker="*", markersize=13, color="black", linestyle="none", zorder=5)
    right_half = len(xs) > 1 and bx > (xs[0] + xs[-1]) / 2
    ax.annotate(
        f"best {by:.4g} at {'base' if base_at_zero and bx == 0 else f'{bx:g}'}",
        (bx, by),
        textcoords="offset points",
        xytext=(-10 if right_half else 10, 10),
        ha="right" if right_half else "left",
        va="bottom",
        fontsize=8,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0},
    )


def save_figure(fig, *paths: Path) -> None:
    """Save ``fig`` to each path (format from the suffix), atomically, at 300 dpi, text kept as SVG text."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for path in paths:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=DPI, bbox_inches="tight")


def plot_fid_vs_step(steps: Sequence[int], fids: Sequence[float], path: Path, title: str = "") -> None:
    """One run's FID against training step (step 0 = base model), as ``sd3 fid-vs-step`` writes it."""
    fig = fid_figure(
        [Curve("FID", steps, fids)],
        xlabel="Training step",
        title=title or "FID vs. training step",
        base_at_zero=True,
    )
    save_figure(fig, path)


def plot_fid_vs_guidance(scales: Sequence[float], fids: Sequence[float], path: Path, title: str = "") -> None:
    """One model's FID against guidance scale, best scale marked, as ``sd3 fid-vs-guidance`` writes it."""
    fig = fid_figure(
        [Curve("FID", scales, fids)], xlabel="Guidance scale", title=title or "FID vs. guidance scale"
    )
    save_figure(fig, path)
