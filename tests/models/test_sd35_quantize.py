"""--quantize-base: int8 frozen linears (torchao) under an fp32 LoRA: trains, stays close, takes less memory."""

from __future__ import annotations

import pytest
import torch

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import load_transformer
from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules
from sd3_lora_celeba.models.quantize import parameter_bytes, quantize_frozen_base


@pytest.fixture(scope="module")
def tiny_sd35(tiny_sd3_family):
    return tiny_sd3_family("sd3.5-medium")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=g),  # latents (B, 16, H/8, W/8)
        "encoder_hidden_states": torch.randn(2, 90, 64, generator=g),  # prompt_embeds (B, 77 + 13 T5, D)
        "pooled_projections": torch.randn(2, 48, generator=g),
        "timestep": torch.tensor([250.0, 750.0]),
    }


def _with_lora(model):
    torch.manual_seed(0)
    add_lora(model, lora_config(lora_target_modules(model, [0, 1, 12, 13]), rank=4))
    return model


def test_quantized_base_trains_a_lora_step_close_to_the_full_precision_one(tiny_sd35):
    full = _with_lora(load_transformer(str(tiny_sd35)))
    quant = load_transformer(str(tiny_sd35))
    assert quantize_frozen_base(quant) > 100
    quant = _with_lora(quant)

    lora = [n for n, p in quant.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert all(
        p.dtype == torch.float32 and type(p.data) is torch.Tensor
        for p in quant.parameters()
        if p.requires_grad
    )
    assert type(quant.transformer_blocks[0].attn2.to_q.base_layer.weight).__name__ != "Parameter"

    losses, outputs = [], []
    with torch.no_grad():
        quant_before = quant(**_inputs()).sample
    for model in (full, quant):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model_pred = model(**_inputs()).sample
        loss = model_pred.float().pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            outputs.append(model(**_inputs()).sample)
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    rel = (outputs[1] - outputs[0]).norm() / outputs[0].norm()
    assert 0 < rel < 0.02  # int8 rounding moves the output a little, never a lot
    # The step changed the quantized model's output: the LoRA learns on top of the int8 base.
    assert (outputs[1] - quant_before).abs().max() > 1e-3


def test_quantized_base_takes_about_half_the_bf16_bytes():
    """A mid-size transformer (24 blocks, width 384, SD3.5-medium layout) in bf16 vs int8 linears."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32, num_layers=24, attention_head_dim=64, num_attention_heads=6, joint_attention_dim=384,
        caption_projection_dim=384, pooled_projection_dim=384, out_channels=16, pos_embed_max_size=64,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ).to(torch.bfloat16).eval()  # fmt: skip
    before = parameter_bytes(model)
    assert before == pytest.approx(2 * sum(p.numel() for p in model.parameters()), rel=0.02)
    quantize_frozen_base(model)
    after = parameter_bytes(model)
    assert 0.45 < after / before < 0.56


def test_quantize_refuses_a_model_with_lora_and_needs_torchao(tiny_sd35, monkeypatch):
    model = _with_lora(load_transformer(str(tiny_sd35)))
    with pytest.raises(ValueError, match="before add_lora"):
        quantize_frozen_base(model)
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(InputError, match=r"pip install 'sd3-lora-celeba\[quant\]'"):
        quantize_frozen_base(load_transformer(str(tiny_sd35)))
