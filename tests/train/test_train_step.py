"""The one training step (recipe.train_step): what the loop and the benchmark run; compiled or not, the same."""

from __future__ import annotations

import itertools

import pytest
import torch

from sd3_lora_celeba.train import flow, recipe


def _parts(tiny_sd3, compile_backend: str | None):
    config = recipe.FineTuneConfig(
        train_dir=".", empty_prompt_dir=".", model_name=str(tiny_sd3), lora_blocks=(1, 2), lora_rank=4,
        learning_rate=1e-2, lr_warmup_steps=0, gradient_accumulation_steps=2,
    )  # fmt: skip
    accelerator, dtype = recipe.make_accelerator(config)
    torch.manual_seed(0)
    model = recipe.build_transformer(config, dtype)
    if compile_backend:
        recipe.compile_blocks(model, backend=compile_backend)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe.build_optimizer(config, params, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return config, accelerator, dtype, model.train(), optimizer, params


def _batch(model) -> dict:
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    side = cfg.sample_size
    draws = [flow.NoiseDraw("logit_normal", 3.0)(s, torch.Size((16, side, side))) for s in (5, 6)]
    return {
        "latents": torch.randn(2, 16, side, side, generator=g),
        "prompt_embeds": torch.randn(2, 10, cfg.joint_attention_dim, generator=g).half(),  # storage dtype
        "pooled_prompt_embeds": torch.randn(2, cfg.pooled_projection_dim, generator=g).half(),
        "noise": torch.stack([d["noise"] for d in draws]),
        "sigmas": torch.stack([d["sigmas"] for d in draws]),
    }


def test_cpu_defaults_are_float32_without_autocast(tiny_sd3):
    config, accelerator, dtype, model, *_ = _parts(tiny_sd3, None)
    assert dtype == torch.float32 and accelerator.mixed_precision == "no"
    assert recipe.resolve_precision(config, torch.device("cpu")) == (torch.float32, "no")
    amp = recipe.FineTuneConfig(train_dir=".", empty_prompt_dir=".", amp=True)
    assert recipe.resolve_precision(amp, torch.device("cpu")) == (torch.float32, "bf16")  # the seed's --amp


@pytest.mark.parametrize(
    "bf16, expected", [(True, (torch.bfloat16, "bf16")), (False, (torch.float16, "fp16"))]
)
def test_cuda_defaults_are_bf16_storage_and_autocast(monkeypatch, bf16, expected):
    """On CUDA: frozen weights in bf16 with bf16 autocast (fp16 + GradScaler where the GPU has no bf16)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    config = recipe.FineTuneConfig(train_dir=".", empty_prompt_dir=".")
    assert recipe.resolve_precision(config, torch.device("cuda")) == expected
    no_amp = recipe.FineTuneConfig(train_dir=".", empty_prompt_dir=".", amp=False, precision="float32")
    assert recipe.resolve_precision(no_amp, torch.device("cuda")) == (torch.float32, "no")


def test_train_step_updates_the_lora_and_compiled_blocks_agree(tiny_sd3):
    """--compile (regional, here with the aot_eager backend: no C++ toolchain needed in the test) gives the
    same loss and the same LoRA update as the eager step."""
    results = []
    for backend in (None, "aot_eager"):
        config, accelerator, dtype, model, optimizer, params = _parts(tiny_sd3, backend)
        before = [p.detach().clone() for p in params]
        batches = itertools.repeat(_batch(accelerator.unwrap_model(model)))
        result = recipe.train_step(model, optimizer, params, batches, config, accelerator, dtype)
        assert not result.skipped and result.loss > 0 and result.grad_norm > 0
        assert result.sigmas.shape == (4,)  # 2 micro-batches of 2
        assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
        results.append((result.loss, [p.detach().clone() for p in params]))
    (eager_loss, eager_params), (compiled_loss, compiled_params) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for a, b in zip(eager_params, compiled_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
