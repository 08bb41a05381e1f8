"""Reliability matrix, part 1: every stage killed mid-write, then re-run.

Each stage of the README runs in a subprocess that is SIGKILLed while it writes an output (see
``kill_after_writes.py``). The checks after the kill and after the re-run:

- no output file is half-written: every output that exists parses (JSON, safetensors, image, text);
- the re-run finishes with exit code 0 and produces every output;
- the re-run redoes nothing: outputs finished before the kill keep their modification times;
- no temporary file is left behind.

The stages run in README order on one tiny world, each on the previous stage's outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from sd3_lora_celeba import layout
from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.io import TMP_PREFIX
from sd3_lora_celeba.testing.world import build_tiny_world

KILLER = Path(__file__).with_name("kill_after_writes.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    world = build_tiny_world(root / "world", num_hq_images=30, num_celeba_extra=16)
    env = {**os.environ, **world.env(), "OMP_NUM_THREADS": "1"}
    return world, root / "dataset", env


def _check_complete(path: Path) -> None:
    """Raise if ``path`` is not a complete output file."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    elif path.suffix in (".jpg", ".png"):
        with Image.open(path) as im:
            im.load()
    else:
        path.read_text(encoding="utf-8")


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(TMP_PREFIX + "*")]


def _finished(outputs: Callable[[], list[Path]]) -> list[Path]:
    return [p for p in outputs() if not p.name.startswith(TMP_PREFIX)]


def kill_then_resume(
    args: list[str], outputs: Callable[[], list[Path]], env: dict, roots: list[Path], writes: int
):
    killed = subprocess.run(
        [sys.executable, str(KILLER), str(writes), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, (
        f"not killed mid-run (exit {killed.returncode}): {killed.stderr[-3000:]}"
    )
    before = {p: p.stat().st_mtime_ns for p in _finished(outputs)}
    assert before, "nothing was finished before the kill"
    assert any(_temp_files(r) for r in roots), "the kill did not happen mid-write"
    for path in before:
        _check_complete(path)

    result = CliRunner().invoke(
        cli, ["--quiet", *args], env={k: env[k] for k in env if k.startswith(("SD3_", "TORCH_HOME", "HF_"))}
    )
    assert result.exit_code == 0, result.output
    after = _finished(outputs)
    assert set(before) < set(after), "the re-run did not finish the remaining outputs"
    for path in after:
        _check_complete(path)
    redone = [p.name for p, mtime in before.items() if p.stat().st_mtime_ns != mtime]
    assert not redone, f"re-run rewrote finished outputs: {redone[:5]}"
    for r in roots:
        assert not _temp_files(r), f"temporary files left: {_temp_files(r)[:3]}"
    return after


def _in_examples(dataset: Path, name: str) -> Callable[[], list[Path]]:
    return lambda: sorted(dataset.rglob(name))


def test_prepare_celeba_hq(world):
    w, dataset, env = world
    after = kill_then_resume(
        ["prepare-celeba-hq", str(w.celeba_hq), str(dataset)],
        _in_examples(dataset, layout.EXAMPLE_RECORD), env, [dataset], writes=7,
    )  # fmt: skip
    assert len(after) == 30


def test_prepare_celeba(world):
    w, dataset, env = world
    hq = set(_in_examples(dataset, layout.EXAMPLE_RECORD)())
    kill_then_resume(
        ["prepare-celeba", str(w.celeba), str(w.celeba_hq), str(dataset), "--num-workers", "1"],
        lambda: [p for p in _in_examples(dataset, layout.EXAMPLE_RECORD)() if p not in hq], env, [dataset],
        writes=3,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, output",
    [
        (["caption-blip2", "--batch-size", "4"], layout.prompt_file("blip2")),
        (["caption-llama3", "--batch-size", "4"], layout.prompt_file("llama3")),
        (["compute-latent-dist", "--batch-size", "4"], layout.LATENT_DIST),
        (["compute-prompt-embeds", "1", "--batch-size", "4"], layout.prompt_embeds_file(1)),
        (["compute-prompt-embeds", "2", "--batch-size", "4"], layout.prompt_embeds_file(2)),
        (["compute-prompt-embeds", "3", "--batch-size", "4"], layout.prompt_embeds_file(3)),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
def test_caching_stages(world, args, output):
    _, dataset, env = world
    command = [
        args[0],
        *args[1 : 2 if args[0] == "compute-prompt-embeds" else 1],
        str(dataset),
        *args[2 if args[0] == "compute-prompt-embeds" else 1 :],
    ]
    kill_then_resume(command, _in_examples(dataset, output), env, [dataset], writes=5)


def test_empty_prompt_and_copy_and_generate(world):
    _, dataset, env = world
    empty = dataset / layout.EMPTY_PROMPT_DIR
    empty.mkdir(exist_ok=True)
    (empty / layout.prompt_file("empty")).touch()
    for encoder in ("1", "2", "3"):
        assert CliRunner().invoke(cli, ["compute-prompt-embeds", encoder, str(empty)], env=env).exit_code == 0
    out = dataset.parent / "fid"
    kill_then_resume(
        ["copy-images", str(dataset / "train"), str(out / "ground-truth")],
        lambda: sorted((out / "ground-truth").glob("*.jpg")), env, [out], writes=4,
    )  # fmt: skip
    kill_then_resume(
        ["generate-images", str(dataset / "train"), str(out / "generated"), "--num-inference-steps", "2",
         "--num-images", "8", "--batch-size", "2"],
        lambda: sorted((out / "generated").glob("*.png")), env, [out], writes=2,
    )  # fmt: skip
