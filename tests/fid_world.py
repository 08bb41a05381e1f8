"""A tiny FID world shared by tests/sample and tests/evaluate (the ``world`` fixture of tests/conftest.py): tiny SD3, a dataset split with cached prompt
embeddings, a LoRA run folder and random FID Inception weights (also installed as pytorch-fid's download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.testing.inception import install_inception_weights, write_random_inception_weights
from sd3_lora_celeba.testing.tiny_sd3 import TINY_IMAGE_SIZE, build_tiny_sd3

NUM_EXAMPLES = 6
CAPTIONS = ["a smiling woman", "a man with glasses", "a person with blond hair", "an old man", "a young girl"]


@dataclass(frozen=True)
class FidWorld:
    model: Path
    dataset: Path
    split: Path  # dataset/test
    run: Path  # RUN/checkpoint-000002
    lora: Path
    inception_weights: Path
    torch_home: Path  # TORCH_HOME holding the weights where pytorch-fid looks for them

    @property
    def env(self) -> dict[str, str]:
        return {SD3_MODEL_ENV: str(self.model), "TORCH_HOME": str(self.torch_home)}


def run_cli(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["--quiet", "--logging-style", "plain", *map(str, args)], env=env)


def make_split(split: Path, n: int, seed: int) -> None:
    """``n`` example folders with a structured random 64 px image and a BLIP-2 caption."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = split / f"hq-{i:05d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, 3)
        img = np.tile(base, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 1)).astype(np.int64)
        img[16:48, 16:48] = rng.integers(0, 255, 3)
        img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / layout.IMAGE, quality=95)
        (d / layout.prompt_file("blip2")).write_text(CAPTIONS[i % len(CAPTIONS)] + f" number {i}\n")


def make_lora_checkpoint(model: Path, folder: Path, seed: int = 0, std: float = 0.5) -> Path:
    """A LoRA on a few blocks with random (non-zero) B, saved like fine-tune's checkpoints."""
    import torch

    from sd3_lora_celeba.models.loading import load_transformer
    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules, save_lora

    transformer = load_transformer(str(model))
    add_lora(transformer, lora_config(lora_target_modules(transformer, [4, 5, 6]), rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    save_lora(transformer, folder)
    return folder


def build_world(root: Path, model: Path | None = None) -> FidWorld:
    """The world below ``root`` on the tiny SD3 folder ``model`` (built in ``root`` when not given)."""
    model = model if model is not None else build_tiny_sd3(root / "tiny-sd3")
    dataset = root / "dataset"
    make_split(dataset / "test", NUM_EXAMPLES, seed=0)
    empty = dataset / layout.EMPTY_PROMPT_DIR
    empty.mkdir(parents=True)
    (empty / layout.prompt_file("empty")).write_text("")
    for encoder in (1, 2, 3):
        result = run_cli("compute-prompt-embeds", encoder, dataset, env={SD3_MODEL_ENV: str(model)})
        assert result.exit_code == 0, result.output
    run = root / "run"
    lora = make_lora_checkpoint(model, layout.checkpoint_dir(run, 2))
    weights = write_random_inception_weights(root / "inception.pth")
    torch_home = root / "torch-home"
    install_inception_weights(weights, torch_home)
    return FidWorld(model, dataset, dataset / "test", run, lora, weights, torch_home)
