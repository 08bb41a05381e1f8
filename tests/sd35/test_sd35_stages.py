"""Every stage on the tiny SD3.5-medium-like and SD3.5-large-like models, as CLI calls through the real loaders.

The worlds come from :data:`sd3_lora_celeba.testing.tiny_sd3.TINY_SPECS`: SD3.5-medium-like has MMDiT-X blocks
0-12 with a second self-attention ``attn2`` and RMS q/k norms; SD3.5-large-like has 38 blocks with RMS q/k norms.
Stages: caches (latent distributions, the three prompt embeddings), fine-tune (default LoRA layers, so attn2 where
present; SD3.5-large with --quantize-base), generate-images with and without the LoRA, attention capture, export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.families import model_defaults
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.testing.tiny_sd3 import TINY_IMAGE_SIZE

CAPTIONS = [
    "a smiling young woman with long blond hair and heavy makeup, looking at the camera",
    "a middle-aged man with a beard and glasses wearing a dark suit and a tie",
    "a young person with wavy brown hair, arched eyebrows and a slightly open mouth",
]


@dataclass(frozen=True)
class Sd35Run:
    family: str
    model: Path
    dataset: Path
    run: Path
    checkpoint: Path

    @property
    def env(self) -> dict[str, str]:
        return {SD3_MODEL_ENV: str(self.model)}


@pytest.fixture(scope="session")
def sd3(run_cli):
    """``sd3(env, *args)``: run ``sd3 ARGS`` with ``env``, fail with the output unless it exits 0, return it."""

    def run(env: dict[str, str], *args: object) -> str:
        result = run_cli(*args, env=env)
        assert result.exit_code == 0, result.output
        return result.output

    return run


@pytest.fixture(scope="module", params=["sd3.5-medium", "sd3.5-large"])
def sd35(request, tmp_path_factory, sd3, tiny_sd3_family, write_example) -> Sd35Run:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = tiny_sd3_family(family)
    env = {SD3_MODEL_ENV: str(model)}
    dataset = root / "dataset"
    for split, count, first in (("train", 4, 0), ("test", 2, 100)):
        for i in range(count):
            texts = {"blip2": CAPTIONS[i % len(CAPTIONS)] + "\n"}
            write_example(dataset / split, f"hq-{first + i:05d}", seed=first + i, texts=texts)
    empty = dataset / layout.EMPTY_PROMPT_DIR
    empty.mkdir()
    (empty / layout.prompt_file("empty")).write_text("", encoding="utf-8")
    sd3(env, "compute-latent-dist", dataset / "train")
    for encoder in ("1", "2", "3"):
        sd3(env, "compute-prompt-embeds", encoder, dataset)  # every split below the dataset folder
        sd3(env, "compute-prompt-embeds", encoder, empty)
    run = root / "run"
    extra = ["--quantize-base"] if family == "sd3.5-large" else []
    sd3(
        env, "fine-tune", dataset / "train", empty, "--output-dir", run,
        "--lora-blocks", "0,1,12,13,23", "--lora-rank", "2", "--lora-alpha", "2",
        "--num-training-steps", "2", "--batch-size", "2", "--checkpointing-steps", "2",
        "--lr-warmup-steps", "0", "--learning-rate", "1e-2", "--dataloader-num-workers", "0",
        "--report-to", "none", *extra,
    )  # fmt: skip
    return Sd35Run(family, model, dataset, run, layout.list_checkpoints(run)[-1])


def test_caches_and_fine_tune(sd35):
    assert layout.checkpoint_dir(sd35.run, 2) == sd35.checkpoint
    metrics = [json.loads(line) for line in (sd35.run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in metrics if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with safe_open(str(sd35.checkpoint / layout.LORA_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    attn2 = {k for k in keys if ".attn2." in k}
    if sd35.family == "sd3.5-medium":  # the default layers take attn2 in the dual-attention blocks 0, 1, 12
        assert {k.split(".")[2] for k in attn2} == {"0", "1", "12"}
    else:
        assert not attn2
    assert any(k.startswith("transformer.transformer_blocks.23.attn.to_q.") for k in keys)
    config = json.loads((sd35.checkpoint / layout.RUN_CONFIG).read_text())
    assert config["quantize_base"] == (sd35.family == "sd3.5-large")


def test_attn2_layers_are_checked_against_the_loaded_model(sd35, tmp_path, run_cli):
    args = ["fine-tune", sd35.dataset / "train", sd35.dataset / layout.EMPTY_PROMPT_DIR, "--output-dir",
            tmp_path / "run", "--lora-blocks", "13,14", "--lora-layers", "to_q,attn2.to_q", "--report-to", "none"]  # fmt: skip
    result = run_cli(*args, env=sd35.env, logging_style=None)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    expected = "blocks are 0..12" if sd35.family == "sd3.5-medium" else "no dual-attention (attn2) blocks"
    assert expected in result.output and "--lora-layers" in result.output
    assert not (tmp_path / "run").exists() or not layout.list_checkpoints(tmp_path / "run")


def test_generate_images_with_and_without_lora(sd35, tmp_path, sd3):
    test = sd35.dataset / "test"
    common = ["--num-inference-steps", "2", "--guidance-scale", "2"]
    sd3(sd35.env, "generate-images", test, tmp_path / "base", *common)
    sd3(sd35.env, "generate-images", test, tmp_path / "lora", "--lora-weight-dir", sd35.checkpoint, *common)
    names = sorted(p.name for p in (tmp_path / "base").glob("*.png"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "lora").glob("*.png"))
    base = np.asarray(Image.open(tmp_path / "base" / names[0]))
    lora = np.asarray(Image.open(tmp_path / "lora" / names[0]))
    assert base.shape == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)  # the native size read from the model
    assert np.abs(base.astype(int) - lora.astype(int)).max() > 0


def test_attention_capture_with_the_lora(sd35):
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.models.lora import load_lora_into_pipeline
    from sd3_lora_celeba.visualize.capture import capture_attention

    pipe = StableDiffusion3Pipeline.from_pretrained(sd35.model)
    load_lora_into_pipeline(pipe, sd35.checkpoint)
    blocks = [0, 13, len(pipe.transformer.transformer_blocks) - 1]
    with capture_attention(pipe.transformer, blocks=blocks, steps=[0]) as capture:
        pipe(
            CAPTIONS[0], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
        )
    result = capture.result()
    heat = result.mean_map("image_to_text")
    assert heat.shape[0] == (TINY_IMAGE_SIZE // 16) ** 2  # one row per image token (patch 2 on 8x latents)
    sums = heat.float().sum(-1)
    assert torch.all(sums <= 1.0 + 1e-2) and torch.all(sums > 0)
    attn2_sources = [s for s in result.feature_sources() if s.startswith("attn2")]
    assert bool(attn2_sources) == (sd35.family == "sd3.5-medium")


def test_export_for_comfyui(sd35, tmp_path, sd3):
    out = tmp_path / "comfy.safetensors"
    sd3(sd35.env, "export-lora", sd35.checkpoint, out, "--format", "comfyui")
    state = load_file(str(out))
    attn2 = {k for k in state if "_x_block_attn2_" in k}
    if sd35.family == "sd3.5-medium":
        assert "lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_down.weight" in attn2
        assert "lora_unet_joint_blocks_0_x_block_attn2_proj.alpha" in attn2
    else:
        assert not attn2
    assert state["lora_unet_joint_blocks_23_x_block_attn_qkv.lora_up.weight"].dtype == torch.float16


def test_model_defaults_match_the_world(sd35):
    defaults = model_defaults(str(sd35.model))
    assert defaults.family == sd35.family
    assert defaults.native_resolution == TINY_IMAGE_SIZE
    assert max(defaults.lora_blocks) < defaults.num_layers
