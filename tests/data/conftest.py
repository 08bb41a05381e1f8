"""Synthetic CelebAMask-HQ + CelebA releases shared by the data tests (copy before corrupting them); ``run_cli``
comes from tests/conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import Result

from sd3_lora_celeba.testing.celeba_synth import (
    SyntheticCelebARelease,
    SyntheticHQRelease,
    make_celeba_hq_release,
    make_celeba_release,
)


@pytest.fixture(scope="session")
def releases(tmp_path_factory) -> tuple[SyntheticHQRelease, SyntheticCelebARelease]:
    root = tmp_path_factory.mktemp("releases")
    hq = make_celeba_hq_release(root / "CelebAMask-HQ", num_images=40, image_size=64, seed=0)
    celeba = make_celeba_release(root / "CelebA", hq_root=hq.root, num_extra=60, seed=1)
    return hq, celeba


@pytest.fixture
def release_copy(releases, tmp_path) -> tuple[Path, Path]:
    """Writable copies (hq_root, celeba_root) of the synthetic releases."""
    hq, celeba = releases
    hq_root, celeba_root = tmp_path / "hq", tmp_path / "celeba"
    shutil.copytree(hq.root, hq_root)
    shutil.copytree(celeba.root, celeba_root)
    return hq_root, celeba_root


@pytest.fixture(scope="session")
def prepared_hq(releases, tmp_path_factory, run_cli) -> Path:
    """A dataset made by ``prepare-celeba-hq`` from the synthetic release (read-only: copy it)."""
    dst = tmp_path_factory.mktemp("prepared") / "dataset"
    assert run_cli("prepare-celeba-hq", releases[0].root, dst).exit_code == 0
    return dst


@pytest.fixture
def hq_dataset(prepared_hq, tmp_path) -> Path:
    """A writable copy of ``prepared_hq`` (file times preserved)."""
    dst = tmp_path / "dataset"
    shutil.copytree(prepared_hq, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def snapshot():
    """``snapshot(folder)``: every file below ``folder`` as relative path -> (mtime_ns, content)."""
    return _snapshot


def _error_line(result: Result) -> str:
    """The one-line error of a failed run: the last output line, after any progress bar."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return last


@pytest.fixture
def error_line():
    """``error_line(result)``: assert exit code 2 and one ``Error:`` line at the end; return that line."""
    return _error_line
