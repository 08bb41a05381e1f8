"""fid-vs-step, fid-vs-guidance, validation_fid and the README's FID section, on the tiny world."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3_lora_celeba import layout

FAST = ["--num-inference-steps", 2, "--num-images", 3, "--dims", 64]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_fid_vs_step_writes_csv_plot_and_resumes(world, tmp_path, run_cli):
    out = tmp_path / "fvs"
    r = run_cli("fid-vs-step", world.run, world.split, "--output-dir", out, *FAST, env=world.env)
    assert r.exit_code == 0, r.output
    rows = _csv(out / layout.FID_VS_STEP_CSV)
    assert [row["step"] for row in rows] == ["0", "2"]
    assert all(float(row["fid"]) > 0 for row in rows)
    assert (out / layout.FID_VS_STEP_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert len(list(layout.step_images_dir(out, 2).glob("*.png"))) == 3
    # The LoRA point equals generate-images with that LoRA (LoRA swapping in the sweep is clean).
    single = tmp_path / "single"
    args = ["--num-inference-steps", 2, "--num-images", 3, "--lora-weight-dir", world.lora]
    assert run_cli("generate-images", world.split, single, *args, env=world.env).exit_code == 0
    for p in single.glob("*.png"):
        a = np.asarray(Image.open(p)).astype(int)
        b = np.asarray(Image.open(layout.step_images_dir(out, 2) / p.name)).astype(int)
        assert np.abs(a - b).max() <= 1
    # Resume: finished rows are not recomputed (the image folders may even be gone).
    before = (out / layout.FID_VS_STEP_CSV).read_text()
    for p in layout.step_images_dir(out, 0).glob("*.png"):
        p.unlink()
    r = run_cli("fid-vs-step", world.run, world.split, "--output-dir", out, *FAST, env=world.env)
    assert r.exit_code == 0, r.output
    assert (out / layout.FID_VS_STEP_CSV).read_text() == before
    assert not list(layout.step_images_dir(out, 0).glob("*.png"))
    changed = run_cli(
        "fid-vs-step", world.run, world.split, "--output-dir", out, *FAST, "--seed", 5, env=world.env
    )
    assert changed.exit_code == 2 and "seed" in changed.output


def test_fid_vs_guidance_marks_best_and_validates_scales(world, tmp_path, run_cli):
    out = tmp_path / "fvg"
    r = run_cli(
        "fid-vs-guidance", world.split, "--output-dir", out, "--guidance-scales", "1,5", *FAST, env=world.env
    )
    assert r.exit_code == 0, r.output
    rows = _csv(out / layout.FID_VS_GUIDANCE_CSV)
    assert [float(row["guidance_scale"]) for row in rows] == [1.0, 5.0]
    assert (out / layout.FID_VS_GUIDANCE_PLOT).is_file()
    a = np.asarray(Image.open(layout.guidance_images_dir(out, 1.0) / "hq-00000.png")).astype(int)
    b = np.asarray(Image.open(layout.guidance_images_dir(out, 5.0) / "hq-00000.png")).astype(int)
    assert np.abs(a - b).mean() > 0.5
    bad = run_cli("fid-vs-guidance", world.split, "--guidance-scales", "1,x", env=world.env)
    assert bad.exit_code == 2 and "--guidance-scales" in bad.output


def test_validation_fid_matches_the_sweep_machinery(world, tmp_path):
    from sd3_lora_celeba.evaluate.validation import validation_fid
    from sd3_lora_celeba.models.loading import load_transformer

    transformer = load_transformer(str(world.model)).train()
    kwargs = dict(
        model_name=str(world.model),
        split_dir=world.split,
        empty_prompt_dir=None,
        num_images=3,
        guidance_scale=7.0,
        num_inference_steps=2,
        seed=0,
        inception_weights=world.inception_weights,
        dims=64,
    )
    value = validation_fid(transformer, work_dir=tmp_path / "v", **kwargs)
    assert transformer.training  # mode restored
    assert np.isfinite(value) and value > 0
    again = validation_fid(transformer, work_dir=tmp_path / "v", **kwargs)
    assert again == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
def test_readme_fid_section_runs_as_written(world, tmp_path, run_cli):
    """README 'Calculate FID Scores', commands as written; pytorch-fid finds the (random) weights in TORCH_HOME."""
    fid_root = tmp_path / "fid"
    gt, pre, tuned = fid_root / "ground-truth", fid_root / "pretrained", fid_root / "fine-tuned"
    steps = ["--num-inference-steps", 2]  # the only addition: keep the tiny run short
    assert run_cli("copy-images", world.split, gt, env=world.env).exit_code == 0
    assert run_cli("generate-images", world.split, pre, *steps, env=world.env).exit_code == 0
    r = run_cli("generate-images", world.split, tuned, *steps, "--lora-weight-dir", world.lora, env=world.env)
    assert r.exit_code == 0, r.output
    env = {**os.environ, "TORCH_HOME": str(world.torch_home), "OMP_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).with_name("pytorch-fid"))
    for folder in (gt, tuned):  # cd /path/to/fid/...; pytorch-fid --save-stats . stats.npz
        subprocess.run(
            [exe, "--save-stats", ".", "stats.npz"], cwd=folder, env=env, check=True, capture_output=True
        )
    out = subprocess.run(
        [exe, gt / "stats.npz", tuned / "stats.npz"], env=env, check=True, capture_output=True, text=True
    ).stdout
    theirs = float(out.split("FID:")[1].split()[0])
    # sd3 fid on the folders: same statistics (the stats.npz inside the folders is not an image) ...
    r = run_cli("fid", gt, tuned, "--num-workers", 0, env={"TORCH_HOME": str(world.torch_home)})
    assert r.exit_code == 0, r.output
    ours = float(r.output.split("FID:")[1].split()[0])
    assert ours == pytest.approx(theirs, abs=1e-4)
    for folder in (gt, tuned):
        with np.load(folder / "stats.npz") as a, np.load(folder / layout.FID_STATS) as b:
            assert np.allclose(a["mu"], b["mu"], atol=1e-6) and np.allclose(a["sigma"], b["sigma"], atol=1e-6)


def test_fid_vs_guidance_takes_skip_layer_guidance_and_checks_it_against_the_model(world, tmp_path, run_cli):
    import json

    out = tmp_path / "slg"
    slg = ["--skip-guidance-layers", "7,8", "--skip-layer-guidance-start", 0, "--skip-layer-guidance-stop", 1]
    base = ["fid-vs-guidance", world.split, "--output-dir", out, "--guidance-scales", "1,4", *FAST]
    r = run_cli(*base, *slg, env=world.env)
    assert r.exit_code == 0, r.output
    with_slg = json.loads((layout.guidance_images_dir(out, 4.0) / layout.GENERATION_SETTINGS).read_text())
    without = json.loads((layout.guidance_images_dir(out, 1.0) / layout.GENERATION_SETTINGS).read_text())
    assert with_slg["skip_guidance_layers"] == [7, 8] and "skip_guidance_layers" not in without  # no CFG at 1
    assert json.loads((out / layout.SWEEP_SETTINGS).read_text())["skip_guidance_layers"] == [7, 8]
    # A block the model does not have: one line, before any point is written.
    bad_out = tmp_path / "bad"
    r = run_cli(
        "fid-vs-guidance",
        world.split,
        "--output-dir",
        bad_out,
        *FAST,
        "--skip-guidance-layers",
        24,
        env=world.env,
    )
    assert r.exit_code == 2 and "--skip-guidance-layers 24" in r.output.strip().splitlines()[-1]
    assert not list(bad_out.glob("guidance-*/*.png"))
