"""generate-images: per-image seeds, resume, settings guard, LoRA."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.sample.generate import derive_seed, initial_latents

FAST = ["--num-inference-steps", 2]


def _pixels(folder, name):
    return np.asarray(Image.open(folder / name)).astype(int)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "hq-00001") == derive_seed(0, "hq-00001")
    assert len({derive_seed(0, "hq-00001"), derive_seed(1, "hq-00001"), derive_seed(0, "hq-00002")}) == 3
    assert 0 <= derive_seed(2**40, "x") < 2**63


def test_initial_latents_do_not_depend_on_the_batch():
    ids = ["a", "b", "c"]
    batch = initial_latents(ids, 7, (16, 8, 8))
    single = torch.cat([initial_latents([i], 7, (16, 8, 8)) for i in ids])
    assert torch.equal(batch, single)
    assert not torch.equal(batch[0], batch[1])


def test_images_do_not_depend_on_batch_size_and_resume(world, tmp_path, cli_run):
    one, three = tmp_path / "b1", tmp_path / "b3"
    r1 = cli_run("generate-images", world.split, one, *FAST, "--batch-size", 1, env=world.env)
    assert r1.exit_code == 0, r1.output
    r3 = cli_run("generate-images", world.split, three, *FAST, "--batch-size", 3, env=world.env)
    assert r3.exit_code == 0, r3.output
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(f"{d.name}.png" for d in world.split.iterdir())
    other = _pixels(one, names[1])
    for name in names:
        a, b = _pixels(one, name), _pixels(three, name)
        # Same noise; batched matmuls may round a handful of pixels the other way, never more than one level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
        if name != names[1]:
            assert np.abs(a - other).mean() > 5  # different examples really differ
    settings = json.loads((one / layout.GENERATION_SETTINGS).read_text())
    assert settings["num_inference_steps"] == 2 and settings["lora"] is None
    # Resume: a deleted image is regenerated, the others are left alone.
    mtimes = {n: (one / n).stat().st_mtime_ns for n in names}
    (one / names[0]).unlink()
    again = cli_run("generate-images", world.split, one, *FAST, "--batch-size", 2, env=world.env)
    assert again.exit_code == 0, again.output
    assert all((one / n).stat().st_mtime_ns == mtimes[n] for n in names[1:])
    assert np.abs(_pixels(one, names[0]) - _pixels(three, names[0])).max() <= 1
    # Other settings into the same folder are refused.
    refused = cli_run("generate-images", world.split, one, "--num-inference-steps", 3, env=world.env)
    assert refused.exit_code == 2 and "num_inference_steps" in refused.output


def test_lora_changes_images_and_bad_lora_is_one_line_error(world, tmp_path, cli_run):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    args = [*FAST, "--num-images", 2]
    assert cli_run("generate-images", world.split, base, *args, env=world.env).exit_code == 0
    r = cli_run("generate-images", world.split, tuned, *args, "--lora-weight-dir", world.lora, env=world.env)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tuned.glob("*.png")) == ["hq-00000.png", "hq-00001.png"]
    assert np.abs(_pixels(base, "hq-00000.png") - _pixels(tuned, "hq-00000.png")).mean() > 1
    # A LoRA whose shapes do not fit the model.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-lora"
    bad.mkdir()
    state = load_file(world.lora / layout.LORA_WEIGHTS)
    save_file(
        {k: torch.zeros(v.shape[0] + 3, v.shape[1]) for k, v in state.items()}, bad / layout.LORA_WEIGHTS
    )
    r = cli_run(
        "generate-images", world.split, tmp_path / "x", *args, "--lora-weight-dir", bad, env=world.env
    )
    assert r.exit_code == 2, r.output
    error = r.output.strip().splitlines()[-1]  # earlier lines: diffusers' loading bar
    assert "bad-lora" in error and "does not fit" in error
    missing = cli_run(
        "generate-images", world.split, tmp_path / "y", "--lora-weight-dir", tmp_path, env=world.env
    )
    assert missing.exit_code == 2 and layout.LORA_WEIGHTS in missing.output
