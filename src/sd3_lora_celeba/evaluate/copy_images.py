"""``copy-images SPLIT_DIR OUT``: the ground-truth images of a split, flat, as ``OUT/<example id>.jpg``.

A flat folder is what pytorch-fid (and ``sd3 fid``) read. Example ids are unique in a dataset, so names cannot
collide; two input folders with the same id (e.g. the dataset root holding a stale copy) are an error rather than
a silent overwrite. ``--symlink`` links instead of copying (absolute links, or relative with
``--relative-symlinks`` so the two folders can move together). Copies are atomic; a re-run skips finished files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_copy, remove_stale_temp_files
from sd3_lora_celeba.parallel import progress

log = logging.getLogger(__name__)


@dataclass
class CopyImagesConfig:
    split_dir: Path = argument("Split folder (e.g. /path/to/dataset/test) holding one folder per example.")
    output_dir: Path = argument("Flat folder for <example id>.jpg (created if missing).")
    symlink: bool = option(False, "Make symbolic links instead of copies.")
    relative_symlinks: bool = option(
        False, "With --symlink: relative link targets (folders movable together)."
    )
    num_images: int | None = option(None, "Only the first N examples by id (a deterministic subset).", min=1)
    overwrite: bool = option(False, "Replace files that already exist in OUTPUT_DIR.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.relative_symlinks and not self.symlink:
            raise ValueError("--relative-symlinks needs --symlink")


def image_examples(split_dir: Path, num_images: int | None = None) -> list[Path]:
    """Example folders with an image below ``split_dir``, sorted by id; InputError on duplicate ids."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: split folder not found; pass e.g. /path/to/dataset/test")
    dirs = [d for d in layout.find_example_dirs(split_dir) if (d / layout.IMAGE).is_file()]
    if not dirs:
        raise InputError(
            f"{split_dir}: no example folder with {layout.IMAGE}; pass a split of a prepared dataset"
        )
    by_id: dict[str, Path] = {}
    for d in dirs:
        eid = layout.example_id(d)
        if eid in by_id:
            raise InputError(
                f"{d}: example id {eid} also at {by_id[eid]}; both would be {eid}.jpg, pass a single split folder"
            )
        by_id[eid] = d
    ids = sorted(by_id)
    if num_images is not None:
        ids = ids[:num_images]
    return [by_id[i] for i in ids]


def _link(src: Path, dst: Path, relative: bool) -> None:
    target = os.path.relpath(src.resolve(), dst.parent.resolve()) if relative else str(src.resolve())
    tmp = dst.with_name(f".tmp-{dst.name}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, dst)  # atomic, like the copies


def copy_example_images(
    examples: list[Path], out: Path, *, symlink: bool = False, relative: bool = False, overwrite: bool = False
) -> tuple[int, int]:
    """Copy (or link) each example's ``image.jpg`` to ``out/<id>.jpg``; returns (written, skipped)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out, recursive=False)
    done = skipped = 0
    with progress(len(examples), "copy-images", unit="img") as bar:
        for d in examples:
            src, dst = d / layout.IMAGE, out / f"{layout.example_id(d)}.jpg"
            if not src.is_file():
                raise InputError(f"{d}: no {layout.IMAGE}; re-run sd3 prepare-celeba-hq for this dataset")
            if (dst.exists() or dst.is_symlink()) and not overwrite:
                skipped += 1
            elif symlink:
                _link(src, dst, relative)
                done += 1
            else:
                atomic_copy(src, dst)
                done += 1
            bar.update(1)
    return done, skipped


def copy_images(config: CopyImagesConfig) -> dict[str, Any]:
    """The ``copy-images`` command; returns counts."""
    out = Path(config.output_dir)
    examples = image_examples(config.split_dir, config.num_images)
    if out.resolve() == Path(config.split_dir).resolve():
        raise InputError(f"{out}: output folder is the split folder; pass a new folder")
    done, skipped = copy_example_images(
        examples, out, symlink=config.symlink, relative=config.relative_symlinks, overwrite=config.overwrite
    )
    log.info("copy-images: %d written, %d already there, into %s", done, skipped, out)
    return {"written": done, "skipped": skipped, "output_dir": str(out)}
