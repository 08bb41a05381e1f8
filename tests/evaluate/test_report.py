"""The results table, the figures and the bootstrap, from synthetic score files (no model needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sd3_lora_celeba import layout
from sd3_lora_celeba.evaluate import report as R
from sd3_lora_celeba.evaluate.bootstrap import FidResampler, bootstrap_fid
from sd3_lora_celeba.evaluate.fid import FidStats, frechet_distance
from sd3_lora_celeba.io import atomic_write_json

RUNS = [("logit_mean=-0.5", "Fine-Tuned with $m = -0.5$"), ("logit_mean=0.5", "Fine-Tuned with $m = 0.5$")]


def _record(tmp_path: Path) -> dict:
    return {
        "config_file": "exp.yaml",
        "config_sha256": "0" * 64,
        "pretrained": {"model_name": "m", "model_revision": None},
        "evaluation": {
            "split_dir": str(tmp_path / "val"),
            "caption_variants": ["blip2", "llama3"],
            "guidance_scale": 7.0,
            "guidance_scales": [1.0, 3.0, 5.0],
            "guidance_runs": "best",
            "num_inference_steps": 28,
            "seed": 0,
        },
        "runs": [
            {"name": name, "label": label, "final_step": 4, "steps": [2, 4], "varying": {}, "config": {}}
            for name, label in RUNS
        ],
    }


def _score(out: Path, model: str, step: int, variant: str, g: float, fid: float) -> None:
    key = R.point_key(model, step, variant, g)
    score = {"model": model, "step": step, "variant": variant, "guidance_scale": g, "num_images": 1000}
    score.update(
        fid=fid, fid_low=fid - 1, fid_high=fid + 1, fid_bootstrap_std=0.5, kid=fid / 1000, kid_std=0.0
    )
    atomic_write_json(out / layout.EXPERIMENT_SCORES_DIR / f"{key}.json", score)


@pytest.fixture
def experiment_dir(tmp_path) -> Path:
    out = tmp_path / "exp"
    atomic_write_json(out / layout.EXPERIMENT_RECORD, _record(tmp_path))
    # The README's table, FID vs step for both runs, FID vs guidance for the best run (m = -0.5).
    for variant, values in (("blip2", (80.0, 24.3, 32.0)), ("llama3", (88.2, 31.1, 31.6))):
        _score(out, "pretrained", 0, variant, 7.0, values[0])
        _score(out, "logit_mean=-0.5", 4, variant, 7.0, values[1])
        _score(out, "logit_mean=0.5", 4, variant, 7.0, values[2])
    _score(out, "logit_mean=-0.5", 2, "blip2", 7.0, 40.0)
    _score(out, "logit_mean=0.5", 2, "blip2", 7.0, 45.0)
    for g, fid in ((1.0, 60.0), (3.0, 18.11), (5.0, 22.0)):
        _score(out, "logit_mean=-0.5", 4, "blip2", g, fid)
    return out


def test_table_has_the_readme_layout_with_best_in_bold(experiment_dir):
    text = R.write_report(experiment_dir)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["Model", "BLIP-2 Captions", "Llama 3.1 Captions"]
    assert cells[2] == ["Pretrained", "80.0", "88.2"]
    assert cells[3] == ["Fine-Tuned with $m = -0.5$", "**24.3**", "**31.1**"]
    assert cells[4] == ["Fine-Tuned with $m = 0.5$", "32.0", "31.6"]
    assert "1000 generated images" in text
    md = (experiment_dir / layout.RESULTS_MD).read_text()
    assert "KID" in md and "fid_vs_step.png" in md and "fid_vs_guidance.png" in md
    with open(experiment_dir / layout.RESULTS_CSV, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Model", "BLIP-2 Captions", "Llama 3.1 Captions"]
    assert [r[0] for r in rows[1:]] == ["Pretrained", *[label for _, label in RUNS]]
    assert float(rows[2][1]) == 24.3
    with open(experiment_dir / layout.SCORES_CSV, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 11


def test_missing_scores_show_as_a_dash_and_no_best_guidance_run(experiment_dir):
    (experiment_dir / layout.EXPERIMENT_SCORES_DIR / "logit_mean=0.5/step-000004/blip2-g7.json").unlink()
    record, scores = R.load_record(experiment_dir), R.load_scores(experiment_dir)
    _, rows, _ = R.table(record, scores)
    assert rows[2][1] == "—"
    assert R.guidance_models(record, scores) == []  # "best" needs every run's score


def test_step_figure_has_one_curve_per_run_base_label_and_bands(experiment_dir):
    fig = R.step_figure(R.load_record(experiment_dir), R.load_scores(experiment_dir))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "Training step" and ax.get_ylabel() == "FID"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [label for _, label in RUNS]
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(curves) == 2
    assert list(curves[0].get_xdata()) == [0, 2, 4] and list(curves[0].get_ydata()) == [80.0, 40.0, 24.3]
    assert len(ax.collections) == 2  # one band per run
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "base" and "4" in labels
    assert "1000 images" in ax.get_title()


def test_guidance_figure_marks_the_best_inside_the_axes(experiment_dir):
    fig = R.guidance_figure(R.load_record(experiment_dir), R.load_scores(experiment_dir))
    (ax,) = fig.axes
    assert ax.get_xlabel() == "Guidance scale"
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert len(curves) == 1 and list(curves[0].get_xdata()) == [1.0, 3.0, 5.0]
    (note,) = ax.texts
    assert note.get_text() == "best 18.11 at 3"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, axes_box = note.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and box.y1 <= axes_box.y1


def test_report_command_writes_both_figures_as_png_and_svg(experiment_dir, run_cli):
    r = run_cli("report", experiment_dir)
    assert r.exit_code == 0, r.output
    assert "**24.3**" in r.output
    for name in ("fid_vs_step", "fid_vs_guidance"):
        assert (experiment_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        svg = (experiment_dir / f"{name}.svg").read_text()
        assert "FID" in svg  # text kept as text
    svg = (experiment_dir / "fid_vs_step.svg").read_text()
    assert ">base<" in svg and "Training step" in svg and svg.count("Fine-Tuned with") == 2
    from PIL import Image

    with Image.open(experiment_dir / "fid_vs_step.png") as im:
        assert round(im.info["dpi"][0]) == 300
    missing = run_cli("report", experiment_dir / "nope")
    assert missing.exit_code == 2 and "nope" in missing.output


def test_bootstrap_equals_pytorch_fid_on_the_full_sample_and_spreads():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    gen = (rng.normal(size=(30, 16)) * 1.2 + 0.3).astype(np.float32)
    a, b = FidStats.from_features(real), FidStats.from_features(gen)
    full = FidResampler(a.mu, a.sigma, gen).fid(np.arange(len(gen)))
    assert full == pytest.approx(frechet_distance(a, b), rel=1e-6)
    boot = bootstrap_fid(a.mu, a.sigma, gen, num_samples=50, seed=1)
    assert boot.std > 0 and boot.low < boot.high
    assert bootstrap_fid(a.mu, a.sigma, gen, num_samples=50, seed=1) == boot  # seeded
    assert json.dumps(boot.__dict__)
