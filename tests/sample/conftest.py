"""Fixtures of the generation tests: the shared tiny FID world (see fid_world.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fid_world.py, shared with tests/evaluate

from fid_world import FidWorld, run_cli, shared_world  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> FidWorld:
    return shared_world(tmp_path_factory)


@pytest.fixture
def cli_run():
    """``cli_run(*args, env=...)``: invoke ``sd3 --quiet ... args`` through CliRunner."""
    return run_cli
