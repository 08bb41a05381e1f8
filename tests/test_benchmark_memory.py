"""The memory estimate counts what PyTorch's allocator holds, and fake tensors count what real ones would."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sd3_lora_celeba.models.families import count_parameters
from sd3_lora_celeba.testing.published import SD3_MEDIUM, SD3_VAE, SD35_MEDIUM

# Small models of the real layouts (SD3-medium's; SD3.5-medium's qk norms and attn2), the real prompt widths.
SMALL = {
    "sd3-medium": {**SD3_MEDIUM, "num_layers": 6, "num_attention_heads": 2, "caption_projection_dim": 128,
                   "sample_size": 32, "pos_embed_max_size": 32},
    "sd3.5-medium": {**SD35_MEDIUM, "num_layers": 6, "num_attention_heads": 2, "caption_projection_dim": 128,
                     "sample_size": 32, "pos_embed_max_size": 32, "dual_attention_layers": [0, 1, 2]},
}  # fmt: skip
SMALL_VAE = {**SD3_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}


@pytest.fixture(scope="module")
def memory(load_benchmark):
    return load_benchmark("estimate_memory")


def real_step(memory, config: dict, checkpointing: bool):
    model = memory.lora_transformer(config, checkpointing)
    step, kept = memory.step_fn(model, config, batch_size=1)
    with memory.cuda_autocast_norms():
        step()  # the optimizer state exists from here on
    return model, step, kept


def allocator_peak_rise(step) -> int:
    """Peak bytes above the start that PyTorch's CPU allocator reports over one step (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    assert live == 0  # a step frees what it allocates
    return peak


@contextlib.contextmanager
def without_onednn():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("checkpointing", [True, False])
def test_counted_peak_is_the_allocators(memory, family, checkpointing):
    # Without oneDNN: on a CPU with no native bf16 (no avx512_bf16), its bf16 products take an fp32 scratch
    # buffer from PyTorch's allocator inside the kernel (1.5 MB for a 1000 x 384 output), which no tensor holds;
    # the estimate leaves kernel workspaces out by design, as it does cuBLAS's. PyTorch's own bf16 kernels take
    # none, so what is compared is the tensors alone, on any CPU.
    with without_onednn():
        _, step, kept = real_step(memory, SMALL[family], checkpointing)
        start, peak = memory.peak_bytes(step, kept, steps=1, block=1)
        with memory.cuda_autocast_norms():
            rise = allocator_peak_rise(step)
    assert rise > 2**20
    assert peak - start == pytest.approx(rise, rel=0.02)


@pytest.mark.parametrize("family", list(SMALL))
def test_fake_tensors_count_what_real_ones_do(memory, family):
    config = SMALL[family]
    real = memory.estimate(config, batch_size=1, checkpointing=True, fake=False)
    assert memory.estimate(config, batch_size=1, checkpointing=True) == real
    real = memory.estimate_generation(config, SMALL_VAE, batch_size=2, fake=False)
    assert memory.estimate_generation(config, SMALL_VAE, batch_size=2) == real


def test_estimate_parts(memory):
    config = SMALL["sd3.5-medium"]
    on = memory.estimate(config, batch_size=1, checkpointing=True)
    off = memory.estimate(config, batch_size=1, checkpointing=False)
    assert on["frozen"] == off["frozen"] and on["lora_state"] == off["lora_state"]
    assert on["frozen"] > 2 * count_parameters(config)  # bf16 weights plus the position-embedding buffer
    assert on["frozen"] + on["lora_state"] < on["peak"] < off["peak"]


def test_generation_parts(memory):
    config = SMALL["sd3-medium"]
    one, two = (memory.estimate_generation(config, SMALL_VAE, batch_size=b) for b in (1, 2))
    fused = memory.estimate_generation(config, SMALL_VAE, batch_size=1, fused_qkv=True)
    assert one["resident"] < one["denoise"] and one["resident"] < one["decode"]
    assert two["decode"] > one["decode"] and two["denoise"] > one["denoise"]
    assert one["peak"] == max(one["denoise"], one["decode"])
    with torch.device("meta"):  # diffusers adds the joined projections and keeps the separate ones
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel(**config).to(torch.bfloat16)
        transformer.fuse_qkv_projections()
    joined = [p for n, p in transformer.named_parameters() if ".to_qkv." in n or ".to_added_qkv." in n]
    assert joined
    blocks = sum(memory.allocator_bytes(p.numel() * p.element_size()) for p in joined)
    assert fused["resident"] - one["resident"] == blocks


def tiny_encoders() -> list:
    """Stand-ins for the three text encoders, T5's tied embeddings included."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = dict(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=99
    )
    t5 = T5Config(d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2, vocab_size=99)
    return [CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=16)), T5EncoderModel(t5)]


@pytest.mark.parametrize("family", list(SMALL))
def test_app_counts_encoders_once_and_capture_until_the_decode(memory, family):
    config = SMALL[family]
    plain = memory.estimate_generation(config, SMALL_VAE, batch_size=1)
    app = memory.estimate_generation(config, SMALL_VAE, batch_size=1, app_encoders=tiny_encoders)
    assert (
        memory.estimate_generation(config, SMALL_VAE, batch_size=1, app_encoders=tiny_encoders, fake=False)
        == app
    )
    encoders = [e.to(torch.bfloat16) for e in tiny_encoders()]
    assert encoders[1].shared.weight is encoders[1].encoder.embed_tokens.weight  # tied: counted once
    tensors = [t for e in encoders for t in (*e.parameters(), *e.buffers())]
    weights = sum(memory.allocator_bytes(t.numel() * t.element_size()) for t in tensors)
    assert (
        app["resident"] - plain["resident"] == weights
    )  # bf16 weights, int64 position ids, in allocator blocks
    assert app["captured"] > 0 and plain["captured"] == 0
    assert app["decode"] - app["resident"] >= plain["decode"] - plain["resident"] + app["captured"]
    # --offload model: the encoders are never beside the transformer, nor the transformer beside the decode
    each = [sum(memory.allocator_bytes(t.nbytes) for t in (*e.parameters(), *e.buffers())) for e in encoders]
    assert max(each) <= app["offload_peak"] <= app["peak"] - weights
    assert app["offload_peak"] >= app["captured"] + plain["decode"] - plain["resident"]


def test_validation_keeps_the_trained_model_and_its_optimizer_state(memory):
    config, rank = SMALL["sd3-medium"], 8
    plain = memory.estimate_generation(config, SMALL_VAE, batch_size=2)
    validation = memory.estimate_generation(config, SMALL_VAE, batch_size=2, validation_rank=rank)
    assert (
        memory.estimate_generation(config, SMALL_VAE, batch_size=2, validation_rank=rank, fake=False)
        == validation
    )
    with torch.device("meta"):
        trained = [p for p in memory.lora_transformer(config, False, rank).parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    lora = sum(memory.allocator_bytes(p.numel() * p.element_size()) for p in trained)
    assert validation["resident"] - plain["resident"] == 3 * lora  # the LoRA, AdamW's exp_avg and exp_avg_sq
    # the unfused LoRA's products (and its float32 inputs) add to the transformer's activations
    assert validation["denoise"] - validation["resident"] > plain["denoise"] - plain["resident"]
    assert validation["decode"] - validation["resident"] == plain["decode"] - plain["resident"]


def test_layer_norms_run_in_float32_under_autocast_only(memory):
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with memory.cuda_autocast_norms():
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16  # restored
