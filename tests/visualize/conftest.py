"""Tiny SD3 world shared by the visualisation tests: a loaded pipeline and LoRA folders on the session's
``tiny_sd3`` folder (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

MAX_SEQ = 64  # T5 positions of the shared explorer: a 35-word caption is about 50 T5 tokens


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd3):
    """The tiny pipeline, loaded once (tests must not leave LoRA adapters or processors in it)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_lora_folder(
    model_path: Path, folder: Path, blocks: tuple[int, ...], seed: int, rank: int = 2
) -> Path:
    """A LoRA checkpoint with random (non-zero) B on ``blocks`` of the model at ``model_path``."""
    from sd3_lora_celeba.models.loading import load_transformer
    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules, save_lora

    transformer = load_transformer(str(model_path))
    add_lora(transformer, lora_config(lora_target_modules(transformer, blocks), rank=rank))
    generator = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data = 0.5 * torch.randn(p.shape, generator=generator)
    save_lora(transformer, folder)
    return folder


@pytest.fixture(scope="session")
def lora_dirs(tiny_sd3, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return (
        make_lora_folder(tiny_sd3, root / "checkpoint-000010", blocks=(2, 3, 4), seed=1),
        make_lora_folder(tiny_sd3, root / "checkpoint-000020", blocks=(4, 5, 6, 7), seed=2),
    )


@pytest.fixture(scope="session")
def bad_lora_dir(lora_dirs, tmp_path_factory):
    """A LoRA of another model: every lora_A has 3 input features too many."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sd3_lora_celeba import layout

    folder = tmp_path_factory.mktemp("bad") / "checkpoint-000030"
    folder.mkdir()
    source = lora_dirs[0] / layout.LORA_WEIGHTS
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
    state = {
        k: torch.randn(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
        for k, v in load_file(source).items()
    }
    save_file(state, folder / layout.LORA_WEIGHTS, metadata=metadata)
    return folder


@pytest.fixture(scope="session")
def corrupt_lora_dir(lora_dirs, tmp_path_factory):
    """A LoRA whose weights file was cut short (an interrupted copy)."""
    from sd3_lora_celeba import layout

    folder = tmp_path_factory.mktemp("corrupt") / "checkpoint-000040"
    folder.mkdir()
    data = (lora_dirs[0] / layout.LORA_WEIGHTS).read_bytes()
    (folder / layout.LORA_WEIGHTS).write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="session")
def explorer(tiny_sd3, lora_dirs, bad_lora_dir, corrupt_lora_dir, tmp_path_factory):
    """The app engine on the tiny model: two good LoRAs, one that does not fit, a corrupt one, a missing one."""
    from sd3_lora_celeba.visualize.app import VisualizeConfig, load_explorer

    missing = tmp_path_factory.mktemp("missing") / "checkpoint-none"
    config = VisualizeConfig(
        lora_weight_dir=(lora_dirs[0], bad_lora_dir, corrupt_lora_dir, missing, lora_dirs[1]),
        model_name=str(tiny_sd3),
        device="cpu",
        max_sequence_length=MAX_SEQ,
    )
    return load_explorer(config)
