"""``generate-images SPLIT_DIR OUT``: one image per example from its cached prompt embeddings, ``OUT/<id>.png``.

No text encoder is loaded: the prompt is the example's cached ``prompt_embeds_{1,2,3}`` (``--prompt-variant``)
and the negative prompt is the cached empty prompt of ``DATASET/empty-prompt`` (the classifier-free guidance
"unconditional" branch SD3 was trained with). ``--lora-weight-dir`` adds a fine-tuned LoRA.

Reproducibility: the initial noise of each image comes from its own generator seeded with
``derive_seed(--seed, example id)`` (sha256, stable across Python runs), drawn on the CPU in float32 and passed
to the pipeline as ``latents``. The same example therefore starts from the same noise whatever the batch size,
the number of ``accelerate launch`` processes or which other examples are generated.

Resumable: an existing ``OUT/<id>.png`` is skipped. ``OUT/generation.json`` records the settings; resuming into a
folder made with other settings is refused (mixing two models in one FID folder), unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import argument, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_path, atomic_write_json, remove_stale_temp_files
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, torch_dtype

log = logging.getLogger(__name__)

PromptVariant = Literal["blip2", "llama3"]
GenPrecision = Literal["auto", "float32", "float16", "bfloat16"]
EMPTY_VARIANT = "empty"


@dataclass
class GenerateImagesConfig:
    split_dir: Path = argument(
        "Split folder (e.g. /path/to/dataset/test) whose examples have cached prompt embeddings."
    )
    output_dir: Path = argument("Folder for <example id>.png (created if missing).")
    lora_weight_dir: Path | None = option(
        None, "LoRA checkpoint folder of 'sd3 fine-tune' (default: base model)."
    )
    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 diffusers model id or folder.", env=SD3_MODEL_ENV)
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    empty_prompt_dir: Path | None = option(
        None,
        "Folder with the cached empty prompt (negative prompt); default DATASET/empty-prompt above SPLIT_DIR.",
    )
    prompt_variant: PromptVariant = option("blip2", "Which cached caption to use as the prompt.")
    num_inference_steps: int = option(28, "Denoising steps.")
    guidance_scale: float = option(7.0, "Classifier-free guidance scale (1 = no guidance).")
    height: int | None = option(None, "Image height in px; default the model's native size.")
    width: int | None = option(None, "Image width in px; default the model's native size.")
    batch_size: int = option(4, "Images per pipeline call (does not change the images).")
    seed: int = option(0, "Base seed; each image's noise is seeded with a hash of (seed, example id).")
    num_images: int | None = option(None, "Only the first N examples by id (a deterministic subset).")
    precision: GenPrecision = option("auto", "Model dtype; auto = float16 on CUDA, float32 on CPU.")
    device: str | None = option(
        None, "Torch device; default the accelerate process device (cuda if available)."
    )
    overwrite: bool = option(
        False, "Regenerate existing images, also when the folder was made with other settings."
    )

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError("--num-inference-steps must be at least 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError("--num-images must be at least 1")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value % 16):
                raise ValueError(f"--{name} {value}: must be a positive multiple of 16 (VAE 8x, patch 2)")


# --- pure helpers --------------------------------------------------------------------------------------------


def derive_seed(seed: int, example_id: str) -> int:
    """A 63-bit seed for one image from the base seed and the example id (sha256: stable across runs/machines)."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def initial_latents(example_ids: Sequence[str], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H/8, W/8) float32 CPU noise, one generator per image, so a batch equals its images one by one."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, i)))
            for i in example_ids
        ]
    )


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return torch_dtype(precision)


def find_empty_prompt_dir(split_dir: Path, empty_prompt_dir: Path | None = None) -> Path:
    """``--empty-prompt-dir`` or the first ``empty-prompt`` folder at or above the split (the dataset root's)."""
    if not Path(split_dir).is_dir():
        raise InputError(f"{split_dir}: split folder not found; pass e.g. /path/to/dataset/test")
    if empty_prompt_dir is not None:
        path = Path(empty_prompt_dir)
    else:
        split_dir = Path(split_dir).resolve()
        candidates = [p / layout.EMPTY_PROMPT_DIR for p in (split_dir, *list(split_dir.parents)[:2])]
        path = next((c for c in candidates if c.is_dir()), split_dir.parent / layout.EMPTY_PROMPT_DIR)
    if not (path / layout.prompt_file(EMPTY_VARIANT)).is_file():
        raise InputError(
            f"{path}: no cached empty prompt ({layout.prompt_file(EMPTY_VARIANT)}); create it as in the README "
            f"(mkdir, touch {layout.prompt_file(EMPTY_VARIANT)}, sd3 compute-prompt-embeds 1/2/3) "
            f"or pass --empty-prompt-dir"
        )
    return path


def select_examples(split_dir: Path, empty_prompt_dir: Path, num_images: int | None = None) -> list[Path]:
    """Example folders below ``split_dir`` sorted by id (first ``num_images``); InputError on duplicate ids."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: split folder not found; pass e.g. /path/to/dataset/test")
    empty = Path(empty_prompt_dir).resolve()
    dirs = [d for d in layout.find_example_dirs(split_dir) if d.resolve() != empty]
    if not dirs:
        raise InputError(f"{split_dir}: no example folder; pass a split folder of a prepared dataset")
    by_id: dict[str, Path] = {}
    for d in dirs:
        eid = layout.example_id(d)
        if eid in by_id:
            raise InputError(f"{d}: example id {eid} also at {by_id[eid]}; pass a single split folder")
        by_id[eid] = d
    ids = sorted(by_id)[:num_images] if num_images is not None else sorted(by_id)
    return [by_id[i] for i in ids]


def output_path(output_dir: Path, example_dir: Path) -> Path:
    return Path(output_dir) / f"{layout.example_id(example_dir)}.png"


# --- pipeline ------------------------------------------------------------------------------------------------


def load_generation_pipeline(
    model_name: str,
    *,
    revision: str | None = None,
    lora_weight_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """Text-encoder-free SD3 pipeline (optionally with a LoRA) on ``device``, progress bar off."""
    from sd3_lora_celeba.models.loading import load_pipeline_without_text_encoders
    from sd3_lora_celeba.models.lora import load_lora_into_pipeline, lora_weights_file

    if lora_weight_dir is not None:
        lora_weights_file(lora_weight_dir)  # fail before loading a large model
    pipe = load_pipeline_without_text_encoders(model_name, revision=revision, dtype=dtype)
    if lora_weight_dir is not None:
        load_lora_into_pipeline(pipe, lora_weight_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_from_transformer(transformer, model_name: str, revision: str | None = None):
    """A text-encoder-free pipeline around an in-memory (e.g. LoRA-training) transformer, on its device/dtype."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.models.loading import load_scheduler, load_vae

    vae = load_vae(model_name, revision, dtype=transformer.dtype).to(transformer.device)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=load_scheduler(model_name, revision),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(pipe) -> int:
    """Native image side in px: transformer sample size x VAE factor (1024 for SD3-medium)."""
    return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)


def lora_fingerprint(lora_weight_dir: Path | None) -> dict[str, Any] | None:
    if lora_weight_dir is None:
        return None
    from sd3_lora_celeba.evaluate.fid import file_sha256
    from sd3_lora_celeba.models.lora import lora_weights_file

    path = lora_weights_file(lora_weight_dir)
    return {"dir": str(Path(lora_weight_dir).resolve()), "sha256": file_sha256(path)}


def check_settings(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add images made with other settings to a folder (unless overwrite); record the settings."""
    path = Path(output_dir) / layout.GENERATION_SETTINGS
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); delete it or pass --overwrite"
            ) from None
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            first = changed[0]
            raise InputError(
                f"{path}: folder was generated with other settings ({', '.join(changed)}; e.g. {first}="
                f"{old.get(first)!r}, now {settings.get(first)!r}); use a new OUT folder or pass --overwrite"
            )
    if parallel.process_state().is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)


def generate_into(
    pipe,
    example_dirs: Sequence[Path],
    output_dir: Path,
    *,
    empty_prompt_dir: Path,
    prompt_variant: str,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    overwrite: bool = False,
    desc: str = "generate-images",
    shard: bool = True,
) -> int:
    """Generate ``OUT/<id>.png`` for this process's pending examples; returns how many were written.

    ``shard=False``: this process does every pending example (a caller running on the main process only).
    """
    from sd3_lora_celeba.data.cached import load_joined_prompt_embeds

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if parallel.process_state().is_main_process:
        # Before the barrier in pending_for_this_process, so no process is writing yet.
        remove_stale_temp_files(output_dir, recursive=False)
    is_done = lambda d: output_path(output_dir, d).is_file()  # noqa: E731
    if shard:
        mine = parallel.pending_for_this_process(example_dirs, is_done, overwrite=overwrite, what=desc)
    else:
        mine = [d for d in example_dirs if overwrite or not is_done(d)]
    if not mine:
        return 0
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    height = height or native_size(pipe)
    width = width or native_size(pipe)
    latent_shape = (
        int(pipe.transformer.config.in_channels),
        height // int(pipe.vae_scale_factor),
        width // int(pipe.vae_scale_factor),
    )
    negative_prompt_embeds, negative_pooled_prompt_embeds = load_joined_prompt_embeds(
        empty_prompt_dir, EMPTY_VARIANT
    )  # (77 + L, D), (P,)
    _check_embeds(pipe, empty_prompt_dir, negative_prompt_embeds, negative_pooled_prompt_embeds)
    written = 0
    with parallel.progress(len(mine), desc, unit="img") as bar:
        for batch in parallel.batched(mine, batch_size):
            ids = [layout.example_id(d) for d in batch]
            pairs = [load_joined_prompt_embeds(d, prompt_variant) for d in batch]
            for d, (embeds, pooled) in zip(batch, pairs, strict=True):
                _check_embeds(pipe, d, embeds, pooled, like=negative_prompt_embeds)
            prompt_embeds = torch.stack([p for p, _ in pairs])  # (B, 77 + L, D)
            pooled_prompt_embeds = torch.stack([q for _, q in pairs])  # (B, P)
            n = len(batch)
            latents = initial_latents(ids, seed, latent_shape)  # (B, 16, H/8, W/8) float32 CPU
            with torch.inference_mode():
                images = pipe(
                    prompt_embeds=prompt_embeds.to(device, dtype),
                    pooled_prompt_embeds=pooled_prompt_embeds.to(device, dtype),
                    negative_prompt_embeds=negative_prompt_embeds.expand(n, -1, -1).to(device, dtype),
                    negative_pooled_prompt_embeds=negative_pooled_prompt_embeds.expand(n, -1).to(
                        device, dtype
                    ),
                    latents=latents.to(device, dtype),
                    height=height,
                    width=width,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    output_type="pil",
                ).images
            for d, image in zip(batch, images, strict=True):
                with atomic_path(output_path(output_dir, d)) as tmp:
                    image.save(tmp, format="PNG")
                written += 1
            bar.update(n)
    return written


def _check_embeds(
    pipe, where: Path, embeds: torch.Tensor, pooled: torch.Tensor, like: torch.Tensor | None = None
):
    config = pipe.transformer.config
    if embeds.shape[-1] != config.joint_attention_dim or pooled.shape[-1] != config.pooled_projection_dim:
        raise InputError(
            f"{where}: cached prompt embeddings ({embeds.shape[-1]}, pooled {pooled.shape[-1]}) do not fit the model "
            f"({config.joint_attention_dim}, pooled {config.pooled_projection_dim}); "
            f"run sd3 compute-prompt-embeds 1/2/3 with this --model-name"
        )
    if like is not None and embeds.shape != like.shape:
        raise InputError(
            f"{where}: prompt embeddings have {embeds.shape[0]} tokens but the empty prompt has {like.shape[0]}; "
            f"recompute both with the same --max-sequence-length"
        )


def generate_images(config: GenerateImagesConfig) -> dict[str, Any]:
    """The ``generate-images`` command."""
    empty_prompt_dir = find_empty_prompt_dir(config.split_dir, config.empty_prompt_dir)
    examples = select_examples(config.split_dir, empty_prompt_dir, config.num_images)
    state = parallel.process_state()
    device = torch.device(config.device) if config.device else state.device
    dtype = resolve_precision(config.precision, device)
    settings = {
        "model_name": config.model_name,
        "revision": config.model_revision,
        "lora": lora_fingerprint(config.lora_weight_dir),
        "prompt_variant": config.prompt_variant,
        "empty_prompt_dir": str(empty_prompt_dir.resolve()),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "seed": config.seed,
        "height": config.height,
        "width": config.width,
        "precision": str(dtype).removeprefix("torch."),
    }
    check_settings(config.output_dir, settings, config.overwrite)
    pipe = load_generation_pipeline(
        config.model_name,
        revision=config.model_revision,
        lora_weight_dir=config.lora_weight_dir,
        dtype=dtype,
        device=device,
    )
    written = generate_into(
        pipe,
        examples,
        config.output_dir,
        empty_prompt_dir=empty_prompt_dir,
        prompt_variant=config.prompt_variant,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        height=config.height,
        width=config.width,
        batch_size=config.batch_size,
        overwrite=config.overwrite,
    )
    state.wait_for_everyone()
    log.info("generate-images: %d image(s) written to %s", written, config.output_dir)
    return {"written": written, "examples": len(examples), "output_dir": str(config.output_dir)}
