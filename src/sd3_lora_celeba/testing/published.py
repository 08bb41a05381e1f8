"""The configs published with the real models (the hub's ``transformer``, ``vae`` and ``text_encoder*``
``config.json``, the fields that decide shapes), for checks that need the real shapes but no weights: family
detection, parameter counts, memory estimates and the full-size benchmarks. The package itself never reads them:
it reads a model's own config."""

from __future__ import annotations

SD3_MEDIUM = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
}  # fmt: skip
SD35_MEDIUM = {
    **SD3_MEDIUM,
    "dual_attention_layers": list(range(13)),  # MMDiT-X: a second image self-attention in blocks 0..12
    "qk_norm": "rms_norm",
    "pos_embed_max_size": 384,
}
SD35_LARGE = {
    **SD3_MEDIUM, "caption_projection_dim": 2432, "num_attention_heads": 38, "num_layers": 38, "qk_norm": "rms_norm",
}  # fmt: skip
TRANSFORMER_CONFIGS = {"sd3-medium": SD3_MEDIUM, "sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}
PROMPT_TOKENS = 77 + 256  # CLIP-L/G's 77 tokens joined to T5's 256 (every family's pipeline default)
# The VAE every family shares (hub vae/config.json): 16 latent channels, 8x down-sampling.
SD3_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
# The three text encoders every family shares (hub text_encoder*/config.json): CLIP-L and OpenCLIP bigG as
# CLIPTextModelWithProjection, the T5 v1.1 XXL encoder as T5EncoderModel.
CLIP_L = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
}  # fmt: skip
CLIP_G = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu",
}  # fmt: skip
T5_XXL = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}  # fmt: skip


def text_encoders() -> list:
    """The three text encoders built from :data:`CLIP_L`, :data:`CLIP_G` and :data:`T5_XXL` (random weights, on
    the current default device: use ``meta`` for their shapes alone)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    return [
        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
        CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        T5EncoderModel(T5Config(**T5_XXL)),
    ]
