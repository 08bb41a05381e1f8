"""Attention capture against a direct computation on the tiny SD3, and its invariants."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from sd3_lora_celeba.visualize.capture import capture_attention, chunked_joint_probabilities

MAX_SEQ = 12  # T5 positions; text tokens = 77 CLIP + 12 T5


def _transformer_inputs(pipe, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    t = pipe.transformer
    return {
        "hidden_states": torch.randn(batch, 16, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, 77 + MAX_SEQ, t.config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(batch, t.config.pooled_projection_dim, generator=generator),
        "timestep": torch.full((batch,), 500.0),
    }


def _direct_probabilities(
    attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """Full joint attention probabilities (B, heads, N, N) straight from the block's projections."""
    b, heads = hidden_states.shape[0], attn.heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    def norm(layer, x: torch.Tensor) -> torch.Tensor:
        return x if layer is None else layer(x)  # SD3-medium has no q/k norm, SD3.5 has

    q_img, k_img = (
        norm(attn.norm_q, split(attn.to_q(hidden_states))),
        norm(attn.norm_k, split(attn.to_k(hidden_states))),
    )
    q_txt = norm(attn.norm_added_q, split(attn.add_q_proj(encoder_hidden_states)))
    k_txt = norm(attn.norm_added_k, split(attn.add_k_proj(encoder_hidden_states)))
    q, k = torch.cat([q_img, q_txt], dim=2), torch.cat([k_img, k_txt], dim=2)  # image tokens first
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@torch.no_grad()
def test_capture_matches_direct_softmax_and_keeps_output(tiny_pipe):
    transformer = tiny_pipe.transformer
    inputs = _transformer_inputs(tiny_pipe)
    block = 5
    seen = {}

    def grab(module, args, kwargs, output):
        seen["hidden_states"] = kwargs["hidden_states"]
        seen["encoder_hidden_states"] = kwargs["encoder_hidden_states"]

    reference = transformer(**inputs).sample
    hook = transformer.transformer_blocks[block].attn.register_forward_hook(grab, with_kwargs=True)
    try:
        with capture_attention(transformer, blocks=[block], cfg=True, query_chunk=7) as capture:
            captured_out = transformer(**inputs).sample
    finally:
        hook.remove()
    assert torch.equal(captured_out, reference)

    maps = capture.maps()
    n_img = 16  # (8 / patch 2) ** 2
    assert maps.grid == (4, 4) and maps.blocks == (block,) and maps.steps == (0,)
    assert maps.image_to_text.shape == (1, n_img, 77 + MAX_SEQ)
    assert maps.text_to_image.shape == (1, 77 + MAX_SEQ, n_img)
    assert maps.features.shape == (1, n_img, transformer.config.num_attention_heads * 16)

    probs = _direct_probabilities(
        transformer.transformer_blocks[block].attn, seen["hidden_states"], seen["encoder_hidden_states"]
    )
    cond = probs[1:].mean(dim=1)  # conditional half of the [uncond, cond] batch, mean over heads
    torch.testing.assert_close(maps.image_to_text, cond[:, :n_img, n_img:], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps.text_to_image, cond[:, n_img:, :n_img], rtol=1e-5, atol=1e-7)
    # Rows of the joint softmax sum to one over all keys, image and text.
    torch.testing.assert_close(maps.image_to_text.sum(-1) + maps.image_to_image_mass, torch.ones(1, n_img))
    torch.testing.assert_close(
        maps.text_to_image.sum(-1) + maps.text_to_text_mass, torch.ones(1, 77 + MAX_SEQ)
    )
    # The unconditional half really differs, so keeping the right half matters.
    assert not torch.allclose(probs[0].mean(0)[:n_img, n_img:], cond[0, :n_img, n_img:], atol=1e-4)


def test_chunking_does_not_change_probabilities():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 40, 8, generator=generator)
    key = torch.randn(2, 3, 40, 8, generator=generator)
    whole = chunked_joint_probabilities(query, key, num_image_tokens=25, chunk=1000)
    for chunk in (1, 7, 25, 26):
        parts = chunked_joint_probabilities(query, key, num_image_tokens=25, chunk=chunk)
        for name, value in whole.items():
            torch.testing.assert_close(parts[name], value, rtol=1e-6, atol=1e-7)
    direct = torch.softmax(query @ key.transpose(-1, -2) / 8**0.5, -1).mean(1)
    torch.testing.assert_close(whole["image_to_text"], direct[:, :25, 25:])
    torch.testing.assert_close(whole["text_to_image"], direct[:, 25:, :25])


@torch.no_grad()
def test_pipeline_output_unchanged_and_step_selection(tiny_pipe):
    kwargs = dict(
        prompt="a photo of a smiling woman",
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=MAX_SEQ,
        output_type="latent",
    )
    reference = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    with capture_attention(tiny_pipe.transformer, blocks=[0, 23], steps=[1, 2]) as capture:
        captured = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(captured, reference)
    assert capture.steps_seen == [1, 2] and capture.step == 2
    assert all(capture.sums[b].steps == 2 for b in (0, 23))
    both, first, last = capture.maps(), capture.maps([0]), capture.maps([23])
    torch.testing.assert_close(both.image_to_text, (first.image_to_text + last.image_to_text) / 2)
    assert both.steps == (1, 2) and both.image_to_text.shape[0] == 1  # conditional half only
    with pytest.raises(ValueError, match="captured blocks: 0, 23"):
        capture.maps([4])


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
