"""Example records, captions and the dataset description: the files of an example folder (see ``layout``).

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

from sd3_lora_celeba import layout
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


def _rebuild_hint(example_dir: Path) -> str:
    """The command that rewrites an example's record (after deleting it)."""
    command = "prepare-celeba" if example_dir.name.startswith(CELEBA_ID_PREFIX) else "prepare-celeba-hq"
    return f"delete it and re-run sd3 {command} (it rewrites unfinished examples)"


def read_example_record(example_dir: Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """``example.json`` of an example folder, checked to be a JSON object (None if missing and ``missing_ok``)."""
    example_dir = Path(example_dir)
    path = example_dir / EXAMPLE_RECORD
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise InputError(f"{path}: not found; run sd3 prepare-celeba-hq first") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); {_rebuild_hint(example_dir)}") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); {_rebuild_hint(example_dir)}"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: expected a JSON object; {_rebuild_hint(example_dir)}")
    return record


def read_attributes(example_dir: Path, *, missing_ok: bool = False) -> dict[str, bool]:
    """The CelebA attributes of an example record, checked: known names, true/false values.

    The one reader of ``example.json`` attributes (captioning and the training dataset use it). Returns ``{}``
    for a folder without a record when ``missing_ok`` (the empty-prompt folder, hand-made caption folders).
    """
    example_dir = Path(example_dir)
    record = read_example_record(example_dir, missing_ok=missing_ok)
    if record is None:
        return {}
    path = example_dir / EXAMPLE_RECORD
    attributes = record.get("attributes")
    if not isinstance(attributes, dict):
        raise InputError(f"{path}: no 'attributes' mapping; {_rebuild_hint(example_dir)}")
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        raise InputError(
            f"{path}: unknown attribute(s) {', '.join(unknown)}; use the 40 CelebA attribute names"
        )
    bad = sorted(k for k, v in attributes.items() if not isinstance(v, bool))
    if bad:
        raise InputError(
            f"{path}: attribute(s) {', '.join(bad)} are not true/false; {_rebuild_hint(example_dir)}"
        )
    return attributes


def caption_rebuild_hint(path: Path) -> str:
    """How to get a caption file back: the captioning command that writes it, or re-saving it."""
    command = {layout.prompt_file("blip2"): "caption-blip2", layout.prompt_file("llama3"): "caption-llama3"}
    if path.name in command:
        return f"delete it and re-run sd3 {command[path.name]} {path.parent.parent}"
    return "re-save it as UTF-8 text"


def read_caption(path: Path) -> str:
    """The text of a ``prompt_<variant>.txt`` file, surrounding whitespace removed; one line if not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); {caption_rebuild_hint(path)}") from None


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
