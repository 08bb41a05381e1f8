"""Shared by the training tests and ``make_golden.py``: a tiny cached world and the golden run's options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.testing.tiny_sd3 import TINY_IMAGE_SIZE

NUM_EXAMPLES = 6
CAPTIONS = ["a woman with blond hair smiling", "a man with a beard", "a young person wearing glasses"]


def invoke(args: list[str], env: dict[str, str] | None = None):
    """Run ``sd3 ARGS`` in-process; fails the test with the output when the exit code is not 0."""
    from sd3_lora_celeba.cli import cli

    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def make_examples(split_dir: Path, count: int, seed: int = 0) -> None:
    """Example folders as prepare-* writes them: 64 px image, example.json with 40 attributes, BLIP-2 caption."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        d = split_dir / f"hq-{i:05d}"
        d.mkdir(parents=True)
        pixels = rng.integers(0, 256, size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / layout.IMAGE, quality=95)
        (d / layout.prompt_file("blip2")).write_text(CAPTIONS[i % len(CAPTIONS)] + "\n", encoding="utf-8")
        attributes = {name: bool(rng.random() < 0.3) for name in layout.ATTRIBUTES}
        record = {"id": d.name, "attributes": attributes}
        (d / layout.EXAMPLE_RECORD).write_text(json.dumps(record), encoding="utf-8")


def build_world(root: Path, tiny_sd3: Path) -> Path:
    """Dataset folder with a cached 6-example train split and the cached empty prompt, made by the real commands."""
    make_examples(root / "train", NUM_EXAMPLES)
    empty = root / layout.EMPTY_PROMPT_DIR
    empty.mkdir()
    (empty / layout.prompt_file("empty")).write_text("", encoding="utf-8")
    env = {SD3_MODEL_ENV: str(tiny_sd3)}
    invoke(["compute-latent-dist", root / "train"], env)
    for encoder in (1, 2, 3):
        invoke(["compute-prompt-embeds", encoder, root / "train"], env)
        invoke(["compute-prompt-embeds", encoder, empty], env)
    return root


def subprocess_env(tiny_sd3: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {SD3_MODEL_ENV: str(tiny_sd3), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    )
    return env


# The golden run: 4 steps, 2 micro-batches of 2, a LoRA with alpha != rank, a warmup + cosine schedule.
GOLDEN_STEPS = 4
GOLDEN_ARGS = [
    "--lora-blocks", "4,5,22",
    "--lora-rank", "4",
    "--lora-alpha", "8",
    "--learning-rate", "1e-3",
    "--num-training-steps", str(GOLDEN_STEPS),
    "--gradient-accumulation-steps", "2",
    "--batch-size", "2",
    "--lr-scheduler", "cosine",
    "--lr-warmup-steps", "1",
    "--logit-mean", "-0.5",
    "--checkpointing-steps", "2",
    "--dataloader-num-workers", "0",
    "--report-to", "none",
]  # fmt: skip
GOLDEN_FILE = Path(__file__).with_name("golden_losses.json")
# The golden numbers train WITH captions (the default --caption-dropout 0.2 of GOLDEN_ARGS leaves both captions
# and the empty prompt in the 16 samples), so they pin how the three caption embeddings are joined. The tiny
# tokenizers are deterministic, so caption token ids (hence embeddings) are the same in every session.
GOLDEN_FILE_ARGS: list[str] = []


def golden_command(world: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["fine-tune", str(world / "train"), str(world / layout.EMPTY_PROMPT_DIR), *GOLDEN_ARGS,
            "--output-dir", str(output_dir), *extra]  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    from sd3_lora_celeba.train.tracking import read_metrics

    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
