"""Run ``sd3 ARGS...`` and send this process SIGNAL inside transformer forward calls N (and N+1 with ``twice``).

Usage: ``python signal_mid_step.py N TERM|INT once|twice fine-tune ...``. Deterministic, unlike a timer: the
signal arrives mid-step, while the loop is inside a micro-batch.
"""

from __future__ import annotations

import os
import signal
import sys

from diffusers import SD3Transformer2DModel

from sd3_lora_celeba.cli import cli

at, name, times = int(sys.argv[1]), sys.argv[2], sys.argv[3]
signum = getattr(signal, "SIG" + name)
hits = {at, at + 1} if times == "twice" else {at}
calls = 0
original_forward = SD3Transformer2DModel.forward


def forward(self, *args, **kwargs):
    global calls
    calls += 1
    if calls in hits:
        os.kill(os.getpid(), signum)
    return original_forward(self, *args, **kwargs)


SD3Transformer2DModel.forward = forward
cli(["--quiet", "--logging-style", "plain", *sys.argv[4:]], prog_name="sd3")
