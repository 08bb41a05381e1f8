"""FID maths, statistics cache and agreement with the pytorch-fid command (random Inception weights)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from sd3_lora_celeba import layout
from sd3_lora_celeba.evaluate import fid as F

PYTORCH_FID = str(Path(sys.executable).with_name("pytorch-fid"))


def _images(folder: Path, n: int, seed: int, stripe: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        if stripe:
            img[:, :24] = stripe
        Image.fromarray(img).save(folder / f"img-{i:03d}.png")
    return folder


def _pytorch_fid(*args: object, torch_home: Path, cwd: Path | None = None) -> str:
    env = {**os.environ, "TORCH_HOME": str(torch_home), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [PYTORCH_FID, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    return out.stdout


def _fid_value(output: str) -> float:
    return float(re.search(r"FID:\s+(\S+)", output).group(1))


def test_frechet_distance_matches_closed_form_of_two_gaussians():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)).
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = F.frechet_distance(F.FidStats(mu1, np.diag(s1)), F.FidStats(mu2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-9)
    # Full covariances, closed form through the symmetric square root.
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    r1 = linalg.sqrtm(c1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(r1 @ c2 @ r1).real)
    assert F.frechet_distance(F.FidStats(mu1, c1), F.FidStats(mu2, c2)) == pytest.approx(expected, rel=1e-7)


def test_statistics_of_gaussian_samples_give_the_closed_form():
    rng = np.random.default_rng(1)
    n, d = 20000, 4
    x = rng.normal(0.0, 1.0, (n, d))
    y = rng.normal(1.0, 2.0, (n, d))
    fid = F.frechet_distance(F.FidStats.from_features(x), F.FidStats.from_features(y))
    expected = d * 1.0**2 + d * (1 + 4 - 2 * 2)  # |mu diff|^2 + Tr(1 + 4 - 2 sqrt(4)) per dim
    assert fid == pytest.approx(expected, rel=0.05)
    assert F.frechet_distance(F.FidStats.from_features(x), F.FidStats.from_features(x)) == pytest.approx(
        0, abs=1e-8
    )


def test_kid_is_zero_in_expectation_for_one_distribution_and_positive_otherwise():
    rng = np.random.default_rng(2)
    x, y, z = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), rng.normal(1.0, 1.0, (200, 16))
    same, _ = F.kernel_inception_distance(x, y, num_subsets=20, subset_size=100)
    different, _ = F.kernel_inception_distance(x, z, num_subsets=20, subset_size=100)
    assert abs(same) < 0.05 < different


def test_same_folder_is_zero_and_different_folders_are_far(world, tmp_path, run_cli):
    a = _images(tmp_path / "a", 6, seed=0)
    b = _images(tmp_path / "b", 6, seed=1, stripe=30)
    args = ["--dims", 64, "--num-workers", 0, "--inception-weights", world.inception_weights]
    same = run_cli("fid", a, a, *args)
    assert same.exit_code == 0, same.output
    different = run_cli("fid", a, b, *args, "--kid", "--kid-subsets", 5)
    assert different.exit_code == 0, different.output
    assert abs(_fid_value(same.output)) < 1e-6
    assert _fid_value(different.output) > 1.0
    assert "KID:" in different.output


def test_sd3_fid_equals_pytorch_fid_command(world, tmp_path, run_cli):
    a = _images(tmp_path / "a", 6, seed=0)
    b = _images(tmp_path / "b", 5, seed=3, stripe=200)
    theirs = _fid_value(_pytorch_fid("--dims", 64, "--num-workers", 0, a, b, torch_home=world.torch_home))
    # Default weights path = pytorch-fid's own file in TORCH_HOME; the cache file must not disturb pytorch-fid.
    ours = run_cli("fid", a, b, "--dims", 64, "--num-workers", 0, env={"TORCH_HOME": str(world.torch_home)})
    assert ours.exit_code == 0, ours.output
    assert (a / layout.FID_STATS).is_file()
    assert _fid_value(ours.output) == pytest.approx(theirs, abs=1e-4)
    again = _fid_value(_pytorch_fid("--dims", 64, "--num-workers", 0, a, b, torch_home=world.torch_home))
    assert again == pytest.approx(theirs, abs=1e-9)
    # pytorch-fid reads our cache as a statistics file.
    from_cache = _fid_value(
        _pytorch_fid(a / layout.FID_STATS, b / layout.FID_STATS, torch_home=world.torch_home)
    )
    assert from_cache == pytest.approx(theirs, abs=1e-4)


def test_stats_cache_reused_until_a_file_changes(world, tmp_path, monkeypatch):
    folder = _images(tmp_path / "a", 4, seed=0)
    inception = F.load_inception(64, world.inception_weights, "cpu")
    first = F.folder_statistics(folder, inception)
    calls = []
    real = F.image_features
    monkeypatch.setattr(F, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = F.folder_statistics(folder, inception)
    assert calls == [] and np.array_equal(first.mu, again.mu)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(folder / "img-001.png")  # change one image
    changed = F.folder_statistics(folder, inception)
    assert calls == [1] and not np.allclose(first.mu, changed.mu)
    assert layout.FID_STATS not in [p.name for p in F.list_images(folder)]


def test_bad_inputs_give_one_line_errors(world, tmp_path, run_cli):
    a = _images(tmp_path / "a", 3, seed=0)
    missing = run_cli("fid", a, tmp_path / "nope", "--inception-weights", world.inception_weights)
    assert (
        missing.exit_code == 2 and "nope" in missing.output and len(missing.output.strip().splitlines()) == 1
    )
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    junk = run_cli("fid", a, a, "--inception-weights", tmp_path / "junk.pth")
    assert junk.exit_code == 2 and "junk.pth" in junk.output
    bad_dims = run_cli("fid", a, a, "--dims", 100)
    assert bad_dims.exit_code == 2 and "--dims" in bad_dims.output
    if not torch.cuda.is_available():
        no_cuda = run_cli("fid", a, a, "--device", "cuda", "--inception-weights", world.inception_weights)
        assert (
            no_cuda.exit_code == 2
            and len(no_cuda.output.strip().splitlines()) == 1
            and "--device" in no_cuda.output
        )


def test_copy_images_flat_resumable_and_symlinks(world, tmp_path, run_cli):
    out = tmp_path / "gt"
    first = run_cli("copy-images", world.split, out)
    assert first.exit_code == 0, first.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{d.name}.jpg" for d in world.split.iterdir())
    assert (out / names[0]).read_bytes() == (world.split / names[0][:-4] / layout.IMAGE).read_bytes()
    mtime = (out / names[0]).stat().st_mtime_ns
    run_cli("copy-images", world.split, out)
    assert (out / names[0]).stat().st_mtime_ns == mtime  # resumed: not rewritten
    links = tmp_path / "links"
    assert run_cli("copy-images", world.split, links, "--symlink", "--relative-symlinks").exit_code == 0
    link = links / names[0]
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.read_bytes() == (out / names[0]).read_bytes()


def test_copy_images_refuses_duplicate_ids(world, tmp_path, run_cli):
    root = tmp_path / "ds"
    shutil.copytree(world.split, root / "test")
    shutil.copytree(world.split / "hq-00000", root / "val" / "hq-00000")
    result = run_cli("copy-images", root, tmp_path / "out")
    assert result.exit_code == 2 and "hq-00000" in result.output


def test_statistics_equal_pytorch_fid_functions_on_the_same_images(world, tmp_path):
    from pytorch_fid.fid_score import calculate_activation_statistics

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(7):  # not 299 px, so both resize; JPEG and PNG as a user's folder may hold
        img = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
        img.save(folder / f"{i}.{'jpg' if i % 2 else 'png'}", quality=90)
    files = F.list_images(folder)
    inception = F.load_inception(64, world.inception_weights, "cpu")
    mu, sigma = calculate_activation_statistics(
        [str(f) for f in files], inception.model, batch_size=3, dims=64, device="cpu", num_workers=0
    )
    for workers in (0, 1):
        ours = F.FidStats.from_features(F.image_features(files, inception, batch_size=3, num_workers=workers))
        assert np.abs(ours.mu - mu).max() < 1e-6 and np.abs(ours.sigma - sigma).max() < 1e-6
        assert ours.count == 7


def test_unreadable_or_odd_images_and_small_sets_are_the_projects_one_line(world, tmp_path, run_cli):
    good = _images(tmp_path / "good", 4, seed=0)
    bad = _images(tmp_path / "bad", 4, seed=1)
    jpeg = bad / "img-002.jpg"
    Image.open(bad / "img-002.png").save(jpeg, quality=90)
    (bad / "img-002.png").unlink()
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])  # truncated
    args = ["--dims", 64, "--num-workers", 0, "--inception-weights", world.inception_weights]
    r = run_cli("fid", good, bad, *args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "img-002.jpg" in lines[0], r.output
    # Two sizes in one folder: named, one line.
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(bad / "img-002.png")
    jpeg.unlink()
    r = run_cli("fid", good, bad, *args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "img-002.png" in r.output
    # Fewer images than feature dimensions: the project's warning, not pytorch-fid's singular-matrix print.
    (bad / "img-002.png").unlink()
    r = run_cli("fid", good, bad, *args)
    assert r.exit_code == 0, r.output
    assert "not reliable" in r.output and "singular product" not in r.output
    assert sum("not reliable" in line for line in r.output.splitlines()) == 1


def test_inception_weights_file_does_not_pin_the_hub_folder(world, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home-a"))
    F.load_inception(64, world.inception_weights, "cpu")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home-b"))
    assert Path(torch.hub.get_dir()) == tmp_path / "home-b" / "hub"
    assert F.default_inception_weights_path().parent == tmp_path / "home-b" / "hub" / "checkpoints"
