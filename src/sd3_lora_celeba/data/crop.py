"""Square face crops of in-the-wild CelebA images, and the image checks of the prepare commands.

CelebAMask-HQ images are square face crops; extra CelebA images are cut the same way: the largest square
that fits the image (side ``min(W, H)``), centred on the annotated face box, shifted back inside the image
where the face is near a border. Images whose short side is below the model resolution are rejected rather
than upscaled, because blurry upscaled faces would teach the LoRA blur.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sd3_lora_celeba.errors import InputError

JPEG_QUALITY = 95  # of the saved CelebA crops; high enough that re-encoding adds no visible artefacts


def is_large_enough(width: int, height: int, min_image_size: int) -> bool:
    """The rejection rule: keep an image only if its short side is at least ``min_image_size``."""
    return min(width, height) >= min_image_size


def square_crop_box(width: int, height: int, bbox: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the side-``min(W, H)`` square centred on ``bbox`` inside the image.

    ``bbox`` is ``(x_1, y_1, width, height)`` as in ``list_bbox_celeba.txt``. The square keeps the box centre
    at its own centre (to the nearest pixel) unless that would leave the image; then it is clamped to the
    border, so the crop never needs padding.
    """
    x, y, w, h = bbox
    side = min(width, height)
    centre_x = x + w / 2
    centre_y = y + h / 2
    left = min(max(round(centre_x - side / 2), 0), width - side)
    top = min(max(round(centre_y - side / 2), 0), height - side)
    return left, top, left + side, top + side


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` read from the file header only (no decoding); InputError if not an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise InputError(f"{path}: image not found; the release is incomplete, re-download it") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InputError(
            f"{path}: cannot read image ({_reason(exc)}); the file is corrupt, re-download it"
        ) from None


def check_jpeg_bytes(path: Path, data: bytes) -> tuple[int, int]:
    """Decode ``data`` (the bytes of ``path``) at reduced scale to prove it is a whole image; return its size.

    JPEG ``draft`` mode decodes at 1/8 scale, so the whole entropy-coded stream is read (a truncated file
    fails) at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InputError(
            f"{path}: cannot decode image ({_reason(exc)}); the file is corrupt, re-download it"
        ) from None


def crop_face(path: Path, bbox: tuple[int, int, int, int]) -> tuple[bytes, tuple[int, int, int, int]]:
    """Square face crop of the image at ``path`` as JPEG bytes, and the crop box used."""
    try:
        with Image.open(path) as image:
            box = square_crop_box(image.width, image.height, bbox)
            crop = image.convert("RGB").crop(box)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InputError(
            f"{path}: cannot decode image ({_reason(exc)}); the file is corrupt, re-download it"
        ) from None
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), box


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    text = " ".join(str(exc).split())
    return text[:120] if text else type(exc).__name__
