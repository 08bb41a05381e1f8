"""Run ``sd3 ARGS...`` and SIGKILL it while it writes its (N+1)-th output file.

Usage: ``python kill_after_writes.py N ARGS...``, or ``python kill_after_writes.py name=NAME ARGS...`` to kill
at the rename whose destination is called NAME (a checkpoint folder, say). Every output of the project is written to a temporary file
and then renamed with ``os.replace``; this wrapper lets N renames happen and kills the process at the next one,
when a complete temporary file exists but has not been renamed yet. The kill is deterministic (no timer) and as
hard as a real one: no cleanup, no atexit handlers, no flushing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

target = sys.argv[1]
by_name = target.startswith("name=")
allowed = 0 if by_name else int(target)
renames = 0
real_replace = os.replace
# Writers on several threads (generate-images' PNG writer): the check, the count and the rename happen under one
# lock, so the kill never lands between another thread's count and its rename (N renames are really done).
lock = threading.Lock()


def replace(src, dst, *args, **kwargs):
    global renames
    with lock:
        if (os.path.basename(os.fspath(dst)) == target[5:]) if by_name else renames >= allowed:
            os.kill(os.getpid(), signal.SIGKILL)
        renames += 1
        return real_replace(src, dst, *args, **kwargs)


os.replace = replace

from sd3_lora_celeba.cli import cli  # noqa: E402

cli(["--quiet", *sys.argv[2:]], prog_name="sd3")
