"""Synthetic CelebAMask-HQ and CelebA releases, written in the real releases' on-disk formats.

For tests and the demo: a few dozen small images instead of 30,000 + 202,599, but the same file names,
headers, column layouts and padding as the downloads, so ``prepare-celeba-hq`` and ``prepare-celeba`` run
on them unchanged. Images carry visible markers so results can be checked by looking at pixels:

* CelebA-HQ image: background colour encodes Male / Smiling / Wearing_Lipstick (``stratum_colour``), with a
  grey ellipse "face".
* CelebA image: random size (some below any small ``--min-image-size``), background from the same colour
  code, and the annotated face box filled with ``FACE_BOX_COLOUR``, so a crop's centre pixel shows whether
  the crop was centred on the box.

CelebA identities are drawn from one pool for the CelebA-HQ sources and the extra images, so several
images share an identity and identity-disjoint splits have something to keep apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ATTRIBUTES,
    CELEBA_BBOX,
    CELEBA_IDENTITY,
    CELEBA_IMAGES,
    CELEBA_PARTITION,
    HQ_ATTRIBUTES,
    HQ_IMAGES,
    HQ_MAPPING,
)

FACE_BOX_COLOUR = (255, 255, 255)
_MALE, _SMILING, _LIPSTICK = (ATTRIBUTES.index(a) for a in ("Male", "Smiling", "Wearing_Lipstick"))


@dataclass(frozen=True)
class SyntheticHQRelease:
    root: Path
    indices: list[int]  # HQ index of each image, file CelebA-HQ-img/<idx>.jpg
    attributes: np.ndarray  # (N, 40) bool
    orig_files: list[str]  # CelebA source file of each HQ image (mapping orig_file)


@dataclass(frozen=True)
class SyntheticCelebARelease:
    root: Path
    files: list[str]  # every image of the release, sorted ("000001.jpg", ...)
    hq_sources: set[str]  # files that are sources of CelebA-HQ images
    identities: dict[str, int]
    sizes: dict[str, tuple[int, int]]  # (width, height)
    bboxes: dict[str, tuple[int, int, int, int]]  # (x_1, y_1, width, height)
    attributes: dict[str, np.ndarray]  # (40,) bool


def stratum_colour(attributes: np.ndarray) -> tuple[int, int, int]:
    """Background colour that encodes Male (red), Smiling (green) and Wearing_Lipstick (blue)."""
    return tuple(200 if attributes[i] else 40 for i in (_MALE, _SMILING, _LIPSTICK))  # type: ignore[return-value]


def random_attributes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 40) bool attributes with CelebA-like structure: lipstick mostly on women, rare attributes rare."""
    p = rng.uniform(0.05, 0.6, size=len(ATTRIBUTES))
    values = rng.random((n, len(ATTRIBUTES))) < p
    male = rng.random(n) < 0.42
    values[:, _MALE] = male
    values[:, _SMILING] = rng.random(n) < 0.48
    values[:, _LIPSTICK] = np.where(male, rng.random(n) < 0.02, rng.random(n) < 0.8)
    return values


def _attribute_lines(names: list[str], values: np.ndarray) -> list[str]:
    # Values padded to width 2 as in the releases: "000001.jpg -1  1  1 -1".
    rows = [
        f"{name} " + " ".join(f"{1 if v else -1:2d}" for v in row)
        for name, row in zip(names, values, strict=True)
    ]
    return [str(len(names)), " ".join(ATTRIBUTES) + " ", *rows]


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_celeba_hq_release(
    root: Path | str,
    num_images: int = 40,
    image_size: int = 64,
    seed: int = 0,
    first_index: int = 0,
) -> SyntheticHQRelease:
    """Write a CelebAMask-HQ-like release of ``num_images`` square JPEGs of side ``image_size`` to ``root``.

    HQ indices run from ``first_index``; their CelebA sources are distinct files among the first
    ``4 * num_images`` CelebA file names, for :func:`make_celeba_release` to create.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    indices = list(range(first_index, first_index + num_images))
    attributes = random_attributes(rng, num_images)
    orig_idx = sorted(rng.choice(4 * num_images, size=num_images, replace=False).tolist())
    orig_idx = rng.permutation(orig_idx).tolist()  # the real mapping is not sorted by orig_idx either
    orig_files = [f"{i + 1:06d}.jpg" for i in orig_idx]

    _write_lines(root / HQ_ATTRIBUTES, _attribute_lines([f"{i}.jpg" for i in indices], attributes))
    mapping = ["idx         orig_idx        orig_file"]
    mapping += [f"{i}  {o}  {f}" for i, o, f in zip(indices, orig_idx, orig_files, strict=True)]
    _write_lines(root / HQ_MAPPING, mapping)
    (root / HQ_IMAGES).mkdir(parents=True, exist_ok=True)
    for idx, values in zip(indices, attributes, strict=True):
        image = Image.new("RGB", (image_size, image_size), stratum_colour(values))
        margin = image_size // 4
        ImageDraw.Draw(image).ellipse(
            (margin, margin // 2, image_size - margin, image_size - margin), fill=(150,) * 3
        )
        image.save(root / HQ_IMAGES / f"{idx}.jpg", format="JPEG", quality=90)
    return SyntheticHQRelease(root, indices, attributes, orig_files)


def make_celeba_release(
    root: Path | str,
    hq_root: Path | str | None = None,
    num_extra: int = 60,
    size_range: tuple[int, int] = (48, 160),
    identities_per_image: float = 0.25,
    seed: int = 1,
) -> SyntheticCelebARelease:
    """Write a CelebA-like release to ``root``: the CelebA-HQ sources of ``hq_root`` plus ``num_extra`` images.

    Image sides are drawn uniformly from ``size_range`` (pick it to straddle the ``--min-image-size`` of the
    test). There are ``identities_per_image * total`` identities, shared by HQ sources and extras alike.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    hq_attributes: dict[str, np.ndarray] = {}
    if hq_root is not None:
        hq_root = Path(hq_root)
        mapping_rows = [
            line.split() for line in (hq_root / HQ_MAPPING).read_text().splitlines()[1:] if line.strip()
        ]
        attr_rows = [
            line.split() for line in (hq_root / HQ_ATTRIBUTES).read_text().splitlines()[2:] if line.strip()
        ]
        values_by_hq = {row[0]: np.array([v == "1" for v in row[1:]]) for row in attr_rows}
        for idx, _orig_idx, orig_file in mapping_rows:
            hq_attributes[orig_file] = values_by_hq[f"{idx}.jpg"]  # a source has its HQ image's attributes
    extras: list[str] = []
    number = 1
    while len(extras) < num_extra:
        name = f"{number:06d}.jpg"
        if name not in hq_attributes:
            extras.append(name)
        number += 1
    files = sorted([*hq_attributes, *extras])
    extra_values = random_attributes(rng, len(extras))
    attributes = {**hq_attributes, **dict(zip(extras, extra_values, strict=True))}

    num_identities = max(2, round(identities_per_image * len(files)))
    identities = {f: int(rng.integers(1, num_identities + 1)) for f in files}
    sizes: dict[str, tuple[int, int]] = {}
    bboxes: dict[str, tuple[int, int, int, int]] = {}
    (root / CELEBA_IMAGES).mkdir(parents=True, exist_ok=True)
    for name in files:
        width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        side = min(width, height)
        box_w, box_h = (int(v) for v in rng.integers(max(2, side // 5), max(3, side // 2), size=2))
        x, y = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
        image = Image.new("RGB", (width, height), stratum_colour(attributes[name]))
        ImageDraw.Draw(image).rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=FACE_BOX_COLOUR)
        image.save(root / CELEBA_IMAGES / name, format="JPEG", quality=95)
        sizes[name] = (width, height)
        bboxes[name] = (x, y, box_w, box_h)

    _write_lines(root / CELEBA_ATTRIBUTES, _attribute_lines(files, np.stack([attributes[f] for f in files])))
    bbox_lines = [str(len(files)), "image_id x_1 y_1 width height"]
    bbox_lines += [f"{f}    {x:>3} {y:>3} {w:>3} {h:>3}" for f in files for x, y, w, h in [bboxes[f]]]
    _write_lines(root / CELEBA_BBOX, bbox_lines)
    _write_lines(root / CELEBA_IDENTITY, [f"{f} {identities[f]}" for f in files])
    partition = rng.choice(3, size=len(files), p=(0.8, 0.1, 0.1))
    _write_lines(root / CELEBA_PARTITION, [f"{f} {p}" for f, p in zip(files, partition, strict=True)])
    return SyntheticCelebARelease(root, files, set(hq_attributes), identities, sizes, bboxes, attributes)


def rewrite_line(path: Path | str, lineno: int, new_line: str | None) -> None:
    """Replace line ``lineno`` (1-based) of a text file, or delete it when ``new_line`` is None (for tests)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if new_line is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new_line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
