"""ComfyUI/kohya export of a diffusers LoRA: exact round trip and ComfyUI's weight-delta semantics."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_state_dict, lora_target_modules, save_lora
from sd3_lora_celeba.models.lora_export import from_comfyui, read_diffusers_lora


def small_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, out_channels=16, pos_embed_max_size=16,
    ).eval()  # fmt: skip


@pytest.fixture
def lora_folder(tmp_path):
    model = small_transformer()
    add_lora(model, lora_config(lora_target_modules(model, [0, 2]), rank=2, alpha=3.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # a trained-looking adapter, B != 0
    save_lora(model, tmp_path / "checkpoint-000010")
    return tmp_path / "checkpoint-000010"


def _export(folder, out, *extra):
    result = CliRunner().invoke(cli, ["--quiet", "export-lora", str(folder), str(out), *extra])
    return result


def test_round_trip_is_exact(lora_folder, tmp_path):
    out = tmp_path / "comfy.safetensors"
    result = _export(lora_folder, out, "--format", "comfyui")
    assert result.exit_code == 0, result.output
    state = load_file(str(out))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in state
    assert "lora_unet_joint_blocks_2_x_block_attn_proj.alpha" in state
    # The last block has no to_add_out (context_pre_only): no context proj key for it.
    assert "lora_unet_joint_blocks_2_context_block_attn_proj.lora_up.weight" not in state
    assert state["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape == (6, 16)
    original, alpha, _ = read_diffusers_lora(lora_folder)
    back, back_alpha = from_comfyui(state)
    assert back_alpha == alpha == 3.0
    assert back.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(back[key], original[key], rtol=0, atol=0)


def test_comfyui_deltas_equal_the_diffusers_deltas(lora_folder, tmp_path):
    """ComfyUI applies up @ down * alpha / down.shape[0] to the fused MM-DiT weight: same change as diffusers."""
    out = tmp_path / "comfy.safetensors"
    assert _export(lora_folder, out).exit_code == 0
    state = load_file(str(out))
    original, alpha, rank = read_diffusers_lora(lora_folder)
    for block, stream, parts in ((0, "x_block", ("to_q", "to_k", "to_v")), (2, "context_block", ("add_q_proj", "add_k_proj", "add_v_proj"))):  # fmt: skip
        name = f"lora_unet_joint_blocks_{block}_{stream}_attn_qkv"
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        comfy_delta = up @ down * float(state[f"{name}.alpha"]) / down.shape[0]  # (3 out, in)
        diffusers_delta = torch.cat(
            [original[f"transformer_blocks.{block}.attn.{p}.lora_B.weight"]
             @ original[f"transformer_blocks.{block}.attn.{p}.lora_A.weight"] * alpha / rank for p in parts]
        )  # fmt: skip
        torch.testing.assert_close(comfy_delta, diffusers_delta, rtol=1e-5, atol=1e-6)


def test_export_refuses_to_clobber_and_bad_input(lora_folder, tmp_path):
    out = tmp_path / "comfy.safetensors"
    assert _export(lora_folder, out).exit_code == 0
    again = _export(lora_folder, out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert _export(lora_folder, out, "--overwrite", "--dtype", "float16").exit_code == 0
    assert (
        load_file(str(out))["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].dtype == torch.float16
    )
    missing = _export(tmp_path / "nope", tmp_path / "x.safetensors")
    assert missing.exit_code == 2 and "LoRA folder not found" in missing.output
    bad_suffix = _export(lora_folder, tmp_path / "x.bin")
    assert bad_suffix.exit_code == 2 and "must end in .safetensors" in bad_suffix.output


def test_zero_initialised_lora_leaves_outputs_unchanged():
    model = small_transformer()
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, 8),
        "encoder_hidden_states": torch.randn(2, 5, 16),
        "pooled_projections": torch.randn(2, 8),
        "timestep": torch.tensor([100.0, 900.0]),
    }
    with torch.no_grad():
        before = model(**inputs).sample
        add_lora(model, lora_config(lora_target_modules(model, [0, 1, 2]), rank=4, init=True))
        after = model(**inputs).sample
    assert len(lora_state_dict(model)) > 0
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # The same adapter with B != 0 does change the output: the test above could fail.
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(0.5)
        assert not torch.allclose(model(**inputs).sample, before)
