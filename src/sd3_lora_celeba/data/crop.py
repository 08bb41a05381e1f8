"""Square face crops of in-the-wild CelebA images, and the image checks and conversions of every stage.

CelebAMask-HQ images are square face crops; extra CelebA images are cut the same way: the largest square
that fits the image (side ``min(W, H)``), centred on the annotated face box, shifted back inside the image
where the face is near a border. Images whose short side is below the model resolution are rejected rather
than upscaled, because blurry upscaled faces would teach the LoRA blur.

Every stage turns an image into 8-bit RGB with :func:`to_rgb`, never with a bare ``convert("RGB")``: Pillow
clips 16-bit grayscale (a 16-bit PNG, even one named ``.jpg``) to 255, i.e. an all-white face. Here 16-bit
values are scaled to 8 bits; float images are refused.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd3_lora_celeba.errors import InputError

JPEG_QUALITY = 95  # of the saved CelebA crops; high enough that re-encoding adds no visible artefacts
# Modes whose JPEG bytes are stored as released; anything else is converted with to_rgb and re-encoded.
KEPT_JPEG_MODES = ("RGB", "L")
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale as Pillow opens it


def to_rgb(image: Image.Image, path: Path | str = "image") -> Image.Image:
    """8-bit RGB of a PIL image: 16-bit grayscale scaled to 8 bits (not clipped), palette/alpha converted.

    Raises :class:`InputError` naming ``path`` for float images (no defined white level).
    """
    if image.mode in _WIDE_INT_MODES:
        values = np.asarray(image).astype(np.int64)  # (H, W), 0..65535
        gray = np.clip(values >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        raise InputError(f"{path}: floating-point image (mode F); save it as an 8-bit RGB JPEG")
    return image.convert("RGB")  # a loaded copy even for RGB, so it outlives the file it came from


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


def check_image_bytes(path: Path, data: bytes) -> tuple[tuple[int, int], bool]:
    """Decode ``data`` (the bytes of ``path``) to prove it is a whole image: ``(size, keep_bytes)``.

    ``keep_bytes`` is True for an 8-bit RGB or grayscale JPEG, stored as released; any other image (a PNG or
    a 16-bit file named ``.jpg``, say) must go through :func:`release_image_bytes`. JPEG ``draft`` mode
    decodes at 1/8 scale, so the whole entropy-coded stream is read (a truncated file fails) cheaply.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            size, mode, fmt = image.size, image.mode, image.format
            if fmt == "JPEG":
                image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            if mode == "F":
                to_rgb(image, path)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InputError(
            f"{path}: cannot decode image ({_reason(exc)}); the file is corrupt, re-download it"
        ) from None
    return size, fmt == "JPEG" and mode in KEPT_JPEG_MODES


def release_image_bytes(path: Path, data: bytes) -> bytes:
    """The bytes to store as ``image.jpg``: released JPEG bytes unchanged, anything else as 8-bit RGB JPEG."""
    _, keep = check_image_bytes(path, data)
    if keep:
        return data
    with Image.open(io.BytesIO(data)) as image:
        rgb = to_rgb(image, path)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def bbox_inside(width: int, height: int, bbox: tuple[int, int, int, int]) -> bool:
    """True when the centre of the face box ``(x_1, y_1, w, h)`` lies inside a ``width`` x ``height`` image."""
    x, y, w, h = bbox
    return 0 <= x + w / 2 <= width and 0 <= y + h / 2 <= height


def crop_face(path: Path, bbox: tuple[int, int, int, int]) -> tuple[bytes, tuple[int, int, int, int]]:
    """Square face crop of the image at ``path`` as JPEG bytes, and the crop box used."""
    try:
        with Image.open(path) as image:
            box = square_crop_box(image.width, image.height, bbox)
            crop = to_rgb(image, path).crop(box)
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
