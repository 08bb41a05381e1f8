"""LoRA targets (attn2 of SD3.5 included), save/load through stock diffusers (alpha kept), per-block norms."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import load_transformer
from sd3_lora_celeba.models.lora import (
    JOINT_ATTENTION_LINEARS,
    add_lora,
    default_lora_layers,
    dual_attention_blocks,
    load_lora_into_pipeline,
    lora_config,
    lora_delta_norms,
    lora_target_modules,
    save_lora,
)


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


@pytest.fixture(scope="module")
def tiny_sd35_medium(tiny_sd3_family):
    return tiny_sd3_family("sd3.5-medium")


def test_sd3_default_targets_are_the_joint_attention_only(tiny_sd3):
    transformer = StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer
    assert default_lora_layers(transformer) == JOINT_ATTENTION_LINEARS
    assert lora_target_modules(transformer, [4, 5]) == lora_target_modules(
        transformer, [4, 5], JOINT_ATTENTION_LINEARS
    )
    with pytest.raises(ValueError, match="no dual-attention \\(attn2\\) blocks"):
        lora_target_modules(transformer, [4], ["to_q", "attn2.to_q"])


def test_sd35_medium_targets_attn2_of_dual_attention_blocks(tiny_sd35_medium):
    transformer = load_transformer(str(tiny_sd35_medium))
    assert dual_attention_blocks(transformer) == tuple(range(13))
    targets = lora_target_modules(transformer, [12, 13])
    assert "transformer_blocks.12.attn2.to_q" in targets and "transformer_blocks.12.attn2.to_out.0" in targets
    assert not any(t.startswith("transformer_blocks.13.attn2") for t in targets)  # block 13 has no attn2
    assert len(targets) == 8 + 4 + 8
    # Explicit names: the joint "to_q" and "attn.to_q" are the same layer; attn2 only where it exists.
    assert lora_target_modules(transformer, [0], ["to_q", "attn2.to_q"]) == [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn2.to_q",
    ]
    assert lora_target_modules(transformer, [0], ["attn.to_q"]) == ["transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="none of the chosen --lora-blocks has attn2.*blocks are 0..12"):
        lora_target_modules(transformer, [13, 14], ["attn2.to_q"])
    with pytest.raises(ValueError, match="no linear layer 'attn2.add_q_proj'"):
        lora_target_modules(transformer, [0], ["attn2.add_q_proj"])


def test_sd35_attn2_lora_loads_in_stock_pipeline(tiny_sd35_medium, tmp_path):
    """The diffusers-format file with attn2 keys loads in stock load_lora_weights and gives the trained outputs."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35_medium)
    transformer = pipe.transformer
    add_lora(transformer, lora_config(lora_target_modules(transformer, [0, 1, 13]), rank=2, alpha=2))
    torch.manual_seed(2)
    for name, p in transformer.named_parameters():
        if "lora_B" in name and ".attn2." in name:  # only attn2 changes: proves its keys are read back
            p.data.normal_(0, 0.2)
    with torch.no_grad():
        trained = transformer(*_inputs()).sample
    save_lora(transformer, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert "transformer.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys

    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_sd35_medium)
    with torch.no_grad():
        base = fresh.transformer(*_inputs()).sample
    fresh.load_lora_weights(str(tmp_path / "ckpt"))  # stock diffusers, no helper
    with torch.no_grad():
        reloaded = fresh.transformer(*_inputs()).sample
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-6)


def test_alpha_other_than_rank_warns_about_comfyui_once(tiny_sd3, tmp_path, caplog, monkeypatch):
    import sd3_lora_celeba.models.lora as lora_module

    monkeypatch.setattr(lora_module, "_warned_alpha", set())  # "once per process": forget earlier tests
    transformer = load_transformer(str(tiny_sd3))
    add_lora(transformer, lora_config(lora_target_modules(transformer, [4]), rank=4, alpha=8))
    with caplog.at_level("WARNING", logger="sd3_lora_celeba.models.lora"):
        save_lora(transformer, tmp_path / "a")
        save_lora(transformer, tmp_path / "b")
    warnings = [r.getMessage() for r in caplog.records if "ComfyUI" in r.getMessage()]
    assert len(warnings) == 1 and "0.5 times" in warnings[0] and "export-lora" in warnings[0]
    same = load_transformer(str(tiny_sd3))
    add_lora(same, lora_config(lora_target_modules(same, [4]), rank=4))
    caplog.clear()
    with caplog.at_level("WARNING", logger="sd3_lora_celeba.models.lora"):
        save_lora(same, tmp_path / "c")
    assert not [r for r in caplog.records if "ComfyUI" in r.getMessage()]
