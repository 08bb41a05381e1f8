"""Two processes under ``accelerate launch`` cover every example exactly once, for both encode commands.

accelerate 1.15 starts a single process for ``accelerate launch --cpu --num_processes 2`` unless it is given an
MPI hostfile; ``--multi_gpu`` starts two processes through torchrun, and on a machine without CUDA
:func:`sd3_lora_celeba.parallel.process_state` makes them a gloo (CPU) process group.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV

# One launch runs both commands (as `sd3 ...` would), to pay the two processes' start-up once.
SCRIPT = """
import sys
from sd3_lora_celeba.cli import cli
root = sys.argv[1]
cli.main(["--logging-style", "plain", "compute-latent-dist", root, "--num-workers", "0"], standalone_mode=False)
cli.main(["--logging-style", "plain", "compute-prompt-embeds", "t5", root, "--batch-size", "1"], standalone_mode=False)
"""
SUMMARY_RE = re.compile(
    r"(compute-latent-dist|compute-prompt-embeds 3 \(T5-XXL\)): process (\d) of 2 wrote (\d+) file"
)


@pytest.mark.slow
def test_two_processes_cover_each_example_once(tiny_sd3, make_dataset, run_cli, tmp_path, two_process_launch):
    root = make_dataset({"train": 5, "val": 2})
    outputs = (layout.LATENT_DIST, layout.prompt_embeds_file(3))
    # Two examples are already done: the two processes must share the 5 pending ones and leave these alone.
    done = sorted((root / "train").iterdir())[:2]
    for example_dir in done:
        assert run_cli("compute-latent-dist", example_dir, "--model-name", tiny_sd3).exit_code == 0
        assert run_cli("compute-prompt-embeds", "3", example_dir, "--model-name", tiny_sd3).exit_code == 0
    before = {(d.name, out): (d / out).stat().st_mtime_ns for d in done for out in outputs}

    script = tmp_path / "both.py"
    script.write_text(SCRIPT)
    launch = [*two_process_launch, "--main_process_port", "0"]
    env = {**os.environ, SD3_MODEL_ENV: str(tiny_sd3), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, str(script), str(root)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    written: dict[str, dict[int, int]] = {}
    for what, process, count in SUMMARY_RE.findall(result.stderr):
        written.setdefault(what, {})[int(process)] = int(count)
    assert set(written) == {"compute-latent-dist", "compute-prompt-embeds 3 (T5-XXL)"}, result.stderr[-3000:]
    for per_process in written.values():
        # Both processes got a share, and the shares add up to the 5 pending examples: none twice, none missed.
        assert set(per_process) == {0, 1} and all(n > 0 for n in per_process.values())
        assert sum(per_process.values()) == 5
    for out in outputs:
        assert len(list(root.rglob(out))) == 7
    assert {(d.name, out): (d / out).stat().st_mtime_ns for d in done for out in outputs} == before
