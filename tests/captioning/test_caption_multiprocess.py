"""Two processes under ``accelerate launch`` caption every example exactly once (on CPU; see the root
conftest's ``two_process_launch``)."""

from __future__ import annotations

import os
import re
import subprocess

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.loading import BLIP2_MODEL_ENV

SUMMARY_RE = re.compile(r"caption-blip2: process (\d) of (\d) wrote (\d+) caption\(s\) of (\d+) assigned")


def test_two_processes_cover_every_example_once(tiny_blip2, make_dataset, captions, two_process_launch):
    root = make_dataset({"train": 3, "val": 2})
    (root / "train" / "hq-train-001" / layout.prompt_file("blip2")).write_text(
        "done before", encoding="utf-8"
    )
    env = {**os.environ, BLIP2_MODEL_ENV: str(tiny_blip2), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [*two_process_launch, "--main_process_port", "0", "-m", "sd3_lora_celeba.cli"]
    command = [*launch, "--logging-style", "plain", "caption-blip2", str(root), "--batch-size", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    summaries = {int(m[0]): (int(m[1]), int(m[2]), int(m[3])) for m in SUMMARY_RE.findall(result.stderr)}
    # Both processes ran, each wrote its share of the 4 pending examples, and the shares add up.
    assert summaries == {0: (2, 2, 2), 1: (2, 2, 2)}, result.stderr[-3000:]
    written = captions(root, "blip2")
    assert len(written) == 5
    assert written["hq-train-001"] == "done before"  # finished examples are left alone
