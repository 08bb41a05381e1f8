"""Atomic writes never leave a half-written or clobbered file."""

import json
import os
import re
import socket
import stat
import subprocess
import sys

import pytest

from sd3_lora_celeba.io import (
    LOCK_NAME,
    TMP_PREFIX,
    LockedError,
    atomic_path,
    atomic_write_text,
    output_lock,
    remove_stale_temp_files,
)


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


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "shared.txt"
        atomic_write_text(target, "x")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_very_long_names_still_write_atomically(tmp_path):
    target = tmp_path / ("n" * 247 + ".png")
    atomic_write_text(target, "x")
    assert target.read_text() == "x"


def test_second_holder_of_a_lock_is_refused_with_the_holder_named(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / LOCK_NAME
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "what": "sd3 fine-tune"}))
        with pytest.raises(LockedError, match=re.escape(f"sd3 fine-tune (pid {other.pid}")):
            with output_lock(tmp_path, "sd3 fine-tune"):
                pass
        assert lock.exists()  # the live holder's lock is left alone
    finally:
        other.kill()
        other.wait()


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with output_lock(tmp_path, "test") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with output_lock(tmp_path, "nested"):  # re-entrant in one process
            pass
    assert not (tmp_path / LOCK_NAME).exists()
