"""Reliability matrix: two runs of one stage on one dataset. The second gets one line naming the holder (pid,
host, command), exit 2, and writes nothing; a lock left by a dead run is taken over; different stages (the
three text encoders, say) do not block each other; under ``accelerate launch`` the refusal stops every process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.io import LOCK_NAME
from sd3_lora_celeba.parallel import lock_folder
from sd3_lora_celeba.testing.celeba_synth import make_celeba_hq_release, make_celeba_release


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-releases")
    hq = make_celeba_hq_release(root / "hq", num_images=10, image_size=32, seed=0)
    celeba = make_celeba_release(root / "celeba", hq_root=hq.root, num_extra=6, seed=1)
    return hq.root, celeba.root


@pytest.fixture
def dataset(releases, tmp_path, run_cli) -> Path:
    """A prepared dataset whose first example also has a BLIP-2 caption."""
    dst = tmp_path / "dataset"
    assert run_cli("prepare-celeba-hq", releases[0], dst).exit_code == 0
    example = sorted(dst.glob("train/hq-*"))[0]
    (example / layout.prompt_file("blip2")).write_text("a person smiling")
    return dst


@pytest.fixture
def holder():
    """A live process standing in for the other run (killed at the end)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def hold(folder: Path, pid: int, what: str = "the other run") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "what": what}))
    return folder / LOCK_NAME


STAGES = [
    ("prepare", ["prepare-celeba-hq", "{hq}", "{dst}", "--overwrite", "--random-seed", "3"]),
    ("prepare", ["prepare-celeba", "{celeba}", "{hq}", "{dst}", "--min-image-size", "8"]),
    ("caption-blip2", ["caption-blip2", "{dst}/train", "--model-name", "{missing}"]),
    ("caption-llama3", ["caption-llama3", "{dst}", "--model-name", "{missing}"]),
    (
        "compute-latent-dist",
        ["compute-latent-dist", "{dst}/val", "--image-size", "32", "--model-name", "{missing}"],
    ),
    ("compute-prompt-embeds-1", ["compute-prompt-embeds", "1", "{dst}", "--model-name", "{missing}"]),
]


@pytest.mark.parametrize(("stage", "args"), STAGES, ids=[a[0] for _, a in STAGES])
def test_second_run_of_a_stage_gets_one_line_naming_the_holder(
    releases, dataset, holder, tmp_path, stage, args, run_cli
):
    lock = hold(lock_folder(dataset, stage), holder.pid, "sd3 " + args[0])
    before = files(dataset)
    values = {"hq": releases[0], "celeba": releases[1], "dst": dataset, "missing": tmp_path / "no-model"}
    result = run_cli(*(a.format(**values) for a in args))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert f"in use by sd3 {args[0]} (pid {holder.pid} on {socket.gethostname()})" in lines[-1]
    assert str(lock) in lines[-1]  # says what to delete if that process is gone
    assert files(dataset) == before  # nothing written (the lock file itself untouched)


def test_split_and_example_folders_share_the_dataset_lock(dataset):
    example = sorted(dataset.glob("train/hq-*"))[0]
    assert lock_folder(example, "compute-latent-dist") == lock_folder(dataset, "compute-latent-dist")
    assert lock_folder(dataset / "val", "compute-latent-dist") == lock_folder(dataset, "compute-latent-dist")
    # One lock per stage output: the three encoders (or a captioner and the VAE) can run side by side.
    names = {lock_folder(dataset, f"compute-prompt-embeds-{i}") for i in (1, 2, 3)}
    assert len(names) == 3


def test_lock_of_a_dead_run_is_taken_over_and_released(releases, dataset, run_cli):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: the lock is stale
    lock = hold(lock_folder(dataset, "prepare"), dead.pid)
    result = run_cli("prepare-celeba-hq", releases[0], dataset, "--overwrite", "--random-seed", "3")
    assert result.exit_code == 0, result.output
    assert not lock.exists()  # released at the end
    assert json.loads((dataset / layout.DATASET_INFO).read_text())["random_seed"] == 3


LAUNCH_SCRIPT = """
import sys
from sd3_lora_celeba.cli import cli
cli.main(["--logging-style", "plain", "compute-latent-dist", sys.argv[1], "--image-size", "32", "--num-workers",
          "0", "--model-name", sys.argv[2]], prog_name="sd3")
"""


@pytest.mark.slow
def test_refusal_under_accelerate_launch_stops_both_processes(
    tiny_sd3_world, holder, tmp_path, two_process_launch
):
    dataset = tiny_sd3_world
    lock = hold(lock_folder(dataset, "compute-latent-dist"), holder.pid, "sd3 compute-latent-dist")
    script = tmp_path / "latents.py"
    script.write_text(LAUNCH_SCRIPT)
    launch = [*two_process_launch, "--main_process_port", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, str(script), str(dataset), str(tmp_path / "no-model")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"in use by sd3 compute-latent-dist (pid {holder.pid}") == 2, output[-3000:]
    assert lock.exists() and not list(dataset.rglob(layout.LATENT_DIST))


@pytest.fixture
def tiny_sd3_world(tmp_path) -> Path:
    """Two example folders with images under a dataset root (no model is needed: the lock comes first)."""
    root = tmp_path / "dataset"
    root.mkdir()
    (root / layout.DATASET_INFO).write_text("{}")
    for i in range(2):
        d = root / "train" / f"hq-{i:05d}"
        d.mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(d / layout.IMAGE)
        (d / layout.EXAMPLE_RECORD).write_text(json.dumps({"id": d.name, "attributes": {}}))
    return root
