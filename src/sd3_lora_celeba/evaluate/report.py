"""``sd3 report EXPERIMENT_DIR``: the results table, the score list and the two figures, rebuilt from the files.

Everything comes from ``experiment.json`` (the runs and the evaluation) and the score files below ``scores/``,
so the report can be redrawn at any time, also while an experiment is still running (missing scores show as a
dash). Written into the experiment folder:

* ``results.md``: the FID table in the README's layout (rows: Pretrained, then one per run; columns: caption
  variants; best value per column in bold; the number of images stated), then the same table for KID;
* ``results.csv``: the FID table as CSV; ``scores.csv``: every score with its bootstrap band and KID;
* ``fid_vs_step.{png,svg}``: one curve per run, step 0 = the pretrained model ("base");
* ``fid_vs_guidance.{png,svg}``: one curve per model of ``guidance_runs``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import argument, check_bounds
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.evaluate.plots import Curve, fid_figure, save_figure
from sd3_lora_celeba.io import TMP_PREFIX, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

PRETRAINED = "pretrained"  # the model name of the pretrained row (as in evaluate/experiment.py)
VARIANT_LABELS = {"blip2": "BLIP-2 Captions", "llama3": "Llama 3.1 Captions"}
FID_VS_STEP = "fid_vs_step"
FID_VS_GUIDANCE = "fid_vs_guidance"


@dataclass
class ReportConfig:
    experiment_dir: Path = argument("Experiment folder written by sd3 experiment.")

    def __post_init__(self) -> None:
        check_bounds(self)


def point_key(model: str, step: int, variant: str, guidance_scale: float) -> str:
    """The score's path below ``scores/`` without ``.json`` (``experiment.Point.relpath``)."""
    return f"{model}/step-{step:06d}/{variant}-g{guidance_scale:g}"


def load_record(out: Path) -> dict[str, Any]:
    path = Path(out) / layout.EXPERIMENT_RECORD
    if not path.is_file():
        raise InputError(f"{out}: no {layout.EXPERIMENT_RECORD}; pass a folder made by sd3 experiment")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise InputError(f"{path}: unreadable; re-run sd3 experiment to rewrite it") from None


def load_scores(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished score, by :func:`point_key`."""
    root = Path(out) / layout.EXPERIMENT_SCORES_DIR
    scores = {}
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if path.name.startswith(TMP_PREFIX):
            continue
        try:
            s = json.loads(path.read_text(encoding="utf-8"))
            scores[point_key(s["model"], s["step"], s["variant"], s["guidance_scale"])] = s
        except (ValueError, KeyError):
            log.warning("%s: unreadable score, ignored (delete it to recompute it)", path)
    return scores


def _table_score(record, scores, model: str, step: int, variant: str) -> dict[str, Any] | None:
    return scores.get(point_key(model, step, variant, record["evaluation"]["guidance_scale"]))


def _models(record: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(model, final step, row label): the pretrained row, then one per run."""
    return [(PRETRAINED, 0, "Pretrained")] + [
        (r["name"], r["final_step"], r["label"]) for r in record["runs"]
    ]


def guidance_models(record: dict[str, Any], scores: dict[str, dict[str, Any]]) -> list[str]:
    """The models swept over guidance: ``best`` = the run with the lowest table FID (first variant)."""
    ev = record["evaluation"]
    if not ev["guidance_scales"]:
        return []
    choice = ev["guidance_runs"]
    if choice == "all":
        return [r["name"] for r in record["runs"]]
    if choice != "best":
        return [n.strip() for n in choice.split(",") if n.strip()]
    variant = ev["caption_variants"][0]
    ranked = []
    for model, step, _ in _models(record)[1:]:
        s = _table_score(record, scores, model, step, variant)
        if s is None:
            return []  # not every run scored yet
        ranked.append((s["fid"], model))
    return [min(ranked)[1]] if ranked else []


# --- the table -----------------------------------------------------------------------------------------------


def table(record, scores, metric: str = "fid") -> tuple[list[str], list[list[str]], list[list[float | None]]]:
    """Header, formatted rows (best per column in bold) and raw values of the README's table."""
    variants = record["evaluation"]["caption_variants"]
    header = ["Model"] + [VARIANT_LABELS.get(v, f"{v} captions") for v in variants]
    values = []
    for model, step, _ in _models(record):
        row = []
        for v in variants:
            s = _table_score(record, scores, model, step, v)
            row.append(None if s is None else float(s[metric]))
        values.append(row)
    columns = [sorted(row[j] for row in values if row[j] is not None) for j in range(len(variants))]
    best = [col[0] if col else None for col in columns]
    scale = min((abs(x) for col in columns for x in col if x), default=10.0)
    decimals = 1 if scale >= 10 else 2 if scale >= 1 else 4
    # More decimals while the bold value would print like the runner-up.
    while decimals < 6 and any(
        len(c) > 1 and c[0] != c[1] and f"{c[0]:.{decimals}f}" == f"{c[1]:.{decimals}f}" for c in columns
    ):
        decimals += 1
    rows = []
    for (_, _, label), row in zip(_models(record), values, strict=True):
        cells = []
        for j, x in enumerate(row):
            text = "—" if x is None else f"{x:.{decimals}f}"
            cells.append(f"**{text}**" if x is not None and x == best[j] and len(values) > 1 else text)
        rows.append([label, *cells])
    return header, rows, values


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def _num_images(scores: dict[str, dict[str, Any]]) -> str:
    counts = sorted({s["num_images"] for s in scores.values()})
    return " or ".join(map(str, counts)) if counts else "no"


def _caption(record, scores) -> str:
    ev = record["evaluation"]
    n = _num_images(scores)
    return (
        f"FID of {n} generated images per cell against the same {n} ground-truth images of "
        f"`{Path(ev['split_dir']).name}` (guidance scale {ev['guidance_scale']:g}, {ev['num_inference_steps']} "
        f"denoising steps, seed {ev['seed']}, last checkpoint of each run); lower is better, best in bold."
    )


def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# --- the figures ---------------------------------------------------------------------------------------------


def _curve(label: str, points: list[tuple[float, dict[str, Any]]]) -> Curve:
    points = sorted(points, key=lambda p: p[0])
    return Curve(
        label,
        [x for x, _ in points],
        [s["fid"] for _, s in points],
        [s["fid_low"] for _, s in points],
        [s["fid_high"] for _, s in points],
    )


def step_figure(record, scores):
    """FID vs training step, one curve per run (step 0 = pretrained), or None when nothing is scored yet."""
    ev = record["evaluation"]
    variant, g = ev["caption_variants"][0], ev["guidance_scale"]
    base = scores.get(point_key(PRETRAINED, 0, variant, g))
    curves = []
    for run in record["runs"]:
        points = [(0, base)] if base else []
        points += [
            (s, scores[k]) for s in run["steps"] if (k := point_key(run["name"], s, variant, g)) in scores
        ]
        if len(points) > 1 or (points and not base):
            curves.append(_curve(run["label"], points))
    if not curves:
        return None
    title = (
        f"FID vs. training step\n{_num_images(scores)} images per point, "
        f"{VARIANT_LABELS.get(variant, variant)}, guidance {g:g}, 95% bootstrap bands"
    )
    return fid_figure(curves, xlabel="Training step", title=title, base_at_zero=True)


def guidance_figure(record, scores):
    """FID vs guidance scale, one curve per swept model (last checkpoint), or None."""
    ev = record["evaluation"]
    variant = ev["caption_variants"][0]
    labels = {m: label for m, _, label in _models(record)}
    finals = {m: step for m, step, _ in _models(record)}
    curves = []
    for model in guidance_models(record, scores):
        points = [
            (g, scores[k])
            for g in ev["guidance_scales"]
            if (k := point_key(model, finals[model], variant, g)) in scores
        ]
        if points:
            curves.append(_curve(labels[model], points))
    if not curves:
        return None
    title = (
        f"FID vs. guidance scale\n{_num_images(scores)} images per point, "
        f"{VARIANT_LABELS.get(variant, variant)}, 95% bootstrap bands"
    )
    return fid_figure(curves, xlabel="Guidance scale", title=title)


# --- writing -------------------------------------------------------------------------------------------------


def write_report(out: Path) -> str:
    """Write results.md / results.csv / scores.csv and both figures; return the FID table as markdown."""
    out = Path(out)
    record = load_record(out)
    scores = load_scores(out)
    header, fid_rows, fid_values = table(record, scores, "fid")
    fid_md = markdown_table(header, fid_rows)
    kid_header, kid_rows, _ = table(record, scores, "kid")
    parts = ["# Results", "", _caption(record, scores), "", fid_md, ""]
    parts += [
        "KID (unbiased, polynomial kernel) of the same images:",
        "",
        markdown_table(kid_header, kid_rows),
        "",
    ]
    for name, figure in (
        (FID_VS_STEP, step_figure(record, scores)),
        (FID_VS_GUIDANCE, guidance_figure(record, scores)),
    ):
        paths = [out / f"{name}.{fmt}" for fmt in layout.FIGURE_FORMATS]
        if figure is None:
            continue
        save_figure(figure, *paths)
        parts += [f"![{name}]({name}.png)", ""]
    parts += [f"Every score, its 95% bootstrap band and KID: [{layout.SCORES_CSV}]({layout.SCORES_CSV}).", ""]
    atomic_write_text(out / layout.RESULTS_MD, "\n".join(parts))
    csv_rows = [header] + [
        [label, *("" if x is None else repr(x) for x in row)]
        for (_, _, label), row in zip(_models(record), fid_values, strict=True)
    ]
    atomic_write_text(out / layout.RESULTS_CSV, _csv_text(csv_rows))
    atomic_write_text(out / layout.SCORES_CSV, _csv_text(_score_rows(scores)))
    return fid_md + "\n\n" + _caption(record, scores)


def _score_rows(scores: dict[str, dict[str, Any]]) -> list[list[Any]]:
    keys = ["model", "step", "variant", "guidance_scale", "num_images", "fid", "fid_low", "fid_high"]
    keys += ["fid_bootstrap_std", "kid", "kid_std"]
    return [keys] + [[scores[k].get(c) for c in keys] for k in sorted(scores)]


def report(config: ReportConfig) -> dict[str, Any]:
    """The ``report`` command: rebuild and print the table; returns it."""
    out = Path(config.experiment_dir)
    if not out.is_dir():
        raise InputError(f"{out}: experiment folder not found; pass the output folder of sd3 experiment")
    text = write_report(out)
    click.echo(text)
    log.info("report: %s, %s and the figures rewritten in %s", layout.RESULTS_MD, layout.RESULTS_CSV, out)
    return {"output_dir": str(out), "table": text}


# --- manifest ------------------------------------------------------------------------------------------------


def _files_fingerprint(paths: list[Path], root: Path) -> str:
    entries = []
    for p in paths:
        if p.is_file():
            st = p.stat()
            entries.append(
                [str(p.relative_to(root)) if p.is_relative_to(root) else str(p), st.st_size, st.st_mtime_ns]
            )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _cache_files(example_dirs: list[Path]) -> list[Path]:
    names = [layout.LATENT_DIST, layout.IMAGE] + [layout.prompt_embeds_file(i) for i in (1, 2, 3)]
    return [d / n for d in example_dirs for n in names]


def git_revision() -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout this package runs from, when it is a git checkout."""
    package = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
        if len(top) != 2 or (Path(top[0]) / "src" / package.name).resolve() != package:
            return None
        dirty = subprocess.run(
            ["git", "-C", top[0], "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": top[1], "dirty": bool(dirty)}


def write_manifest(out: Path, record: dict[str, Any], examples: list[Path]) -> dict[str, Any]:
    """``manifest.json``: what produced the numbers (versions, revision, config hash, caches, device)."""
    import importlib.metadata
    import platform
    import sys

    import torch

    from sd3_lora_celeba import __version__, parallel
    from sd3_lora_celeba.evaluate.fid import default_inception_weights_path, file_sha256, load_stats

    libraries = {}
    for lib in ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "pytorch-fid"):
        try:
            libraries[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            libraries[lib] = None
    for lib in ("numpy", "scipy", "matplotlib", "safetensors"):
        libraries[lib] = importlib.metadata.version(lib)
    state = parallel.process_state()
    device = {"type": state.device.type, "processes": state.num_processes, "torch_cuda": torch.version.cuda}
    if state.device.type == "cuda":
        device["name"] = torch.cuda.get_device_name(state.device)
    ev = record["evaluation"]
    weights = Path(ev["inception_weights"]) if ev["inception_weights"] else default_inception_weights_path()
    gt_stats = out / layout.GROUND_TRUTH_DIR / layout.FID_STATS
    caches: dict[str, Any] = {
        "inception_weights_sha256": file_sha256(weights) if weights.is_file() else None,
        "ground_truth_fid_stats": load_stats(gt_stats)[1] if gt_stats.is_file() else None,
        "evaluation_split": _files_fingerprint(_cache_files(examples), Path(ev["split_dir"])),
        "train": {},
        "lora_sha256": {},
    }
    for run in record["runs"]:
        train_dir = Path(run["config"]["train_dir"])
        if str(train_dir) not in caches["train"]:
            caches["train"][str(train_dir)] = _files_fingerprint(
                _cache_files(layout.find_example_dirs(train_dir)), train_dir
            )
        for ckpt in layout.list_checkpoints(run["config"]["output_dir"]):
            caches["lora_sha256"][f"{run['name']}/{ckpt.name}"] = file_sha256(ckpt / layout.LORA_WEIGHTS)
    manifest = {
        "package": {"name": "sd3-lora-celeba", "version": __version__, "git": git_revision()},
        "config": {"file": record["config_file"], "sha256": record["config_sha256"]},
        "libraries": libraries,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "caches": caches,
    }
    atomic_write_json(out / layout.EXPERIMENT_MANIFEST, manifest)
    return manifest
