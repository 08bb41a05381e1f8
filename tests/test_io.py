"""Atomic writes never leave a half-written or clobbered file."""

import pytest

from sd3_lora_celeba.io import TMP_PREFIX, atomic_path, atomic_write_text, remove_stale_temp_files


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_successful_write_replaces(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / f"{TMP_PREFIX}x.txt.123").write_text("left by a kill")
    (tmp_path / "keep.txt").write_text("k")
    assert remove_stale_temp_files(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
