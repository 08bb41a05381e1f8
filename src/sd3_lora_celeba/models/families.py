"""Per-model defaults read from a model's config files, not constants: ``model_defaults(model_name, revision)``.

Only the small JSON configs are read (``transformer/config.json``, ``vae/config.json``,
``scheduler/scheduler_config.json``, ``tokenizer_3/tokenizer_config.json``), so calling it costs milliseconds on
a local folder or a cached hub model. The family is recognised from the transformer config, the way the
architectures differ (the tiny test models of :mod:`sd3_lora_celeba.testing.tiny_sd3` are recognised the same
way)::

    family        num_layers  dual_attention_layers  qk_norm    hub id
    sd3-medium    24          none                   none       stabilityai/stable-diffusion-3-medium-diffusers
    sd3.5-medium  24          0..12 (MMDiT-X attn2)  rms_norm   stabilityai/stable-diffusion-3.5-medium
    sd3.5-large   38          none                   rms_norm   stabilityai/stable-diffusion-3.5-large (and -turbo)

Anything else is ``custom``: the config-derived values still hold, the recommendations fall back to the
SD3-medium rules scaled to its depth.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sd3_lora_celeba.models.lora import DUAL_ATTENTION_LINEARS, JOINT_ATTENTION_LINEARS

FAMILY_MODELS = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
MODEL_FAMILIES = tuple(FAMILY_MODELS)
CUSTOM_FAMILY = "custom"

# Skip-layer guidance layers that Stability AI recommends for SD3.5-medium (its model card and the diffusers
# docs use 7, 8, 9); the other families are sampled without it.
SKIP_GUIDANCE_LAYERS = {"sd3.5-medium": (7, 8, 9)}


@dataclass(frozen=True)
class ModelDefaults:
    """What a stage needs to know about a model before loading its weights."""

    model_name: str
    revision: str | None
    family: str  # one of MODEL_FAMILIES, or "custom"
    num_layers: int
    dual_attention_layers: tuple[int, ...]  # blocks with a second self-attention attn2
    qk_norm: str | None
    vae_scale_factor: int  # pixels per latent pixel (8)
    native_resolution: int  # px: transformer sample_size * vae_scale_factor (1024 for SD3 / SD3.5)
    t5_max_length: int  # T5 tokens: the pipeline default (256), capped by tokenizer_3's model_max_length
    shift: float  # the scheduler's timestep shift (3.0)
    lora_blocks: tuple[int, ...]  # recommended --lora-blocks
    lora_layers: tuple[str, ...]  # default --lora-layers (attn2.* included where dual-attention blocks exist)
    skip_guidance_layers: tuple[int, ...] | None  # recommended skip-layer guidance, None = off
    gradient_checkpointing: (
        bool  # recommended on CUDA (SD3.5-large: the activations do not fit 24 GB otherwise)
    )
    num_parameters: int  # transformer parameters, counted on the meta device from the config


def detect_family(transformer_config: dict) -> str:
    """``sd3-medium``, ``sd3.5-medium``, ``sd3.5-large`` or ``custom`` from a transformer config."""
    layers = int(transformer_config.get("num_layers", 0))
    dual = tuple(transformer_config.get("dual_attention_layers") or ())
    qk_norm = transformer_config.get("qk_norm")
    if layers == 24 and not dual and qk_norm is None:
        return "sd3-medium"
    if layers == 24 and dual == tuple(range(13)) and qk_norm == "rms_norm":
        return "sd3.5-medium"
    if layers == 38 and not dual and qk_norm == "rms_norm":
        return "sd3.5-large"
    return CUSTOM_FAMILY


def recommended_lora_blocks(num_layers: int) -> tuple[int, ...]:
    """The seed's SD3-medium choice, blocks 4..22 of 24 (skip the first sixth and the last block), scaled to depth.

    24 blocks -> 4..22; 38 blocks (SD3.5-large) -> 6..36.
    """
    first = round(num_layers / 6)
    return tuple(range(first, max(first + 1, num_layers - 1)))


def _pipeline_t5_length() -> int:
    from diffusers import StableDiffusion3Pipeline

    return int(inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default)


def _read_json(model_name: str, subfolder: str, filename: str, revision: str | None) -> dict:
    """A JSON file of a local pipeline folder or a hub repository (cached, offline-aware)."""
    local = Path(model_name).expanduser()
    if local.is_dir():
        return json.loads((local / subfolder / filename).read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(model_name, filename, subfolder=subfolder, revision=revision)
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _t5_max_length(model_name: str, revision: str | None) -> int:
    default = _pipeline_t5_length()
    try:
        config = _read_json(model_name, "tokenizer_3", "tokenizer_config.json", revision)
    except Exception:  # no T5 tokenizer (a pipeline without T5): the pipeline default applies
        return default
    limit = config.get("model_max_length")
    return min(default, int(limit)) if isinstance(limit, (int, float)) and limit > 0 else default


def count_parameters(transformer_config: dict) -> int:
    """Parameters of the transformer a config describes, built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(transformer_config)
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=32)
def model_defaults(model_name: str, revision: str | None = None) -> ModelDefaults:
    """Defaults of ``model_name`` (hub id or diffusers folder) read from its configs; see the module docstring.

    A missing or unreachable model is a one-line InputError naming ``--model-name`` (the loading boundary of
    :func:`sd3_lora_celeba.models.loading.load_pretrained`).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from sd3_lora_celeba.models.loading import load_pretrained

    model_name = str(model_name)
    transformer = dict(
        load_pretrained(
            SD3Transformer2DModel.load_config,
            model_name,
            what="SD3 transformer config",
            subfolder="transformer",
            revision=revision,
        )
    )
    vae = load_pretrained(
        AutoencoderKL.load_config, model_name, what="SD3 VAE config", subfolder="vae", revision=revision
    )
    scheduler = load_pretrained(
        FlowMatchEulerDiscreteScheduler.load_config,
        model_name,
        what="SD3 scheduler config",
        subfolder="scheduler",
        revision=revision,
    )
    family = detect_family(transformer)
    num_layers = int(transformer["num_layers"])
    dual = tuple(int(i) for i in transformer.get("dual_attention_layers") or ())
    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return ModelDefaults(
        model_name=model_name,
        revision=revision,
        family=family,
        num_layers=num_layers,
        dual_attention_layers=dual,
        qk_norm=transformer.get("qk_norm"),
        vae_scale_factor=vae_scale_factor,
        native_resolution=int(transformer["sample_size"]) * vae_scale_factor,
        t5_max_length=_t5_max_length(model_name, revision),
        shift=float(scheduler.get("shift", 1.0)),
        lora_blocks=recommended_lora_blocks(num_layers),
        lora_layers=JOINT_ATTENTION_LINEARS + (DUAL_ATTENTION_LINEARS if dual else ()),
        skip_guidance_layers=SKIP_GUIDANCE_LAYERS.get(family),
        gradient_checkpointing=family == "sd3.5-large" or num_layers > 24,
        num_parameters=count_parameters(transformer),
    )
