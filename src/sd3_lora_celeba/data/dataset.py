"""Example records and the dataset description: the files the prepare commands write (see ``layout``).

``example.json`` of one example::

    {"id": "hq-00017", "source": "celeba-hq", "source_file": "CelebA-HQ-img/17.jpg",
     "celeba_file": "119614.jpg", "identity": 2882, "split": "train",
     "attributes": {"5_o_Clock_Shadow": false, ..., "Young": true}}      # 40 attributes, release order

CelebA examples (``"source": "celeba"``) also hold ``"bbox"`` (x_1, y_1, width, height) and ``"crop_box"``
(left, top, right, bottom) in the coordinates of the released image. ``identity`` is null when unknown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_write_json, atomic_write_text
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ID_PREFIX,
    DATASET_INFO,
    EXAMPLE_RECORD,
    HQ_ID_PREFIX,
    SPLITS,
)

SOURCE_HQ = "celeba-hq"
SOURCE_CELEBA = "celeba"


def hq_example_id(idx: int) -> str:
    """Stable id of CelebA-HQ image ``idx``, e.g. ``hq-00017``."""
    return f"{HQ_ID_PREFIX}{idx:05d}"


def celeba_example_id(file_name: str) -> str:
    """Stable id of a CelebA image, e.g. ``celeba-000123`` for ``000123.jpg``."""
    return f"{CELEBA_ID_PREFIX}{Path(file_name).stem}"


def example_record(
    *,
    example_id: str,
    source: str,
    source_file: str,
    celeba_file: str,
    identity: int | None,
    split: str,
    attributes: dict[str, bool],
    **extra: Any,
) -> dict[str, Any]:
    """The ``example.json`` dict of one example (attributes kept in release order)."""
    assert tuple(attributes) == ATTRIBUTES, "attributes must list the 40 CelebA attributes in release order"
    return {
        "id": example_id,
        "source": source,
        "source_file": source_file,
        "celeba_file": celeba_file,
        "identity": identity,
        "split": split,
        "attributes": attributes,
        **extra,
    }


def write_example_record(example_dir: Path, record: dict[str, Any]) -> None:
    """Write ``example.json`` atomically; call it last, since its presence marks the example finished."""
    # Not atomic_write_json: that sorts keys, and the attributes must stay in release order.
    atomic_write_text(Path(example_dir) / EXAMPLE_RECORD, json.dumps(record, indent=2) + "\n")


def read_example_record(example_dir: Path) -> dict[str, Any]:
    """Read ``example.json`` of an example folder."""
    path = Path(example_dir) / EXAMPLE_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found; run sd3 prepare-celeba-hq first") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); re-run with --overwrite") from None


def is_finished(example_dir: Path) -> bool:
    return (Path(example_dir) / EXAMPLE_RECORD).is_file()


def example_dir(dst: Path, split: str, example_id: str) -> Path:
    return Path(dst) / split / example_id


def existing_examples(dst: Path) -> list[tuple[str, str]]:
    """(example id, split) of the example folders (finished or not) under ``dst``'s split folders."""
    found: list[tuple[str, str]] = []
    for split in SPLITS:
        folder = Path(dst) / split
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and not child.name.startswith("."):
                    found.append((child.name, split))
    return found


def remove_examples(dst: Path, examples: list[tuple[str, str]]) -> None:
    """Delete the folders of ``examples`` (id, split), record first so none looks finished half-deleted."""
    for example_id, split in examples:
        folder = example_dir(dst, split, example_id)
        (folder / EXAMPLE_RECORD).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def read_dataset_info(dst: Path) -> dict[str, Any] | None:
    """``dataset.json`` of ``dst``, or None if there is none."""
    path = Path(dst) / DATASET_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); re-run with --overwrite") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object; re-run sd3 prepare-celeba-hq with --overwrite")
    return info


def write_dataset_info(dst: Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(dst) / DATASET_INFO, info)
