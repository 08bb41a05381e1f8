"""Fixtures of the captioning tests: tiny captioners (built once) and small synthetic example folders."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.loading import BLIP2_MODEL_ENV, LLAMA3_MODEL_ENV
from sd3_lora_celeba.testing.tiny_captioners import build_tiny_blip2, build_tiny_llama3


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("models") / "blip2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_tiny_llama3(tmp_path_factory.mktemp("models") / "llama3", seed=0)


@pytest.fixture
def tiny_env(monkeypatch, tiny_blip2, tiny_llama3) -> None:
    """Point the default models at the tiny ones, as ``sd3 demo`` does."""
    monkeypatch.setenv(BLIP2_MODEL_ENV, str(tiny_blip2))
    monkeypatch.setenv(LLAMA3_MODEL_ENV, str(tiny_llama3))


def write_example(
    folder: Path, example_id: str, split: str, attributes: dict[str, bool], color: tuple
) -> Path:
    """One example folder as the prepare stages write it: a small image and ``example.json`` (written last)."""
    d = folder / example_id
    d.mkdir(parents=True)
    Image.new("RGB", (40, 40), color).save(d / layout.IMAGE)
    record = {"id": example_id, "source": "celeba-hq", "split": split, "attributes": attributes}
    (d / layout.EXAMPLE_RECORD).write_text(json.dumps(record), encoding="utf-8")
    return d


@pytest.fixture
def make_dataset(tmp_path) -> Callable[..., Path]:
    """Build ``tmp_path/dataset`` with ``counts[split]`` examples per split; return the dataset root."""

    def make(counts: dict[str, int] | None = None, seed: int = 0) -> Path:
        rng = random.Random(seed)
        root = tmp_path / "dataset"
        for split, n in (counts or {"train": 3, "val": 2}).items():
            for i in range(n):
                attributes = {name: rng.random() < 0.3 for name in layout.ATTRIBUTES}
                color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
                write_example(root / split, f"hq-{split}-{i:03d}", split, attributes, color)
        return root

    return make


@pytest.fixture
def captions() -> Callable[[Path, str], dict[str, str]]:
    """Read the captions of one variant below a folder, by example id."""

    def read(root: Path, variant: str) -> dict[str, str]:
        return {
            p.parent.name: p.read_text(encoding="utf-8")
            for p in sorted(root.rglob(layout.prompt_file(variant)))
        }

    return read
