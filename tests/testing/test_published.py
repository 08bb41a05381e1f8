"""The published configs build the models of the published sizes (shapes only, on the meta device)."""

from __future__ import annotations

import torch

from sd3_lora_celeba.testing.published import SD3_VAE, text_encoders


def test_vae_and_text_encoders_have_the_published_sizes():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD3_VAE)
        clip_l, clip_g, t5 = text_encoders()
    sizes = [sum(p.numel() for p in m.parameters()) for m in (vae, clip_l, clip_g, t5)]
    # The VAE: SD / SDXL's 83,653,863 with 16 latent channels instead of 4 (+165,912 in the encoder's last and the
    # decoder's first convolution) and without their two 1x1 quantisation convolutions (-92).
    assert sizes == [83_819_683, 123_650_304, 694_659_840, 4_762_310_656]
    assert vae.config.latent_channels == 16 and 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # the tied embedding is one tensor
