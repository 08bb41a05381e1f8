"""``compute-latent-dist``: cache the SD3 VAE posterior of every image and of its horizontal flip.

One ``latent_dist.safetensors`` per example folder (``layout.LATENT_DIST``), keyed by the folder (the example
id), never by loop position::

    mean, logvar                 (16, S/8, S/8)   posterior N(mean, exp(logvar)) of the image
    flip_mean, flip_logvar       (16, S/8, S/8)   the same for the image flipped left-right
    metadata (strings): format, model_name, model_revision, image_size, shift_factor, scaling_factor,
                        storage_dtype, image_sha256 (of the JPEG bytes), source_size ("WxH")

The training loader samples ``z = mean + exp(logvar / 2) * eps`` and feeds ``(z - shift_factor) *
scaling_factor`` to the transformer, so both factors travel with the cache.

Images are centre-cropped to a square if they are not one already (prep makes them square), resized to
``--image-size`` with Lanczos (antialiased) and mapped to [-1, 1]. The VAE always runs in float32 (SD3's VAE
overflows in float16); ``--storage-dtype`` only sets how the tensors are stored.

Bytes per example (4 tensors of 16 x S/8 x S/8 values, plus a few hundred bytes of header):

=============  ==============  =============  ====================
storage dtype  S = 1024 (SD3)  S = 512        S = 64 (tiny model)
=============  ==============  =============  ====================
float32        4 MiB           1 MiB          16 KiB
float16        2 MiB           512 KiB        8 KiB
bfloat16       2 MiB           512 KiB        8 KiB
=============  ==============  =============  ====================

float16 (the default) keeps about 3 significant digits, i.e. an error far below the noise the fine-tune adds;
bfloat16 keeps about 2, so prefer float16 unless the values overflow (they do not for SD3's VAE).

An example is done when its file exists and was made from the same image bytes. A file made with another
model, revision, image size or storage dtype is never mixed in silently: the command stops and names the file;
``--overwrite`` recomputes everything. A file that cannot be read (truncated, not safetensors) is recomputed.

Memory: one VAE call encodes ``--batch-size`` images and their flips. The default fits a 24 GB GPU and a
laptop's RAM at 1024 px: on CUDA as many examples as 1024 x 1024 pixels' worth (1 at 1024 px, 4 at 512 px,
at most 32); on the CPU a 256 x 256 pixels' worth (1 at 256 px and above, at most 8), since every extra
1024 px example costs about 5 GB of RAM there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import torch

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_save_safetensors
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, StorageDtype, torch_dtype

log = logging.getLogger(__name__)

WHAT = "compute-latent-dist"
FORMAT = "sd3-latent-dist/1"
# Metadata that must agree between a cache file and the current command for the file to count as done.
SETTINGS_KEYS = ("model_name", "model_revision", "image_size", "storage_dtype")
MAX_IMAGE_SIZE = 4096
MAX_BATCH_SIZE = 1024
# Pixels per VAE call of the default batch size (each example is encoded with its flip, so twice this).
DEFAULT_BATCH_PIXELS = {"cuda": 1024 * 1024, "cpu": 256 * 256}
DEFAULT_BATCH_CAP = {"cuda": 32, "cpu": 8}


def default_batch_size(image_size: int, device_type: str) -> int:
    """Examples per VAE call that fit a 24 GB GPU (CUDA) or a few GB of RAM (CPU) at ``image_size``."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    return max(1, min(DEFAULT_BATCH_CAP[kind], DEFAULT_BATCH_PIXELS[kind] // (image_size * image_size)))


@dataclasses.dataclass
class ComputeLatentDistConfig:
    """Options of ``sd3 compute-latent-dist``."""

    dataset: Path = argument("Dataset root, one split, or any folder below it.")
    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 hub id or local diffusers folder.", env=SD3_MODEL_ENV)
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    image_size: int | None = option(
        None,
        "Side in pixels the images are resized to. Default: the model's native size (1024 for SD3-medium).",
    )
    batch_size: int | None = option(
        None,
        "Images per VAE call (per process); each is encoded with its flip. Default: what fits a 24 GB GPU "
        "(1 at 1024 px, 4 at 512 px, up to 32) on CUDA, and 1 at 256 px or more (up to 8 below) on the CPU.",
    )
    storage_dtype: StorageDtype = option("float16", "dtype of the stored tensors (the VAE runs in float32).")
    num_workers: int = option(
        2, "Image-decoding worker processes per process (0 = decode in the main process)."
    )
    overwrite: bool = option(False, "Recompute examples that already have latent_dist.safetensors.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"--batch-size {self.batch_size}: must be 1 to {MAX_BATCH_SIZE}")
        if not 0 <= self.num_workers <= 64:
            raise ValueError(f"--num-workers {self.num_workers}: must be 0 to 64")
        if self.image_size is not None and not (
            8 <= self.image_size <= MAX_IMAGE_SIZE and self.image_size % 8 == 0
        ):
            raise ValueError(
                f"--image-size {self.image_size}: must be a multiple of 8 (the VAE factor) from 8 to "
                f"{MAX_IMAGE_SIZE}"
            )
        if not self.model_name:
            raise ValueError(f"--model-name is empty: give a hub id or a folder (or set {SD3_MODEL_ENV})")


# --- image preprocessing ---------------------------------------------------------------------------------


def preprocess_image(image, image_size: int) -> torch.Tensor:
    """A PIL image as the VAE input: RGB, centre-cropped square, Lanczos-resized, in [-1, 1]. (3, S, S)."""
    import numpy as np
    from PIL import Image

    from sd3_lora_celeba.data.crop import to_rgb

    image = to_rgb(image)  # 16-bit grayscale scaled, not clipped to white
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (S, S, 3) in [0, 255]
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def image_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one example's image; errors are returned, not raised, so the main process can name the file."""

    def __init__(self, example_dirs: list[Path], image_size: int) -> None:
        self.example_dirs = example_dirs
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.example_dirs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        path = self.example_dirs[i] / layout.IMAGE
        try:
            data = path.read_bytes()  # hash exactly the bytes that are encoded
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                pixel_values = preprocess_image(image, self.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the file name
            return {"index": i, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "index": i,
            "pixel_values": pixel_values,
            "image_sha256": hashlib.sha256(data).hexdigest(),
            "source_size": f"{size[0]}x{size[1]}",
        }


# --- cache files -----------------------------------------------------------------------------------------


def rebuild_command(path: Path) -> str:
    """The command that rebuilds the cache file ``path`` (a latent or prompt-embeds file of an example)."""
    path = Path(path)
    example_dir = path.parent
    if path.name == layout.LATENT_DIST:
        return f"sd3 compute-latent-dist {example_dir.parent}"
    for encoder in (1, 2, 3):
        if path.name == layout.prompt_embeds_file(encoder):
            # The empty-prompt folder is its own target (README: sd3 compute-prompt-embeds N .../empty-prompt).
            target = example_dir if example_dir.name == layout.EMPTY_PROMPT_DIR else example_dir.parent
            return f"sd3 compute-prompt-embeds {encoder} {target}"
    return "the command that made it"


class UnreadableCacheError(InputError):
    """A cache file that is truncated or not safetensors at all (the caching stages recompute it)."""


def read_metadata(path: Path) -> dict[str, str]:
    """Metadata of a safetensors file (only the header is read); one line naming the rebuild if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise UnreadableCacheError(
            f"{path}: unreadable cache file ({reason}); run {rebuild_command(path)} (it recomputes "
            "unreadable files)"
        ) from None


def read_metadata_or_none(path: Path, what: str) -> dict[str, str] | None:
    """Metadata of a cache file of this stage, or None (with a warning) when it is unreadable: recompute it."""
    try:
        return read_metadata(path)
    except UnreadableCacheError as exc:
        log.warning("%s: %s; computing it again", what, exc.message.split("; run ")[0])
        return None


def native_image_size(model_name: str, revision: str | None) -> int:
    """The model's native resolution, from its configs: transformer ``sample_size`` x VAE scale factor."""
    from sd3_lora_celeba.models.families import model_defaults

    return model_defaults(model_name, revision).native_resolution


def cache_settings(config: ComputeLatentDistConfig, image_size: int) -> dict[str, str]:
    return {
        "model_name": config.model_name,
        "model_revision": config.model_revision or "",
        "image_size": str(image_size),
        "storage_dtype": config.storage_dtype,
    }


def is_done(example_dir: Path, settings: dict[str, str]) -> bool:
    """True when the cache exists and matches the image; InputError when it was made with other settings."""
    path = example_dir / layout.LATENT_DIST
    if not path.is_file():
        return False
    meta = read_metadata_or_none(path, WHAT)
    if meta is None:
        return False
    if meta.get("format") != FORMAT:
        raise InputError(
            f"{path}: not a {WHAT} cache (format {meta.get('format')!r}); re-run with --overwrite"
        )
    for key in SETTINGS_KEYS:
        if meta.get(key) != settings[key]:
            raise InputError(
                f"{path}: made with {key}={meta.get(key)!r}, this run uses {settings[key]!r}; "
                f"re-run with --overwrite to recompute every example, or use the same --{key.replace('_', '-')}"
            )
    # A replaced image makes its latents stale: recompute it.
    return meta.get("image_sha256") == image_sha256(example_dir / layout.IMAGE)


@torch.inference_mode()
def encode_latent_dist(vae, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posterior of a batch of images and of their flips, one VAE call. Values (B, 16, S/8, S/8), float32."""
    both = torch.cat([pixel_values, pixel_values.flip(-1)])  # (2B, 3, S, S)
    dist = vae.encode(both.to(vae.device, torch.float32)).latent_dist
    mean, logvar = dist.mean.float().cpu(), dist.logvar.float().cpu()
    b = pixel_values.shape[0]
    return {"mean": mean[:b], "logvar": logvar[:b], "flip_mean": mean[b:], "flip_logvar": logvar[b:]}


def compute_latent_dist(config: ComputeLatentDistConfig) -> dict[str, int]:
    """Cache the latent distribution of every pending example of this process; returns counts."""
    dataset = Path(config.dataset)
    if not dataset.is_dir():
        raise InputError(
            f"{dataset}: dataset folder not found; pass the dataset root, a split or an example folder"
        )
    example_dirs = [d for d in layout.find_example_dirs(dataset) if (d / layout.IMAGE).is_file()]
    if not example_dirs:
        raise InputError(
            f"{dataset}: no example folder with {layout.IMAGE} at or below it; run prepare-celeba-hq"
        )
    image_size = config.image_size or native_image_size(config.model_name, config.model_revision)
    with parallel.stage_lock(dataset, WHAT, f"{WHAT} {dataset}", processes=True):
        written = _encode_pending(config, example_dirs, image_size)
    return {"examples": len(example_dirs), "written": written}


def _encode_pending(config: ComputeLatentDistConfig, example_dirs: list[Path], image_size: int) -> int:
    """Encode this process's pending examples; return how many files it wrote."""
    from sd3_lora_celeba.models.loading import load_vae

    settings = cache_settings(config, image_size)
    state = parallel.process_state()
    pending = parallel.pending_for_this_process(
        example_dirs, lambda d: is_done(d, settings), overwrite=config.overwrite, what=WHAT
    )
    # Every process must finish its is_done scan before any writes, or the shards would disagree.
    state.wait_for_everyone()
    written = 0
    if pending:
        batch_size = config.batch_size or default_batch_size(image_size, state.device.type)
        log.info("%s: %d image(s) per VAE call (each with its flip) at %d px", WHAT, batch_size, image_size)
        vae = load_vae(config.model_name, config.model_revision).to(state.device)
        meta_common = {
            "format": FORMAT,
            **settings,
            "shift_factor": repr(float(vae.config.shift_factor or 0.0)),
            "scaling_factor": repr(float(vae.config.scaling_factor)),
        }
        storage = torch_dtype(config.storage_dtype)
        loader = torch.utils.data.DataLoader(
            _ImageFiles(pending, image_size),
            batch_size=batch_size,
            num_workers=config.num_workers,
            collate_fn=list,
        )
        with parallel.progress(len(pending), desc=WHAT) as bar:
            for items in loader:
                for item in items:
                    if "error" in item:
                        path = pending[item["index"]] / layout.IMAGE
                        raise InputError(f"{path}: cannot read image ({item['error']}); replace or remove it")
                out = encode_latent_dist(vae, torch.stack([item["pixel_values"] for item in items]))
                for j, item in enumerate(items):
                    meta = {
                        **meta_common,
                        "image_sha256": item["image_sha256"],
                        "source_size": item["source_size"],
                    }
                    tensors = {name: value[j].to(storage) for name, value in out.items()}
                    atomic_save_safetensors(pending[item["index"]] / layout.LATENT_DIST, tensors, meta)
                    written += 1
                bar.update(len(items))
    log.info("%s: process %d of %d wrote %d file(s)", WHAT, state.process_index, state.num_processes, written)
    return written
