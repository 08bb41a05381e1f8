"""Per-model defaults read from the configs: family detection, native resolution, T5 length, shift, LoRA blocks."""

from __future__ import annotations

import json

import pytest

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.families import (
    count_parameters,
    detect_family,
    model_defaults,
    recommended_lora_blocks,
)
from sd3_lora_celeba.models.lora import DUAL_ATTENTION_LINEARS, JOINT_ATTENTION_LINEARS
from sd3_lora_celeba.testing.published import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
from sd3_lora_celeba.testing.tiny_sd3 import TINY_IMAGE_SIZE, build_tiny_sd3


@pytest.mark.parametrize(
    "config, family, billions",
    [
        (SD3_MEDIUM, "sd3-medium", 2.03),
        (SD35_MEDIUM, "sd3.5-medium", 2.24),
        (SD35_LARGE, "sd3.5-large", 8.06),
    ],
)
def test_real_configs_are_recognised_and_sized(config, family, billions):
    assert detect_family(config) == family
    assert count_parameters(config) / 1e9 == pytest.approx(billions, abs=0.01)


def test_other_configs_are_custom():
    assert detect_family({**SD3_MEDIUM, "num_layers": 12}) == "custom"
    assert detect_family({**SD35_MEDIUM, "dual_attention_layers": [0, 1]}) == "custom"


def test_recommended_blocks_scale_the_seed_choice():
    assert recommended_lora_blocks(24) == tuple(range(4, 23))  # the seed README's 4..22
    assert recommended_lora_blocks(38) == tuple(range(6, 37))


@pytest.mark.parametrize("family", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_model_defaults_of_the_tiny_worlds(tmp_path, family):
    folder = build_tiny_sd3(tmp_path / family, family)
    defaults = model_defaults(str(folder))
    assert defaults.family == family
    assert defaults.native_resolution == TINY_IMAGE_SIZE and defaults.vae_scale_factor == 8
    assert defaults.shift == 3.0
    assert defaults.t5_max_length == 256  # the pipeline default; the tiny T5 tokenizer allows more
    large = family == "sd3.5-large"
    assert defaults.num_layers == (38 if large else 24)
    assert defaults.lora_blocks == recommended_lora_blocks(defaults.num_layers)
    assert defaults.gradient_checkpointing == large
    if family == "sd3.5-medium":
        assert defaults.dual_attention_layers == tuple(range(13))
        assert defaults.lora_layers == JOINT_ATTENTION_LINEARS + DUAL_ATTENTION_LINEARS
        assert defaults.skip_guidance_layers == (7, 8, 9)
    else:
        assert defaults.lora_layers == JOINT_ATTENTION_LINEARS and defaults.skip_guidance_layers is None


def test_values_come_from_the_config_files(tmp_path):
    """Edit the JSON files: the defaults follow (no constants)."""
    folder = build_tiny_sd3(tmp_path / "edited")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 1.5}))
    transformer = folder / "transformer" / "config.json"
    transformer.write_text(json.dumps({**json.loads(transformer.read_text()), "sample_size": 16}))
    tokenizer = folder / "tokenizer_3" / "tokenizer_config.json"
    tokenizer.write_text(json.dumps({**json.loads(tokenizer.read_text()), "model_max_length": 77}))
    defaults = model_defaults(str(folder))
    assert (defaults.shift, defaults.native_resolution, defaults.t5_max_length) == (1.5, 128, 77)


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="--model-name") as info:
        model_defaults(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family, expected_on_cuda", [("sd3-medium", False), ("sd3.5-large", True)])
def test_gradient_checkpointing_defaults_on_for_large_models_on_cuda(
    tmp_path, monkeypatch, family, expected_on_cuda
):
    import torch

    from sd3_lora_celeba.train.recipe import FineTuneConfig, use_gradient_checkpointing

    model = build_tiny_sd3(tmp_path / family, family)
    config = FineTuneConfig(train_dir=tmp_path, empty_prompt_dir=tmp_path, model_name=str(model))
    assert use_gradient_checkpointing(config) is False  # CPU: off unless asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert use_gradient_checkpointing(config) is expected_on_cuda
    explicit = FineTuneConfig(
        train_dir=tmp_path, empty_prompt_dir=tmp_path, model_name=str(model), gradient_checkpointing=False
    )
    assert use_gradient_checkpointing(explicit) is False  # the flag wins
