"""``sd3 prepare-celeba-hq SRC DST``: split CelebAMask-HQ into train/val/test example folders.

Reads the release (``CelebAMask-HQ-attribute-anno.txt``, ``CelebA-HQ-to-CelebA-mapping.txt``,
``CelebA-HQ-img/<idx>.jpg``), splits it 80/10/10 stratified on Male x Wearing_Lipstick x Smiling (or by whole
identities), and writes ``DST/<split>/hq-<idx>/{image.jpg, example.json}`` as documented in ``layout``.

Every input is checked before the first write: the annotation files, and every image that will be written
(decoded, so a corrupt or truncated file stops the run with nothing written). A PNG or 16-bit image named
``.jpg`` is converted to an 8-bit RGB JPEG; released JPEGs are stored byte for byte.

Safe to interrupt and re-run: ``dataset.json`` is written first (so a re-run with other split options is
refused instead of mixing two splits), each example's ``example.json`` last (so finished examples are
skipped). Before any example is written, every example folder that is not where ``dataset.json``'s split
puts it is moved there (its record deleted first, so it counts as unfinished; its captions and caches, which
depend only on the image, go with it) and folders of ids the split does not hold are deleted. So a run killed
after ``--overwrite`` changed the split, then re-run with or without ``--overwrite``, never leaves an id in
two splits. Only folders named like examples (``hq-*``, ``celeba-*``) are touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.data.celeba_files import (
    read_attribute_file,
    read_hq_mapping,
    read_identity_file,
    require_rows,
)
from sd3_lora_celeba.data.crop import check_image_bytes, release_image_bytes
from sd3_lora_celeba.data.records import (
    SOURCE_HQ,
    example_dir,
    example_record,
    existing_examples,
    hq_example_id,
    is_finished,
    read_dataset_info,
    remove_examples,
    write_dataset_info,
    write_example_record,
)
from sd3_lora_celeba.data.report import frequency_lines, frequency_table
from sd3_lora_celeba.data.split import identity_split, split_sizes, stratified_split
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_write_bytes, remove_stale_temp_files
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ID_PREFIX,
    CELEBA_IDENTITY,
    DATASET_INFO,
    EXAMPLE_RECORD,
    HQ_ATTRIBUTES,
    HQ_ID_PREFIX,
    HQ_IMAGES,
    HQ_MAPPING,
    IMAGE,
    SPLITS,
)
from sd3_lora_celeba.parallel import stage_lock

log = logging.getLogger(__name__)

# dataset.json keys that define the split: a re-run must match them or pass --overwrite.
SPLIT_OPTIONS = ("random_seed", "split_by_identity", "num_examples")


@dataclass
class PrepareCelebAHQConfig:
    src: Path = argument(
        "CelebAMask-HQ release folder (holds CelebAMask-HQ-attribute-anno.txt and CelebA-HQ-img/)."
    )
    dst: Path = argument("Dataset folder to create (or to complete, after an interruption).")
    random_seed: int = option(42, "Seed of the split; the same seed and inputs always give the same split.")
    split_by_identity: bool = option(
        False, "Keep all images of one person in the same split (needs --celeba-dir for the identities)."
    )
    celeba_dir: Path | None = option(
        None, "CelebA release folder; its Anno/identity_CelebA.txt gives each example's identity."
    )
    overwrite: bool = option(False, "Redo every example (and the split) even if DST already holds them.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if not 0 <= self.random_seed < 2**32:
            raise ValueError(f"--random-seed {self.random_seed}: must be 0 to {2**32 - 1}")
        if self.split_by_identity and self.celeba_dir is None:
            raise ValueError(
                "--split-by-identity needs --celeba-dir /path/to/CelebA (its Anno/identity_CelebA.txt "
                "tells which images show the same person)"
            )


@dataclass(frozen=True)
class HQRelease:
    """The parsed CelebAMask-HQ release, one row per image in release order."""

    indices: list[int]  # HQ image index (file <idx>.jpg)
    image_paths: list[Path]
    attributes: np.ndarray  # (N, 40) bool
    celeba_files: list[str]  # source CelebA file of each image (the mapping's orig_file)
    identities: list[int | None]  # CelebA identity, None without --celeba-dir


def load_hq_release(src: Path, celeba_dir: Path | None = None) -> HQRelease:
    """Parse and cross-check the annotation files; check every image file exists. Writes nothing."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: not a folder; pass the extracted CelebAMask-HQ folder as SRC")
    attr_path = src / HQ_ATTRIBUTES
    table = read_attribute_file(attr_path)
    if len(table) == 0:
        raise InputError(f"{attr_path}: lists no images; the release is empty or its download incomplete")
    mapping = read_hq_mapping(src / HQ_MAPPING)
    indices: list[int] = []
    for name, lineno in zip(table.files, table.lines, strict=True):
        stem, _, ext = name.partition(".")
        if not stem.isdigit() or ext != "jpg":
            raise InputError(f"{attr_path}:{lineno}: expected an image name like 17.jpg, got {name!r}")
        idx = int(stem)
        if idx not in mapping:
            raise InputError(
                f"{attr_path}:{lineno}: {name} has no row in {HQ_MAPPING}; the mapping file is truncated"
            )
        indices.append(idx)
    celeba_files = [mapping[idx] for idx in indices]
    identities: list[int | None] = [None] * len(indices)
    if celeba_dir is not None:
        identity_path = Path(celeba_dir) / CELEBA_IDENTITY
        by_file = read_identity_file(identity_path)
        require_rows(identity_path, by_file, celeba_files, src / HQ_MAPPING)
        identities = [by_file[f] for f in celeba_files]
    image_paths = [src / HQ_IMAGES / f"{idx}.jpg" for idx in indices]
    missing = next((p for p in image_paths if not p.is_file()), None)
    if missing is not None:
        raise InputError(
            f"{missing}: image not found, but {attr_path.name} lists it; the release is incomplete"
        )
    return HQRelease(indices, image_paths, table.values, celeba_files, identities)


def split_digest(ids: list[str], splits: list[str]) -> str:
    """Fingerprint of an assignment, to tell whether a re-run would produce the same split."""
    text = "\n".join(f"{i} {s}" for i, s in sorted(zip(ids, splits, strict=True)))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_existing(config: PrepareCelebAHQConfig, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse to mix two different splits in one DST unless --overwrite."""
    dst = config.dst
    if old is None:
        if existing_examples(dst):
            raise InputError(
                f"{dst}: holds example folders but no {DATASET_INFO}; use an empty DST or pass --overwrite"
            )
        return
    if old.get("split_digest") != new["split_digest"]:
        changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in SPLIT_OPTIONS if old.get(k) != new[k]]
        what = ", ".join(changed) if changed else "the input release changed"
        raise InputError(
            f"{dst / DATASET_INFO}: DST was split with other options ({what}); pass --overwrite to redo the "
            "split, or use a new DST"
        )


def check_images(paths: list[Path]) -> None:
    """Decode every image in ``paths`` (at reduced scale, a few threads); InputError naming the first bad one."""

    def check(path: Path) -> None:
        check_image_bytes(path, path.read_bytes())

    with (
        ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool,
        tqdm(total=len(paths), desc="checking images", unit="image", disable=None if paths else True) as bar,
    ):
        for _ in pool.map(check, paths):
            bar.update()


def move_misplaced_examples(dst: Path, wanted: dict[str, str], keep_celeba_extras: bool) -> int:
    """Put every example folder where the split ``wanted`` (id -> split) says; delete the ids it lacks.

    A moved folder loses its ``example.json`` first, so it is unfinished (rewritten) wherever a kill leaves it.
    CelebA extras stay in train only with ``keep_celeba_extras`` (the split they were filtered for). Folders
    not named like examples are left alone. Returns how many folders were moved or deleted.
    """
    changed = 0
    for example_id, split in existing_examples(dst):
        folder = example_dir(dst, split, example_id)
        if example_id.startswith(CELEBA_ID_PREFIX):
            if keep_celeba_extras and split == SPLITS[0]:
                continue
            remove_examples(dst, [(example_id, split)])
        elif example_id.startswith(HQ_ID_PREFIX):
            if wanted.get(example_id) == split:
                continue
            target = example_dir(dst, wanted[example_id], example_id) if example_id in wanted else None
            (folder / EXAMPLE_RECORD).unlink(missing_ok=True)
            if target is None or target.exists():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(folder, target)
        else:
            continue
        changed += 1
    if changed:
        log.info("%s: moved or removed %d example folder(s) that the split puts elsewhere", dst, changed)
    return changed


def prepare_celeba_hq(config: PrepareCelebAHQConfig) -> dict[str, Any]:
    """Split CelebAMask-HQ into ``config.dst``; return a summary (split sizes, written, skipped)."""
    release = load_hq_release(config.src, config.celeba_dir)
    if config.split_by_identity:
        assignment = identity_split(release.attributes, release.identities, config.random_seed)
    else:
        assignment = stratified_split(release.attributes, config.random_seed)
    ids = [hq_example_id(idx) for idx in release.indices]
    splits = [SPLITS[int(s)] for s in assignment]
    info: dict[str, Any] = {
        "source": SOURCE_HQ,
        "celebamask_hq_dir": str(config.src),
        "random_seed": config.random_seed,
        "split_by_identity": config.split_by_identity,
        "num_examples": len(ids),
        "target_split_sizes": dict(zip(SPLITS, split_sizes(len(ids)), strict=True)),
        "split_sizes": {s: splits.count(s) for s in SPLITS},
        "split_digest": split_digest(ids, splits),
        "hq_complete": False,
    }
    old = read_dataset_info(config.dst)
    if not config.overwrite:
        _check_existing(config, old, info)
    same_split = old is not None and old.get("split_digest") == info["split_digest"]
    if same_split and "celeba" in old:
        info["celeba"] = old["celeba"]  # prepare-celeba's examples stay valid under the same split
    # What will be written: examples not finished where the split puts them (every one with --overwrite).
    todo = [
        i
        for i, (example_id, split) in enumerate(zip(ids, splits, strict=True))
        if config.overwrite or not is_finished(example_dir(config.dst, split, example_id))
    ]
    check_images([release.image_paths[i] for i in todo])

    # Everything is validated: from here on we write, holding the dataset's lock.
    with stage_lock(config.dst, "prepare", f"prepare-celeba-hq {config.dst}"):
        if read_dataset_info(config.dst) != old:
            raise InputError(f"{config.dst / DATASET_INFO}: changed by another run meanwhile; run again")
        write_dataset_info(config.dst, info)
        for split in SPLITS:
            if (config.dst / split).is_dir():
                remove_stale_temp_files(config.dst / split)
        move_misplaced_examples(config.dst, dict(zip(ids, splits, strict=True)), "celeba" in info)
        if not same_split and old is not None and "celeba" in old:
            log.warning("the split changed: CelebA extras were removed; re-run sd3 prepare-celeba")
        written = _write_examples(config, release, ids, splits, todo)
        info["hq_complete"] = True
        write_dataset_info(config.dst, info)

    values_by_split = {s: release.attributes[assignment == k] for k, s in enumerate(SPLITS)}
    Console().print(
        frequency_table(values_by_split)
    )  # once: the log gets the plain lines only at debug level
    log.debug("attribute frequencies per split (%%):\n%s", "\n".join(frequency_lines(values_by_split)))
    log.info(
        "%s: %s examples (%s); written %d, already done %d",
        config.dst,
        len(ids),
        ", ".join(f"{s} {n}" for s, n in info["split_sizes"].items()),
        written,
        len(ids) - written,
    )
    return {"split_sizes": info["split_sizes"], "written": written, "skipped": len(ids) - written}


def _write_examples(
    config: PrepareCelebAHQConfig, release: HQRelease, ids: list[str], splits: list[str], todo: list[int]
) -> int:
    """Write ``image.jpg`` then ``example.json`` of the examples ``todo`` (row indices); return how many."""
    with tqdm(total=len(todo), desc="prepare-celeba-hq", unit="image") as bar:
        for i in todo:
            folder = example_dir(config.dst, splits[i], ids[i])
            image_path = release.image_paths[i]
            # Released JPEG bytes unchanged (no re-encoding loss); other formats as 8-bit RGB JPEG.
            atomic_write_bytes(folder / IMAGE, release_image_bytes(image_path, image_path.read_bytes()))
            record = example_record(
                example_id=ids[i],
                source=SOURCE_HQ,
                source_file=f"{HQ_IMAGES}/{image_path.name}",
                celeba_file=release.celeba_files[i],
                identity=release.identities[i],
                split=splits[i],
                attributes={name: bool(v) for name, v in zip(ATTRIBUTES, release.attributes[i], strict=True)},
            )
            write_example_record(folder, record)
            bar.update()
    return len(todo)
