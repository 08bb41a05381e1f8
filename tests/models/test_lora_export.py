"""ComfyUI/kohya export of a diffusers LoRA: exact round trip and ComfyUI's weight-delta semantics."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

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


@pytest.fixture
def export(run_cli):
    """``export(folder, out, *extra)``: ``sd3 --quiet export-lora FOLDER OUT EXTRA...`` (the CLI's log style)."""
    return lambda folder, out, *extra: run_cli("export-lora", folder, out, *extra, logging_style=None)


def test_round_trip_is_exact(lora_folder, tmp_path, export):
    out = tmp_path / "comfy.safetensors"
    result = export(lora_folder, out, "--format", "comfyui", "--dtype", "float32")
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


def test_comfyui_deltas_equal_the_diffusers_deltas(lora_folder, tmp_path, export):
    """ComfyUI applies up @ down * alpha / down.shape[0] to the fused MM-DiT weight: same change as diffusers."""
    out = tmp_path / "comfy.safetensors"
    assert export(lora_folder, out, "--dtype", "float32").exit_code == 0
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


def test_export_refuses_to_clobber_and_bad_input(lora_folder, tmp_path, export):
    out = tmp_path / "comfy.safetensors"
    assert export(lora_folder, out).exit_code == 0
    default = load_file(str(out))  # half precision by default, alpha scalars kept in fp32
    assert default["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].dtype == torch.float16
    assert default["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].dtype == torch.float32
    again = export(lora_folder, out)
    assert again.exit_code == 2 and "already exists" in again.output
    assert export(lora_folder, out, "--overwrite", "--dtype", "float32").exit_code == 0
    assert (
        load_file(str(out))["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].dtype == torch.float32
    )
    missing = export(tmp_path / "nope", tmp_path / "x.safetensors")
    assert missing.exit_code == 2 and "LoRA folder not found" in missing.output
    bad_suffix = export(lora_folder, tmp_path / "x.bin")
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


# ComfyUI's SD3/SD3.5 key map (comfy/utils.py mmdit_to_diffusers + comfy/lora.py "lora_unet_" keys), written out
# for the attention linears: diffusers module of block i -> (MM-DiT module of joint_blocks.i, row slice q|k|v).
COMFYUI_ATTENTION_MAP = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", 0),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn.to_add_out": ("context_block.attn.proj", 0),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn2.to_out.0": ("x_block.attn2.proj", 0),
}


def sd35_medium_like() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, num_layers=3, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, out_channels=16, pos_embed_max_size=16,
        dual_attention_layers=(0, 1), qk_norm="rms_norm",
    ).eval()  # fmt: skip


def test_sd35_attn2_keys_follow_comfyui_map_and_deltas_match(tmp_path, export):
    model = sd35_medium_like()
    add_lora(model, lora_config(lora_target_modules(model, [0, 1, 2]), rank=2, alpha=4.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    save_lora(model, tmp_path / "ckpt")
    out = tmp_path / "comfy.safetensors"
    assert export(tmp_path / "ckpt", out, "--dtype", "float32").exit_code == 0
    state = load_file(str(out))
    original, alpha, rank = read_diffusers_lora(tmp_path / "ckpt")
    assert any(".attn2." in k for k in original)
    checked = 0
    for key in original:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")  # transformer_blocks.{i}.attn2.to_k
        block, part = module.split(".", 2)[1:]
        mmdit, row = COMFYUI_ATTENTION_MAP[part]
        name = "lora_unet_" + f"joint_blocks.{block}.{mmdit}".replace(".", "_")
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        comfy_delta = up @ down * float(state[f"{name}.alpha"]) / down.shape[0]  # what ComfyUI adds
        out_dim = comfy_delta.shape[0] // (3 if mmdit.endswith("qkv") else 1)
        expected = original[f"{module}.lora_B.weight"] @ original[key] * alpha / rank
        torch.testing.assert_close(
            comfy_delta[row * out_dim : (row + 1) * out_dim], expected, rtol=1e-5, atol=1e-6
        )
        checked += 1
    assert checked == len(original) // 2
    assert "lora_unet_joint_blocks_1_x_block_attn2_proj.lora_up.weight" in state
    assert not any(k.startswith("lora_unet_joint_blocks_2_x_block_attn2") for k in state)  # block 2: no attn2
    back, back_alpha = from_comfyui(state)
    assert back_alpha == alpha and back.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(back[key], original[key], rtol=0, atol=0)
