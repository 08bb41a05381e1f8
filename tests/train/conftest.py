"""Fixtures of the training tests: a tiny cached training set built by the real commands with the session's
tiny SD3 model (``tiny_sd3``, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import build_world, golden_command, invoke

from sd3_lora_celeba.models.loading import SD3_MODEL_ENV


@pytest.fixture(scope="session")
def sd3_env(tiny_sd3) -> dict[str, str]:
    """The environment that makes ``tiny_sd3`` the default SD3 model (``run_cli(..., env=sd3_env)``)."""
    return {SD3_MODEL_ENV: str(tiny_sd3)}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_sd3) -> Path:
    """A dataset folder with a cached train split and empty prompt, made with the tiny model."""
    return build_world(tmp_path_factory.mktemp("world") / "dataset", tiny_sd3)


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory, tiny_world, tiny_sd3) -> Path:
    """The golden run (4 steps, checkpoints at 2 and 4), uninterrupted, in-process."""
    run_dir = tmp_path_factory.mktemp("golden") / "run"
    invoke(golden_command(tiny_world, run_dir), {SD3_MODEL_ENV: str(tiny_sd3)})
    return run_dir
