"""Attention capture against a direct computation, on the tiny SD3 and on an SD3.5-shaped (dual-attention) model."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from sd3_lora_celeba.visualize import capture as capture_module
from sd3_lora_celeba.visualize.capture import (
    capture_attention,
    dual_blocks,
    image_to_text_probabilities,
    one_hot_attention_probabilities,
    text_to_image_probabilities,
)

MAX_SEQ = 12  # T5 positions; text tokens = 77 CLIP + 12 T5
KEPT = (0, 1, 2, 5, 77, 78, 80)  # a prompt's real tokens: CLIP start, two words, end; three T5 pieces


def _inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, 77 + MAX_SEQ, transformer.config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(
            batch, transformer.config.pooled_projection_dim, generator=generator
        ),
        "timestep": torch.full((batch,), 500.0),
    }


def _split(attn, x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _norm(layer, x):
    return x if layer is None else layer(x)  # SD3-medium has no q/k norm, SD3.5 has


def _direct(attn, hidden_states, encoder_hidden_states):
    """Full joint attention probabilities (B, heads, N, N) straight from the block's projections."""
    q = torch.cat(
        [
            _norm(attn.norm_q, _split(attn, attn.to_q(hidden_states))),
            _norm(attn.norm_added_q, _split(attn, attn.add_q_proj(encoder_hidden_states))),
        ],
        dim=2,
    )
    k = torch.cat(
        [
            _norm(attn.norm_k, _split(attn, attn.to_k(hidden_states))),
            _norm(attn.norm_added_k, _split(attn, attn.add_k_proj(encoder_hidden_states))),
        ],
        dim=2,
    )
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _grab_inputs(module):
    seen = {}

    def grab(mod, args, kwargs, output):
        seen.update(kwargs)

    return seen, module.register_forward_hook(grab, with_kwargs=True)


@pytest.fixture(scope="module")
def dual_transformer():
    """SD3.5-medium-like: blocks 0 and 1 have a second image self-attention, RMS q/k norm."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=24,
        out_channels=16,
        pos_embed_max_size=8,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    ).eval()


@pytest.mark.parametrize("model", ["sd3", "sd3.5"])
@torch.no_grad()
def test_capture_matches_direct_softmax_and_keeps_output(model, tiny_pipe, dual_transformer):
    transformer = tiny_pipe.transformer if model == "sd3" else dual_transformer
    inputs = _inputs(transformer)
    block = 5 if model == "sd3" else 1
    reference = transformer(**inputs).sample
    seen, hook = _grab_inputs(transformer.transformer_blocks[block].attn)
    try:
        with capture_attention(transformer, blocks=[block], cfg=True, kept_columns=KEPT) as capture:
            captured_out = transformer(**inputs).sample
    finally:
        hook.remove()
    assert torch.equal(captured_out, reference)  # denoising is unchanged

    result = capture.result()
    n_img = 16  # (8 / patch 2) ** 2
    assert result.grid == (4, 4) and result.blocks == (block,) and result.steps == (0,)
    i2t, t2i = result.image_to_text[(block, 0)], result.text_to_image[(block, 0)]
    assert i2t.shape == (n_img, len(KEPT)) and t2i.shape == (len(KEPT), n_img)
    assert i2t.dtype == torch.float16  # stored compactly

    probs = _direct(
        transformer.transformer_blocks[block].attn, seen["hidden_states"], seen["encoder_hidden_states"]
    )
    cond = probs[1].mean(dim=0)  # conditional half of the [uncond, cond] batch, mean over heads
    kept = torch.tensor(KEPT) + n_img
    torch.testing.assert_close(i2t.float(), cond[:n_img][:, kept], rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(t2i.float(), cond[kept][:, :n_img], rtol=2e-3, atol=1e-5)
    # The unconditional half really differs, so keeping the right half matters.
    assert not torch.allclose(probs[0].mean(0)[:n_img][:, kept], cond[:n_img][:, kept], atol=1e-4)
    sources = result.feature_sources()
    expected = ["output", "query", "key", "value"]
    assert sources == (expected + [f"attn2 {s}" for s in expected] if model == "sd3.5" else expected)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert result.features[("query", block)].shape == (n_img + len(KEPT), width)
    assert result.features[("output", block)].shape == (n_img, width)
    if model == "sd3.5":
        assert result.features[("attn2 key", block)].shape == (n_img, width)


@torch.no_grad()
def test_attn2_of_dual_blocks_is_its_own_source(dual_transformer):
    assert dual_blocks(dual_transformer) == (0, 1)
    inputs = _inputs(dual_transformer)
    attn2 = dual_transformer.transformer_blocks[0].attn2
    seen, hook = _grab_inputs(attn2)
    try:
        with capture_attention(dual_transformer, blocks=[0, 3], kept_columns=KEPT) as capture:
            dual_transformer(**inputs)
    finally:
        hook.remove()
    result = capture.result()
    keys = _norm(attn2.norm_k, _split(attn2, attn2.to_k(seen["hidden_states"])))[1]  # cond half
    expected = keys.transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(result.features[("attn2 key", 0)].float(), expected, rtol=2e-3, atol=2e-3)
    assert ("attn2 key", 3) not in result.features  # block 3 has no second attention
    assert not torch.allclose(
        result.features[("attn2 key", 0)].float(), result.features[("key", 0)][:16].float()
    )


def test_kept_probabilities_are_the_softmax_columns(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 40, 8, generator=generator)
    key = torch.randn(2, 3, 40, 8, generator=generator)
    kept = torch.tensor([0, 3, 14])
    direct = torch.softmax(query @ key.transpose(-1, -2) / 8**0.5, -1).mean(1)
    torch.testing.assert_close(image_to_text_probabilities(query, key, 25, kept), direct[:, :25, 25 + kept])
    # The fused (GPU) form, its values padded to the width CUDA's memory-efficient kernel takes (3 -> 8 columns),
    # and the CPU form in chunks of a few queries.
    widths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: widths.append(v.shape[-1]) or sdpa(q, k, v, **kw),
    )
    torch.testing.assert_close(
        one_hot_attention_probabilities(query, key, 25, kept), direct[:, :25, 25 + kept]
    )
    assert widths == [capture_module.VALUE_ALIGNMENT]
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(capture_module, "CPU_SCORE_ELEMENTS", 2 * 3 * 40 * 4)  # 4 queries per chunk
    torch.testing.assert_close(image_to_text_probabilities(query, key, 25, kept), direct[:, :25, 25 + kept])
    torch.testing.assert_close(text_to_image_probabilities(query, key, 25, kept), direct[:, 25 + kept, :25])


@torch.no_grad()
def test_pipeline_output_unchanged_and_maps_per_block_and_step(tiny_pipe):
    kwargs = dict(
        prompt="a photo of a smiling woman",
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=MAX_SEQ,
        output_type="latent",
    )
    reference = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    with capture_attention(tiny_pipe.transformer, blocks=[0, 23], steps=[1, 2], kept_columns=KEPT) as capture:
        captured = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(captured, reference)
    assert capture.steps_seen == [1, 2] and capture.step == 2
    result = capture.result()
    assert sorted(result.image_to_text) == [(0, 1), (0, 2), (23, 1), (23, 2)]
    # Other blocks/steps are means over stored maps: explored without running the model again.
    both = result.mean_map("image_to_text")
    first = result.mean_map("image_to_text", blocks=[0], steps=[1])
    manual = sum(result.image_to_text[k].float() for k in result.image_to_text) / 4
    torch.testing.assert_close(both, manual)
    torch.testing.assert_close(first, result.image_to_text[(0, 1)].float())
    assert result.nbytes() == 4 * 2 * 16 * len(KEPT) * 2 + sum(
        t.numel() * 2 for t in result.features.values()
    )
    with pytest.raises(ValueError, match="captured blocks 0,23, steps 1-2"):
        result.select([4], None)


def test_processors_restored_after_error(tiny_pipe):
    transformer = tiny_pipe.transformer
    before = transformer.attn_processors
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(transformer, blocks=[1, 2]):
            assert (
                type(transformer.attn_processors["transformer_blocks.1.attn.processor"])
                is not JointAttnProcessor2_0
            )
            raise RuntimeError("boom")
    after = transformer.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not transformer._forward_pre_hooks


def test_bad_block_is_rejected(tiny_pipe):
    with pytest.raises(ValueError, match=r"0\.\.23"):
        with capture_attention(tiny_pipe.transformer, blocks=[24]):
            pass


def test_no_host_sync_in_the_step_counter(tiny_pipe, monkeypatch):
    """The step counter reads shapes only: converting a tensor to a Python number would stall a GPU."""
    transformer = tiny_pipe.transformer
    inputs = _inputs(transformer)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync during capture")

    with capture_attention(transformer, blocks=[3], kept_columns=KEPT) as capture:
        monkeypatch.setattr(torch.Tensor, "item", refuse)
        monkeypatch.setattr(torch.Tensor, "__float__", refuse)
        monkeypatch.setattr(torch.Tensor, "tolist", refuse)
        with torch.no_grad():
            transformer(**inputs)
            transformer(**inputs)
        monkeypatch.undo()
    assert capture.steps_seen == [0, 1]
