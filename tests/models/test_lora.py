"""LoRA targets, save/load through stock diffusers (alpha kept), and per-block weight-change norms."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.lora import (
    add_lora,
    load_lora_into_pipeline,
    lora_config,
    lora_delta_norms,
    lora_target_modules,
    save_lora,
)
from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("lora") / "sd3")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 16, 8, 8, generator=g),  # latents (B, 16, H/8, W/8)
        torch.randn(1, 12, 64, generator=g),  # prompt_embeds (B, L, D)
        torch.randn(1, 48, generator=g),  # pooled_prompt_embeds (B, P)
        torch.tensor([500.0]),
    )


def test_targets_skip_missing_layers_and_reject_bad_blocks(tiny_sd3):
    transformer = StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer
    targets = lora_target_modules(transformer, [4, 23])
    assert "transformer_blocks.4.attn.to_add_out" in targets
    assert "transformer_blocks.23.attn.to_add_out" not in targets  # the last block has no text output
    assert len(targets) == 15
    with pytest.raises(ValueError, match="block 24 does not exist"):
        lora_target_modules(transformer, [24])
    with pytest.raises(ValueError, match="no linear layer 'to_x'"):
        lora_target_modules(transformer, [4], ["to_x"])


def test_saved_lora_reloads_with_alpha_and_norms_match(tiny_sd3, tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    transformer = pipe.transformer
    add_lora(transformer, lora_config(lora_target_modules(transformer, [4, 5]), rank=4, alpha=8))
    torch.manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    with torch.no_grad():
        trained = transformer(*_inputs()).sample
    save_lora(transformer, tmp_path / "ckpt")

    # Direct computation of each block's weight change: (alpha / r) * B @ A, alpha/r = 2.
    expected: dict[int, float] = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
            block = int(name.split("transformer_blocks.")[1].split(".")[0])
            expected[block] = expected.get(block, 0.0) + float(delta.pow(2).sum())
    norms = lora_delta_norms(tmp_path / "ckpt")
    assert sorted(norms) == [4, 5]
    for block, sq in expected.items():
        assert norms[block] == pytest.approx(sq**0.5, rel=1e-5)

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with torch.no_grad():
        base = fresh.transformer(*_inputs()).sample
    load_lora_into_pipeline(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        reloaded = fresh.transformer(*_inputs()).sample
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_missing_lora_folder_is_a_clear_error(tiny_sd3, tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with pytest.raises(InputError, match="LoRA folder not found"):
        load_lora_into_pipeline(pipe, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no pytorch_lora_weights.safetensors"):
        load_lora_into_pipeline(pipe, tmp_path / "empty")
