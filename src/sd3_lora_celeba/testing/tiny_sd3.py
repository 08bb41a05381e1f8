"""A tiny, randomly initialised SD3 pipeline saved as a standard diffusers folder.

Same architecture family as SD3-medium, shrunk: 24 MM-DiT blocks (so block indices such as ``4..22`` of the
README work unchanged), a 16-channel VAE with 8x downsampling, two CLIP text encoders with projection, a T5
encoder, the flow-match scheduler and all three tokenizers (built offline). Every piece is seeded and saved in
eval mode, so loading the folder with ``from_pretrained`` gives the same numbers on every machine.

Native resolution: ``TINY_IMAGE_SIZE`` px (transformer ``sample_size`` x VAE factor 8), the way SD3-medium's
native 1024 px is 128 x 8.

:data:`TINY_SPECS` also holds SD3.5-shaped variants, detected as their family by
:func:`sd3_lora_celeba.models.families.detect_family` from the same config fields as the real models::

    family        blocks  dual_attention_layers        qk_norm   shaped like
    sd3-medium    24      none                         none      stable-diffusion-3-medium-diffusers
    sd3.5-medium  24      0..12 (MMDiT-X, has attn2)   rms_norm  stable-diffusion-3.5-medium
    sd3.5-large   38      none                         rms_norm  stable-diffusion-3.5-large
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sd3_lora_celeba.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer, vocab_size

TINY_IMAGE_SIZE = 64


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of the tiny world; the defaults keep a denoising step in the millisecond range on a CPU."""

    num_layers: int = 24
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    sample_size: int = TINY_IMAGE_SIZE // 8  # latent side at native resolution
    clip_l_hidden: int = 16
    clip_g_hidden: int = 32
    t5_d_model: int = 64
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)
    seed: int = 0
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5-medium: blocks 0..12 have a second self-attention
    qk_norm: str | None = None  # SD3.5: "rms_norm" on queries and keys


TINY_SPECS = {
    "sd3-medium": TinySD3Spec(),
    "sd3.5-medium": TinySD3Spec(dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": TinySD3Spec(num_layers=38, qk_norm="rms_norm"),
}


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def build_tiny_sd3_components(spec: TinySD3Spec = TinySD3Spec()) -> dict:
    """All components of a tiny ``StableDiffusion3Pipeline``, seeded, in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = build_clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer()

    def clip(hidden: int, seed: int):
        _seeded(seed)
        config = CLIPTextConfig(
            vocab_size=vocab_size(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=3,  # SD3 reads the penultimate layer
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=hidden,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config).eval()

    text_encoder = clip(spec.clip_l_hidden, spec.seed + 1)
    text_encoder_2 = clip(spec.clip_g_hidden, spec.seed + 2)

    _seeded(spec.seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size(tokenizer_3),
            d_model=spec.t5_d_model,
            d_kv=16,
            d_ff=2 * spec.t5_d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()

    _seeded(spec.seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=2,
        in_channels=16,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.t5_d_model,
        caption_projection_dim=spec.num_attention_heads * spec.attention_head_dim,
        pooled_projection_dim=spec.clip_l_hidden + spec.clip_g_hidden,
        out_channels=16,
        pos_embed_max_size=32,
        dual_attention_layers=spec.dual_attention_layers,
        qk_norm=spec.qk_norm,
    ).eval()

    _seeded(spec.seed + 5)
    n = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=spec.sample_size * 8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": scheduler,
    }


def tiny_spec(family: str) -> TinySD3Spec:
    """The tiny spec of a model family (``sd3-medium``, ``sd3.5-medium``, ``sd3.5-large``)."""
    try:
        return TINY_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; choose among {', '.join(TINY_SPECS)}") from None


def build_tiny_sd3(path: Path | str, spec: TinySD3Spec | str = TinySD3Spec()) -> Path:
    """Save a tiny SD3 pipeline folder at ``path`` (loadable with ``StableDiffusion3Pipeline.from_pretrained``).

    ``spec`` is a :class:`TinySD3Spec` or a family name of :data:`TINY_SPECS`. Building takes a few seconds; a
    finished folder (``model_index.json`` present) is reused as it is.
    """
    if isinstance(spec, str):
        spec = tiny_spec(spec)
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipe = StableDiffusion3Pipeline(**build_tiny_sd3_components(spec))
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp)
    tmp.rename(path)
    return path
