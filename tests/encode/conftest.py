"""Fixtures of the encode tests: a loaded tiny pipeline and small captioned example folders (``tiny_sd3`` and
``run_cli`` come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

from sd3_lora_celeba.models.loading import SD3_MODEL_ENV


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


@pytest.fixture
def tiny_env(monkeypatch, tiny_sd3) -> Path:
    """Point the default SD3 model at the tiny one, as ``sd3 demo`` does, so README commands run unchanged."""
    monkeypatch.setenv(SD3_MODEL_ENV, str(tiny_sd3))
    return tiny_sd3


def captions_of(i: int) -> dict[str, str]:
    """Distinctive captions of example ``i`` (so a mix-up between examples is visible)."""
    return {
        "blip2": f"a photo of person number {i} with {'red' if i % 2 else 'blue'} hair",
        "llama3": f"A close-up portrait of subject {i}, smiling; {'glasses' if i % 3 else 'no glasses'}.",
    }


@pytest.fixture
def make_dataset(tmp_path, write_example) -> Callable[..., Path]:
    """Build ``tmp_path/dataset`` with ``counts[split]`` examples per split; return the dataset root.

    Example ``train/ex-001`` is not square (96 x 80) to exercise the crop and resize.
    """

    def make(counts: dict[str, int] | None = None) -> Path:
        root = tmp_path / "dataset"
        i = 0
        for split, n in (counts or {"train": 4, "val": 2}).items():
            for j in range(n):
                size = (96, 80) if (split, j) == ("train", 1) else (64, 64)
                write_example(root / split, f"ex-{i:03d}", seed=i, size=size, texts=captions_of(i))
                i += 1
        return root

    return make


@pytest.fixture
def mtimes() -> Callable[[Path, str], dict[str, int]]:
    """Modification times of every file called ``name`` below ``root``, by example id."""

    def get(root: Path, name: str) -> dict[str, int]:
        return {p.parent.name: p.stat().st_mtime_ns for p in sorted(root.rglob(name))}

    return get


@pytest.fixture
def error_line() -> Callable[[Result], str]:
    """``error_line(result)``: assert exit code 2 and one ``Error:`` line at the end; return that line."""

    def check(result: Result) -> str:
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: "), result.output
        return last

    return check
