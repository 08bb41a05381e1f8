"""Fixtures of the encode tests: the tiny SD3 model (built once) and small captioned example folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    # A fixed name under the session's base folder: other test folders reuse the finished model.
    return build_tiny_sd3(tmp_path_factory.getbasetemp() / "tiny-sd3")


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


def write_example(folder: Path, example_id: str, i: int, size: tuple[int, int] = (64, 64)) -> Path:
    """One captioned example folder: a seeded random image, ``example.json`` with 40 attributes, captions."""
    d = folder / example_id
    d.mkdir(parents=True)
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(d / layout.IMAGE, quality=95)
    attributes = {name: bool(rng.random() < 0.3) for name in layout.ATTRIBUTES}
    record = {"id": example_id, "source": "celeba-hq", "split": folder.name, "attributes": attributes}
    (d / layout.EXAMPLE_RECORD).write_text(json.dumps(record), encoding="utf-8")
    for variant, text in captions_of(i).items():
        (d / layout.prompt_file(variant)).write_text(text, encoding="utf-8")
    return d


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """Build ``tmp_path/dataset`` with ``counts[split]`` examples per split; return the dataset root.

    Example ``train/ex-001`` is not square (96 x 80) to exercise the crop and resize.
    """

    def make(counts: dict[str, int] | None = None) -> Path:
        root = tmp_path / "dataset"
        i = 0
        for split, n in (counts or {"train": 4, "val": 2}).items():
            for j in range(n):
                size = (96, 80) if (split, j) == ("train", 1) else (64, 64)
                write_example(root / split, f"ex-{i:03d}", i, size)
                i += 1
        return root

    return make


@pytest.fixture
def run_cli() -> Callable[..., Result]:
    """Run ``sd3 ARGS...`` in-process (quiet, plain logs); exceptions other than click's are kept in the result."""

    def run(*args: object) -> Result:
        return CliRunner().invoke(cli, ["--quiet", "--logging-style", "plain", *map(str, args)])

    return run


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
