"""Readers of the CelebA and CelebAMask-HQ release annotation files, strict about their format.

Every reader checks the header, the number of fields of each row, the values and (where the release declares
it on line 1) the row count, and raises a one-line :class:`InputError` naming ``file:line`` on the first
problem: a truncated download must stop the run before anything is written, never produce a half dataset.

Formats (whitespace-separated; the releases pad values with double spaces)::

    CelebAMask-HQ-attribute-anno.txt   30000 / 40 attribute names / "0.jpg  1 -1 ..." (HQ index file names)
    CelebA-HQ-to-CelebA-mapping.txt    "idx orig_idx orig_file" / "0  119613  119614.jpg"
    Anno/list_attr_celeba.txt          202599 / 40 attribute names / "000001.jpg -1  1 ..."
    Anno/list_bbox_celeba.txt          202599 / "image_id x_1 y_1 width height" / "000001.jpg 95 71 226 313"
    Anno/identity_CelebA.txt           no header / "000001.jpg 2882"
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.layout import ATTRIBUTES

MAPPING_HEADER = ("idx", "orig_idx", "orig_file")
BBOX_HEADER = ("image_id", "x_1", "y_1", "width", "height")


@dataclass(frozen=True)
class AttributeTable:
    """The rows of an attribute file: image file names and their 40 binary attributes."""

    files: tuple[str, ...]  # file names as written in the release, e.g. "17.jpg" or "000001.jpg"
    values: np.ndarray  # (N, 40) bool, columns in ATTRIBUTES order
    lines: tuple[int, ...]  # 1-based line number of each row, for error messages

    def __len__(self) -> int:
        return len(self.files)

    def row(self, i: int) -> dict[str, bool]:
        """Attributes of row ``i`` as ``{name: bool}`` in release order."""
        return {name: bool(v) for name, v in zip(ATTRIBUTES, self.values[i], strict=True)}


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of the non-blank lines of ``path``."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the release folder (is the download complete?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; re-download the annotation file") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields:
            yield lineno, fields


def _declared_count(path: Path, lineno: int, fields: list[str]) -> int:
    if len(fields) != 1 or not fields[0].isdigit():
        raise InputError(
            f"{path}:{lineno}: expected the number of images on line 1, got {' '.join(fields)[:60]!r}; "
            "the file is malformed"
        )
    return int(fields[0])


def _check_count(path: Path, declared: int, found: int) -> None:
    if declared != found:
        raise InputError(
            f"{path}:1: declares {declared} images but holds {found} rows; the file is truncated or malformed"
        )


def _int_field(path: Path, lineno: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


def _count_and_header(
    path: Path, lines: Iterator[tuple[int, list[str]]], header: tuple[str, ...], problem: str
) -> int:
    """Consume the two header lines shared by CelebA's counted files; return the declared row count."""
    first = next(lines, None)
    if first is None:
        raise InputError(f"{path}: file is empty; re-download the annotation file")
    declared = _declared_count(path, *first)
    second = next(lines, None)
    if second is None or tuple(second[1]) != header:
        raise InputError(f"{path}:{second[0] if second else 2}: {problem}")
    return declared


def read_attribute_file(path: Path) -> AttributeTable:
    """Read ``CelebAMask-HQ-attribute-anno.txt`` or ``list_attr_celeba.txt`` (same format)."""
    path = Path(path)
    lines = _lines(path)
    declared = _count_and_header(
        path,
        lines,
        ATTRIBUTES,
        "expected the 40 CelebA attribute names (5_o_Clock_Shadow ... Young) on line 2; "
        "the header is wrong or missing",
    )
    files: list[str] = []
    linenos: list[int] = []
    rows: list[list[bool]] = []
    seen: set[str] = set()
    for lineno, fields in lines:
        if len(fields) != 1 + len(ATTRIBUTES):
            raise InputError(
                f"{path}:{lineno}: expected {1 + len(ATTRIBUTES)} fields (name + {len(ATTRIBUTES)} attributes), "
                f"got {len(fields)}; the file is truncated or malformed"
            )
        name, *values = fields
        bad = next((v for v in values if v not in ("1", "-1")), None)
        if bad is not None:
            raise InputError(f"{path}:{lineno}: attribute values must be 1 or -1, got {bad!r}")
        if name in seen:
            raise InputError(f"{path}:{lineno}: image {name} is listed twice")
        seen.add(name)
        files.append(name)
        linenos.append(lineno)
        rows.append([v == "1" for v in values])
    _check_count(path, declared, len(files))
    values_array = np.array(rows, dtype=bool).reshape(len(files), len(ATTRIBUTES))
    return AttributeTable(files=tuple(files), values=values_array, lines=tuple(linenos))


def read_hq_mapping(path: Path) -> dict[int, str]:
    """Read ``CelebA-HQ-to-CelebA-mapping.txt``: HQ index -> CelebA file name (``orig_file``)."""
    path = Path(path)
    lines = _lines(path)
    first = next(lines, None)
    if first is None or tuple(first[1]) != MAPPING_HEADER:
        lineno = first[0] if first else 1
        raise InputError(
            f"{path}:{lineno}: expected the header 'idx orig_idx orig_file'; the file is malformed"
        )
    mapping: dict[int, str] = {}
    for lineno, fields in lines:
        if len(fields) != 3:
            raise InputError(
                f"{path}:{lineno}: expected 3 fields (idx orig_idx orig_file), got {len(fields)}; "
                "the file is truncated or malformed"
            )
        idx = _int_field(path, lineno, fields[0], "idx")
        _int_field(path, lineno, fields[1], "orig_idx")
        if idx in mapping:
            raise InputError(f"{path}:{lineno}: HQ index {idx} is listed twice")
        mapping[idx] = fields[2]
    return mapping


def read_bbox_file(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """Read ``list_bbox_celeba.txt``: file name -> face box ``(x_1, y_1, width, height)`` in image pixels."""
    path = Path(path)
    lines = _lines(path)
    declared = _count_and_header(
        path,
        lines,
        BBOX_HEADER,
        "expected the header 'image_id x_1 y_1 width height' on line 2; the file is malformed",
    )
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for lineno, fields in lines:
        if len(fields) != 5:
            raise InputError(
                f"{path}:{lineno}: expected 5 fields (image_id x_1 y_1 width height), got {len(fields)}; "
                "the file is truncated or malformed"
            )
        x, y, w, h = (_int_field(path, lineno, v, "a box coordinate") for v in fields[1:])
        if w <= 0 or h <= 0:
            raise InputError(f"{path}:{lineno}: box width and height must be positive, got {w}x{h}")
        boxes[fields[0]] = (x, y, w, h)
    _check_count(path, declared, len(boxes))
    return boxes


def bbox_line_number(path: Path, file_name: str) -> int | None:
    """1-based line of ``file_name``'s row in ``list_bbox_celeba.txt`` (for an error message), or None."""
    return next((lineno for lineno, fields in _lines(Path(path)) if fields[0] == file_name), None)


def read_identity_file(path: Path) -> dict[str, int]:
    """Read ``identity_CelebA.txt``: file name -> identity number."""
    path = Path(path)
    identities: dict[str, int] = {}
    for lineno, fields in _lines(path):
        if len(fields) != 2:
            raise InputError(
                f"{path}:{lineno}: expected 2 fields (image_id identity), got {len(fields)}; "
                "the file is truncated or malformed"
            )
        identities[fields[0]] = _int_field(path, lineno, fields[1], "identity")
    if not identities:
        raise InputError(f"{path}: file is empty; re-download the annotation file")
    return identities


def require_rows(path: Path, table: dict, names: list[str], listed_in: Path) -> None:
    """Raise if ``table`` (read from ``path``) lacks a row for one of ``names`` (listed in ``listed_in``)."""
    missing = next((n for n in names if n not in table), None)
    if missing is not None:
        raise InputError(
            f"{path}: no row for {missing}, which {listed_in.name} lists; the file is truncated or from "
            "another release"
        )
