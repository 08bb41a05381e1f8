"""``generate-images SPLIT_DIR OUT``: one image per example from its cached prompt embeddings, ``OUT/<id>.png``.

No text encoder is loaded: the prompt is the example's cached ``prompt_embeds_{1,2,3}`` (``--prompt-variant``)
and the negative prompt is the cached empty prompt of ``DATASET/empty-prompt`` (the classifier-free guidance
"unconditional" branch SD3 was trained with). ``--lora-weight-dir`` adds a fine-tuned LoRA.

Reproducibility: the initial noise of each image comes from its own generator seeded with
``derive_seed(--seed, example id)`` (sha256, stable across Python runs), drawn on the CPU in float32 and passed
to the pipeline as ``latents``. The same example therefore starts from the same noise whatever the batch size,
the number of ``accelerate launch`` processes or which other examples are generated.

Speed, same images: the LoRA is fused into the weights for inference (and unfused before a reused pipeline
takes the next LoRA, see :func:`swap_lora`); on CUDA the q/k/v projections are fused as well (on a CPU that
measured no faster and costs a second copy of those weights); on a CPU the float32 linears run on oneDNN
(:mod:`~sd3_lora_celeba.models.cpu_linear`); ``--compile`` compiles the transformer blocks; PNG encoding runs on a
small thread pool (:class:`PngWriter`) while the next batch denoises.

Folders are all-or-nothing per setting: ``OUT/generation.json`` records the settings and an image counts as done
only in a folder made with the same settings. Other settings into an existing folder are refused;
``--overwrite`` first deletes the settings record, then the old images, and only then writes the new record and
images, so a killed ``--overwrite`` leaves old images without a record (refused, or cleared by the next
``--overwrite``) or new images only, never a mix. One process (or ``accelerate launch`` group) per folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.data.cached import EMPTY_VARIANT
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import (
    TMP_PREFIX,
    atomic_path,
    atomic_write_json,
    file_sha256,
    remove_stale_temp_files,
)
from sd3_lora_celeba.models.loading import (
    DEFAULT_SD3_MODEL,
    SD3_MODEL_ENV,
    Precision,
    resolve_device,
    resolve_dtype,
)
from sd3_lora_celeba.seeding import derive_seed  # one scheme: derive_seed(--seed, example id)

log = logging.getLogger(__name__)

PromptVariant = Literal["blip2", "llama3"]
GenPrecision = Precision  # kept for callers of the earlier name
STAGE = "generate-images"


@dataclass(kw_only=True)
class SkipLayerGuidance:
    """Skip-layer guidance (diffusers' ``skip_guidance_layers`` and its scale and step window)."""

    skip_guidance_layers: tuple[int, ...] = option(
        (),
        "Skip-layer guidance: transformer blocks to skip in the extra guidance pass, e.g. 7,8,9 (the usual "
        "SD3.5-medium setting); default off.",
        group="Skip-layer guidance",
    )
    skip_layer_guidance_scale: float = option(
        2.8, "Skip-layer guidance strength.", group="Skip-layer guidance", min=0
    )
    skip_layer_guidance_start: float = option(
        0.01,
        "Fraction of the steps after which skip-layer guidance starts.",
        group="Skip-layer guidance",
        min=0,
        max=1,
    )
    skip_layer_guidance_stop: float = option(
        0.2,
        "Fraction of the steps at which skip-layer guidance stops.",
        group="Skip-layer guidance",
        min=0,
        max=1,
    )

    def _check_skip_layers(self) -> None:
        if self.skip_guidance_layers and self.skip_layer_guidance_start >= self.skip_layer_guidance_stop:
            raise InputError(
                f"--skip-layer-guidance-start {self.skip_layer_guidance_start} must be below "
                f"--skip-layer-guidance-stop {self.skip_layer_guidance_stop}"
            )
        if len(set(self.skip_guidance_layers)) != len(self.skip_guidance_layers):
            raise InputError(f"--skip-guidance-layers {self.skip_guidance_layers}: give each block once")

    def slg_settings(self) -> dict[str, Any]:
        """The pipeline keywords (empty when off); also what generation.json records."""
        if not self.skip_guidance_layers:
            return {}
        return {
            "skip_guidance_layers": sorted(self.skip_guidance_layers),
            "skip_layer_guidance_scale": self.skip_layer_guidance_scale,
            "skip_layer_guidance_start": self.skip_layer_guidance_start,
            "skip_layer_guidance_stop": self.skip_layer_guidance_stop,
        }


@dataclass
class GenerateImagesConfig(SkipLayerGuidance):
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
    num_inference_steps: int = option(28, "Denoising steps.", min=1, max=10_000)
    guidance_scale: float = option(7.0, "Classifier-free guidance scale (1 = no guidance).", min=0)
    height: int | None = option(None, "Image height in px; default the model's native size.")
    width: int | None = option(None, "Image width in px; default the model's native size.")
    batch_size: int = option(4, "Images per pipeline call (does not change the images).", min=1)
    seed: int = option(0, "Base seed; each image's noise is seeded with a hash of (seed, example id).")
    num_images: int | None = option(None, "Only the first N examples by id (a deterministic subset).", min=1)
    precision: Precision = option(
        "auto", "Model dtype; auto = bfloat16 on CUDA (float16 without bf16), float32 on CPU."
    )
    device: str | None = option(
        None, "Torch device; default the accelerate process device (cuda if available)."
    )
    compile: bool = option(
        False, "torch.compile the transformer blocks (pays off for large folders; the first batch compiles)."
    )
    overwrite: bool = option(
        False, "Delete the folder's images and settings first, then generate all of them again."
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value % 16):
                raise InputError(f"--{name} {value}: must be a positive multiple of 16 (VAE 8x, patch 2)")
        self._check_skip_layers()
        if self.skip_guidance_layers and self.guidance_scale <= 1:
            raise InputError(
                f"--skip-guidance-layers needs classifier-free guidance; it has no effect with --guidance-scale "
                f"{self.guidance_scale} (use a value above 1)"
            )


# --- pure helpers --------------------------------------------------------------------------------------------


def initial_latents(example_ids: Sequence[str], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H/8, W/8) float32 CPU noise, one generator per image, so a batch equals its images one by one."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, i)))
            for i in example_ids
        ]
    )


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The model dtype of ``--precision`` (the project's one rule, :func:`models.loading.resolve_dtype`)."""
    return resolve_dtype(precision, device)


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


def generation_settings(
    *,
    model_name: str,
    revision: str | None,
    lora: dict[str, Any] | None,
    prompt_variant: str,
    empty_prompt_dir: Path,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    height: int | None,
    width: int | None,
    dtype: torch.dtype,
    skip_layer_guidance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``generation.json`` records: every setting that changes an image (batch size, device and
    ``--compile`` do not). Skip-layer guidance keys appear only when it is on, so older folders still match."""
    return {
        "model_name": model_name,
        "model_revision": revision,
        "lora": lora,
        "prompt_variant": prompt_variant,
        "empty_prompt_dir": str(Path(empty_prompt_dir).resolve()),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "height": height,
        "width": width,
        "precision": str(dtype).removeprefix("torch."),
        **(skip_layer_guidance or {}),
    }


# --- the output folder: settings record, all-or-nothing -----------------------------------------------------


def _folder_outputs(output_dir: Path) -> list[Path]:
    """What a generation folder holds besides its record: images, the FID cache, unfinished temp files."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    names = ("*.png", layout.FID_STATS, TMP_PREFIX + "*")
    return sorted({p for pattern in names for p in out.glob(pattern) if p.is_file()})


def changed_settings(path: Path, settings: dict[str, Any], fix: str) -> tuple[dict[str, Any], list[str]]:
    """The settings recorded in ``path`` and the keys where they differ from ``settings``.

    An unreadable record is one line ending with ``fix``; records written before ``--model-revision`` was
    renamed (key ``revision``) still compare equal."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({type(exc).__name__}); {fix}") from None
    if "revision" in old and "model_revision" not in old:
        old["model_revision"] = old.pop("revision")
    return old, sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))


def check_generation_settings(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse (one line) a folder made with other settings, or holding images without a record; no writes."""
    out = Path(output_dir)
    path = out / layout.GENERATION_SETTINGS
    if overwrite:
        return
    if not path.is_file():
        images = [p for p in _folder_outputs(out) if p.suffix == ".png" and not p.name.startswith(TMP_PREFIX)]
        if images:
            raise InputError(
                f"{out}: holds {len(images)} image(s) but no {layout.GENERATION_SETTINGS}, so their settings "
                f"are unknown; use a new OUT folder or pass --overwrite"
            )
        return
    old, changed = changed_settings(path, settings, fix="delete it or pass --overwrite")
    if changed:
        first = changed[0]
        raise InputError(
            f"{path}: folder was generated with other settings ({', '.join(changed)}; e.g. {first}="
            f"{old.get(first)!r}, now {settings.get(first)!r}); use a new OUT folder or pass --overwrite"
        )


def claim_output_folder(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Make ``output_dir`` a folder of ``settings``: check, (overwrite) clear the old outputs, record.

    Order matters for a kill at any point: the old record goes first, then the old images, then the new
    record is written; the new images follow. Only the main process writes.
    """
    check_generation_settings(output_dir, settings, overwrite)
    state = parallel.process_state()
    if state.is_main_process:
        _replace_outputs(Path(output_dir), settings, overwrite)
    state.wait_for_everyone()  # no process lists what is done before the old images are gone


def _replace_outputs(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = out / layout.GENERATION_SETTINGS
    if overwrite:
        record.unlink(missing_ok=True)
        old = _folder_outputs(out)
        for p in old:
            p.unlink(missing_ok=True)
        if old:
            log.info("%s: removed %d old output(s) before regenerating (--overwrite)", out, len(old))
    atomic_write_json(record, settings)


@contextlib.contextmanager
def folder_lock(output_dir: Path, what: str = STAGE) -> Iterator[None]:
    """One run per generation folder (every process of an ``accelerate launch`` run shares it)."""
    with parallel.stage_lock(output_dir, STAGE, what, processes=True):
        yield


# --- pipeline ------------------------------------------------------------------------------------------------


def check_lora_file(lora_weight_dir: Path) -> Path:
    """The LoRA weights file of a folder, read far enough to know it is a safetensors file (one line if not)."""
    from safetensors import safe_open

    from sd3_lora_celeba.models.lora import lora_weights_file

    path = lora_weights_file(lora_weight_dir)
    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(
            f"{path}: not a readable LoRA file ({first}); pass another checkpoint folder of 'sd3 fine-tune'"
        ) from None
    return path


def load_generation_pipeline(
    model_name: str,
    *,
    revision: str | None = None,
    lora_weight_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    compile: bool = False,
    fuse_qkv: bool = False,
):
    """Text-encoder-free SD3 pipeline on ``device``, LoRA fused, progress bar off, ready for :func:`generate_into`.

    ``fuse_qkv``: fused q/k/v projections on CUDA; a caller that changes the LoRA later must then do it with
    :func:`swap_lora` (a LoRA loaded directly would not reach the fused copies)."""
    from sd3_lora_celeba.models.cpu_linear import use_fast_cpu_linears
    from sd3_lora_celeba.models.loading import load_pipeline_without_text_encoders

    if lora_weight_dir is not None:
        check_lora_file(lora_weight_dir)  # fail before loading a large model
    pipe = load_pipeline_without_text_encoders(model_name, revision=revision, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    pipe._sd3_qkv_wanted = fuse_qkv
    swap_lora(pipe, lora_weight_dir)
    if compile:
        compile_transformer(pipe.transformer)
    else:
        use_fast_cpu_linears(pipe.transformer)  # float32 on a CPU: oneDNN's products where they are faster
        use_fast_cpu_linears(pipe.vae)
    return pipe


def qkv_fusion_applies(transformer) -> bool:
    """Fused q/k/v where it is exact and pays: CUDA, plain SD3 blocks (diffusers' fused SD3 processor has no
    q/k norms and no second attention, so SD3.5 keeps the separate projections)."""
    config = transformer.config
    return (
        transformer.device.type == "cuda"
        and not getattr(config, "dual_attention_layers", ())
        and getattr(config, "qk_norm", None) is None
    )


def _fuse_qkv(pipe) -> None:
    if getattr(pipe, "_sd3_qkv_wanted", False) and qkv_fusion_applies(pipe.transformer):
        pipe.transformer.fuse_qkv_projections()
        pipe._sd3_fused_qkv = True


def _unfuse_qkv(pipe) -> None:
    if getattr(pipe, "_sd3_fused_qkv", False):
        pipe.transformer.unfuse_qkv_projections()
        pipe._sd3_fused_qkv = False


def swap_lora(pipe, lora_weight_dir: Path | None) -> None:
    """Put the LoRA of ``lora_weight_dir`` (None: none) into a pipeline, fused, replacing any earlier one.

    The earlier LoRA is unfused and unloaded first, so a reused pipeline (the sweeps) returns to the base
    weights before the next checkpoint."""
    from sd3_lora_celeba.models.lora import load_lora_into_pipeline

    _unfuse_qkv(pipe)  # the fused projections are copies of the (possibly LoRA-fused) weights
    if getattr(pipe, "_sd3_lora_fused", False):
        pipe.unfuse_lora(components=["transformer"])
        pipe._sd3_lora_fused = False
    if getattr(pipe.transformer, "peft_config", None):
        pipe.unload_lora_weights()
    if lora_weight_dir is not None:
        check_lora_file(lora_weight_dir)
        load_lora_into_pipeline(pipe, lora_weight_dir)
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
        pipe._sd3_lora_fused = True
    _fuse_qkv(pipe)


def compile_transformer(transformer) -> None:
    """``torch.compile`` each MM-DiT block in place: identical blocks share one compiled graph, so compiling
    costs about two blocks (the last block, text-stream-free, is the second), not the whole model."""
    for block in transformer.transformer_blocks:
        block.compile()


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


@dataclass(frozen=True)
class ModelLimits:
    """What the sizes and skip-layer blocks are checked against, from the transformer and VAE configs."""

    vae_scale_factor: int
    patch_size: int
    pos_embed_max_size: int
    sample_size: int
    num_blocks: int

    @classmethod
    def of_pipeline(cls, pipe) -> ModelLimits:
        c = pipe.transformer.config
        return cls(
            int(pipe.vae_scale_factor),
            int(c.patch_size),
            int(c.pos_embed_max_size),
            int(c.sample_size),
            len(pipe.transformer.transformer_blocks),
        )

    @classmethod
    def of_model(cls, model_name: str, revision: str | None = None) -> ModelLimits:
        """From the config files only (no weights read), so a bad flag fails before anything is loaded."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from sd3_lora_celeba.models.loading import load_pretrained

        def config(loader, subfolder: str, what: str) -> dict:
            return load_pretrained(loader, model_name, what=what, subfolder=subfolder, revision=revision)

        t = config(SD3Transformer2DModel.load_config, "transformer", "SD3 transformer config")
        v = config(AutoencoderKL.load_config, "vae", "SD3 VAE config")
        factor = 2 ** (len(v.get("block_out_channels", (0,) * 4)) - 1)
        return cls(
            factor,
            int(t["patch_size"]),
            int(t["pos_embed_max_size"]),
            int(t["sample_size"]),
            int(t["num_layers"]),
        )


def check_model_limits(
    pipe_or_limits, height: int | None, width: int | None, skip_guidance_layers: Sequence[int] = ()
) -> None:
    """Image size and skip-layer blocks against the model (a pipeline or :class:`ModelLimits`; one line
    naming the flag)."""
    limits = (
        pipe_or_limits if isinstance(pipe_or_limits, ModelLimits) else ModelLimits.of_pipeline(pipe_or_limits)
    )
    step = limits.vae_scale_factor * limits.patch_size
    max_side = limits.pos_embed_max_size * step
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value % step or not step <= value <= max_side):
            raise InputError(
                f"--{name} {value}: this model takes multiples of {step} px up to {max_side} px "
                f"(native {limits.sample_size * limits.vae_scale_factor})"
            )
    blocks = limits.num_blocks
    bad = [i for i in skip_guidance_layers if not 0 <= i < blocks]
    if bad:
        raise InputError(
            f"--skip-guidance-layers {','.join(map(str, bad))}: this model has blocks 0..{blocks - 1}"
        )


def lora_fingerprint(lora_weight_dir: Path | None) -> dict[str, Any] | None:
    if lora_weight_dir is None:
        return None
    from sd3_lora_celeba.models.lora import lora_weights_file

    path = lora_weights_file(lora_weight_dir)
    return {"dir": str(Path(lora_weight_dir).resolve()), "sha256": file_sha256(path)}


# --- writing -------------------------------------------------------------------------------------------------


class PngWriter:
    """Writes PNGs atomically on a few threads (Pillow's encoder releases the GIL), so encoding overlaps the
    next batch's denoising. At most ``max_pending`` images wait; the first write error is raised."""

    def __init__(self, workers: int = 2, max_pending: int = 16):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._pending: list[concurrent.futures.Future] = []
        self._max_pending = max_pending
        self.written = 0

    @staticmethod
    def _write(image, path: Path) -> None:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")

    def submit(self, image, path: Path) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()
            self.written += 1
        self._pending.append(self._pool.submit(self._write, image, path))

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()
            self.written += 1

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:  # let started writes finish (they are atomic), report the first error
                concurrent.futures.wait(self._pending)
        finally:
            self._pool.shutdown(wait=True)


# --- generation ----------------------------------------------------------------------------------------------


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
    skip_layer_guidance: dict[str, Any] | None = None,
) -> int:
    """Generate ``OUT/<id>.png`` for this process's pending examples; returns how many were written.

    The caller owns the folder (:func:`claim_output_folder` under :func:`folder_lock`). ``shard=False``: this
    process does every pending example (a caller running on the main process only).
    ``skip_layer_guidance``: :meth:`SkipLayerGuidance.slg_settings` (pipeline keywords).
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
    height = height or native_size(pipe)
    width = width or native_size(pipe)
    check_model_limits(pipe, height, width, (skip_layer_guidance or {}).get("skip_guidance_layers", ()))
    factor = int(pipe.vae_scale_factor)
    latent_shape = (int(pipe.transformer.config.in_channels), height // factor, width // factor)
    negative = load_joined_prompt_embeds(empty_prompt_dir, EMPTY_VARIANT)  # (77 + L, D), (P,)
    _check_embeds(pipe, empty_prompt_dir, *negative)
    call = dict(
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        output_type="pil",
        **(skip_layer_guidance or {}),
    )
    with PngWriter() as writer, parallel.progress(len(mine), desc, unit="img") as bar:
        for batch in parallel.batched(mine, batch_size):
            images = _generate_batch(pipe, batch, prompt_variant, negative, seed, latent_shape, call)
            for d, image in zip(batch, images, strict=True):
                writer.submit(image, output_path(output_dir, d))
            bar.update(len(batch))
        writer.wait()
        return writer.written


def _generate_batch(pipe, batch, prompt_variant, negative, seed, latent_shape, call) -> list:
    """One pipeline call: the batch's cached prompts, the empty prompt as negative, per-image noise."""
    from sd3_lora_celeba.data.cached import load_joined_prompt_embeds

    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    negative_embeds, negative_pooled = negative
    pairs = [load_joined_prompt_embeds(d, prompt_variant) for d in batch]
    for d, (embeds, pooled) in zip(batch, pairs, strict=True):
        _check_embeds(pipe, d, embeds, pooled, like=negative_embeds)
    n = len(batch)
    latents = initial_latents([layout.example_id(d) for d in batch], seed, latent_shape)
    with torch.inference_mode():
        return pipe(
            prompt_embeds=torch.stack([p for p, _ in pairs]).to(device, dtype),  # (B, 77 + L, D)
            pooled_prompt_embeds=torch.stack([q for _, q in pairs]).to(device, dtype),  # (B, P)
            negative_prompt_embeds=negative_embeds.expand(n, -1, -1).to(device, dtype),
            negative_pooled_prompt_embeds=negative_pooled.expand(n, -1).to(device, dtype),
            latents=latents.to(device, dtype),  # (B, 16, H/8, W/8), drawn on the CPU in float32
            **call,
        ).images


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
    if not (torch.isfinite(embeds).all() and torch.isfinite(pooled).all()):
        raise InputError(f"{where}: cached prompt embeddings hold NaN or infinity; recompute them")


def generate_images(config: GenerateImagesConfig) -> dict[str, Any]:
    """The ``generate-images`` command."""
    device = resolve_device(config.device) if config.device else parallel.process_state().device
    dtype = resolve_dtype(config.precision, device)
    empty_prompt_dir = find_empty_prompt_dir(config.split_dir, config.empty_prompt_dir)
    examples = select_examples(config.split_dir, empty_prompt_dir, config.num_images)
    if config.lora_weight_dir is not None:
        check_lora_file(config.lora_weight_dir)
    settings = generation_settings(
        model_name=config.model_name,
        revision=config.model_revision,
        lora=lora_fingerprint(config.lora_weight_dir),
        prompt_variant=config.prompt_variant,
        empty_prompt_dir=empty_prompt_dir,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        height=config.height,
        width=config.width,
        dtype=dtype,
        skip_layer_guidance=config.slg_settings(),
    )
    check_generation_settings(config.output_dir, settings, config.overwrite)  # before loading a large model
    limits = ModelLimits.of_model(config.model_name, config.model_revision)
    check_model_limits(limits, config.height, config.width, config.skip_guidance_layers)
    pipe = load_generation_pipeline(
        config.model_name,
        revision=config.model_revision,
        lora_weight_dir=config.lora_weight_dir,
        dtype=dtype,
        device=device,
        compile=config.compile,
        fuse_qkv=True,
    )
    check_model_limits(pipe, config.height, config.width, config.skip_guidance_layers)
    state = parallel.process_state()
    with folder_lock(config.output_dir):
        claim_output_folder(config.output_dir, settings, config.overwrite)
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
            overwrite=False,  # claim_output_folder already cleared the folder for --overwrite
            skip_layer_guidance=config.slg_settings(),
        )
        state.wait_for_everyone()
    log.info("generate-images: %d image(s) written to %s", written, config.output_dir)
    return {"written": written, "examples": len(examples), "output_dir": str(config.output_dir)}
