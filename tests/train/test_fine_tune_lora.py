"""A trained checkpoint loads in stock diffusers (alpha kept) and reproduces the trained transformer's output."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from sd3_lora_celeba.train import checkpoint as ckpt
from sd3_lora_celeba.train.recipe import FineTuneConfig, build_transformer


def _inputs(transformer):
    g = torch.Generator().manual_seed(0)
    dim = transformer.config.joint_attention_dim
    return {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 20, dim, generator=g),
        "pooled_projections": torch.randn(2, transformer.config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([200.0, 800.0]),
    }


def test_checkpoint_loads_in_stock_diffusers_and_matches_training_model(golden_run, tiny_world, tiny_sd3):
    checkpoint = golden_run / "checkpoint-000004"
    # The training-side model: the recipe's transformer with the checkpoint's LoRA (what resume restores).
    config = FineTuneConfig(
        train_dir=tiny_world / "train", empty_prompt_dir=tiny_world / "empty-prompt", model_name=str(tiny_sd3),
        lora_blocks=(4, 5, 22), lora_rank=4, lora_alpha=8.0,
    )  # fmt: skip
    trained = build_transformer(config).eval()
    ckpt.load_lora_weights(trained, checkpoint)
    inputs = _inputs(trained)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with torch.no_grad():
        base = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(checkpoint))  # stock diffusers, no help from this package
        stock = pipe.transformer(**inputs).sample
        ours = trained(**inputs).sample
    assert (stock - base).abs().max() > 1e-4  # the LoRA really changes the model
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)
