"""compute-latent-dist: values equal the VAE's posterior, flips, dtypes, resume, interruption, stale caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd3_lora_celeba import layout
from sd3_lora_celeba.encode import latents as latents_mod


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def reference_pixels(image_path: Path, size: int) -> torch.Tensor:
    """The VAE input written out independently: centre square crop, Lanczos resize, [-1, 1]. (1, 3, S, S)."""
    image = Image.open(image_path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    x = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1)[None]
    return x / 127.5 - 1


def test_readme_command_matches_vae_posterior(tiny_env, tiny_pipe, make_dataset, run_cli):
    root = make_dataset()
    result = run_cli("compute-latent-dist", root, "--storage-dtype", "float32", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    files = sorted(root.rglob(layout.LATENT_DIST))
    assert [p.parent.name for p in files] == [f"ex-{i:03d}" for i in range(6)]
    vae = tiny_pipe.vae
    for path in files:
        tensors, meta = read_cache(path)
        # Native size of the tiny model (sample_size 8 x VAE factor 8), including the 96 x 80 example.
        assert meta["image_size"] == "64"
        assert float(meta["shift_factor"]) == pytest.approx(vae.config.shift_factor)
        assert float(meta["scaling_factor"]) == pytest.approx(vae.config.scaling_factor)
        assert meta["model_name"] == str(tiny_env)
        x = reference_pixels(path.parent / layout.IMAGE, 64)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            flip = vae.encode(x.flip(-1)).latent_dist
        for name, expected in (
            ("mean", dist.mean),
            ("logvar", dist.logvar),
            ("flip_mean", flip.mean),
            ("flip_logvar", flip.logvar),
        ):
            assert tensors[name].shape == (16, 8, 8)
            assert tensors[name].dtype == torch.float32
            torch.testing.assert_close(tensors[name], expected[0], atol=1e-5, rtol=1e-5)
        # The flip really is a different image's encoding.
        assert not torch.allclose(tensors["mean"], tensors["flip_mean"])
    assert read_cache(root / "train" / "ex-001" / layout.LATENT_DIST)[1]["source_size"] == "96x80"


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_storage_dtypes(tiny_sd3, make_dataset, run_cli, storage_dtype):
    root = make_dataset({"train": 1})
    example = root / "train" / "ex-000"
    assert (
        run_cli(
            "compute-latent-dist", example, "--model-name", tiny_sd3, "--storage-dtype", "float32"
        ).exit_code
        == 0
    )
    full, _ = read_cache(example / layout.LATENT_DIST)
    result = run_cli(
        "compute-latent-dist",
        example,
        "--model-name",
        tiny_sd3,
        "--storage-dtype",
        storage_dtype,
        "--overwrite",
    )
    assert result.exit_code == 0, result.output
    small, meta = read_cache(example / layout.LATENT_DIST)
    assert meta["storage_dtype"] == storage_dtype
    for name in ("mean", "logvar", "flip_mean", "flip_logvar"):
        assert small[name].dtype == getattr(torch, storage_dtype)
        torch.testing.assert_close(small[name].float(), full[name], atol=0.05, rtol=0.01)
    # Bytes per example as documented: 4 tensors x 16 x 8 x 8 values x 2 bytes, plus a small header.
    size = (example / layout.LATENT_DIST).stat().st_size
    assert 4 * 16 * 8 * 8 * 2 <= size < 4 * 16 * 8 * 8 * 2 + 2048


def test_image_size_option_resizes(tiny_sd3, make_dataset, run_cli):
    root = make_dataset({"train": 2})
    result = run_cli("compute-latent-dist", root / "train", "--model-name", tiny_sd3, "--image-size", "32")
    assert result.exit_code == 0, result.output
    tensors, meta = read_cache(root / "train" / "ex-001" / layout.LATENT_DIST)
    assert meta["image_size"] == "32"
    assert tensors["mean"].shape == (16, 4, 4)


def test_rerun_redoes_nothing_and_changed_image_is_redone(
    tiny_sd3, make_dataset, run_cli, mtimes, monkeypatch
):
    root = make_dataset()
    assert run_cli("compute-latent-dist", root, "--model-name", tiny_sd3).exit_code == 0
    before = mtimes(root, layout.LATENT_DIST)
    assert len(before) == 6

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished example was encoded again")

    monkeypatch.setattr(latents_mod, "encode_latent_dist", must_not_run)
    result = run_cli("compute-latent-dist", root, "--model-name", tiny_sd3)
    assert result.exit_code == 0, result.output
    assert mtimes(root, layout.LATENT_DIST) == before
    monkeypatch.undo()

    # Replacing one image makes only its cache stale.
    changed = root / "val" / "ex-005" / layout.IMAGE
    Image.new("RGB", (64, 64), (10, 200, 30)).save(changed)
    config = latents_mod.ComputeLatentDistConfig(dataset=root, model_name=str(tiny_sd3), num_workers=0)
    assert latents_mod.compute_latent_dist(config) == {"examples": 6, "written": 1}
    after = mtimes(root, layout.LATENT_DIST)
    assert [k for k in after if after[k] != before[k]] == ["ex-005"]


def test_interrupted_run_resumes_with_the_rest(tiny_sd3, make_dataset, mtimes, monkeypatch):
    root = make_dataset()
    real = latents_mod.encode_latent_dist
    calls = []

    def crash_after_first_batch(vae, pixel_values):
        calls.append(len(pixel_values))
        if len(calls) > 1:
            raise KeyboardInterrupt  # the user pressing Ctrl-C mid-run
        return real(vae, pixel_values)

    monkeypatch.setattr(latents_mod, "encode_latent_dist", crash_after_first_batch)
    config = latents_mod.ComputeLatentDistConfig(
        dataset=root, model_name=str(tiny_sd3), batch_size=2, num_workers=0
    )
    with pytest.raises(KeyboardInterrupt):
        latents_mod.compute_latent_dist(config)
    first = mtimes(root, layout.LATENT_DIST)
    assert len(first) == 2
    assert not list(root.rglob(".tmp-*")), "an interrupted write left a temporary file"

    monkeypatch.setattr(latents_mod, "encode_latent_dist", real)
    assert latents_mod.compute_latent_dist(config) == {"examples": 6, "written": 4}
    after = mtimes(root, layout.LATENT_DIST)
    assert len(after) == 6
    assert all(after[k] == first[k] for k in first)


def test_cache_from_other_settings_is_an_error(tiny_sd3, make_dataset, run_cli):
    root = make_dataset({"train": 2})
    assert run_cli("compute-latent-dist", root, "--model-name", tiny_sd3, "--image-size", "32").exit_code == 0
    result = run_cli("compute-latent-dist", root, "--model-name", tiny_sd3)
    assert result.exit_code == 2
    assert "latent_dist.safetensors" in result.output and "image_size='32'" in result.output
    assert "--overwrite" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert run_cli("compute-latent-dist", root, "--model-name", tiny_sd3, "--overwrite").exit_code == 0
    assert read_cache(root / "train" / "ex-000" / layout.LATENT_DIST)[1]["image_size"] == "64"


def test_bad_input_gives_one_line_errors(tiny_sd3, make_dataset, run_cli, tmp_path):
    root = make_dataset({"train": 2})
    (root / "train" / "ex-001" / layout.IMAGE).write_bytes(b"not a jpeg")
    result = run_cli("compute-latent-dist", root, "--model-name", tiny_sd3, "--num-workers", "0")
    assert result.exit_code == 2
    assert "ex-001" in result.output and "cannot read image" in result.output

    result = run_cli("compute-latent-dist", tmp_path / "nowhere", "--model-name", tiny_sd3)
    assert result.exit_code == 2 and "not found" in result.output
    result = run_cli("compute-latent-dist", root, "--image-size", "30")
    assert result.exit_code == 2 and "--image-size 30" in result.output
