"""Run ``sd3 ARGS...`` and SIGKILL the process inside the N-th transformer forward call (a kill mid-step).

Usage: ``python kill_mid_step.py N fine-tune ...``. Used by the resume test; the kill is deterministic, unlike a
timer, and as hard as a real one (no cleanup, no atexit, no flushing).
"""

from __future__ import annotations

import os
import signal
import sys

from diffusers import SD3Transformer2DModel

from sd3_lora_celeba.cli import cli

kill_at = int(sys.argv[1])
calls = 0
original_forward = SD3Transformer2DModel.forward


def forward(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_forward(self, *args, **kwargs)


SD3Transformer2DModel.forward = forward
cli(["--quiet", *sys.argv[2:]], prog_name="sd3")
