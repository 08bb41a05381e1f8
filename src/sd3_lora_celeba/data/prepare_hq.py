"""``sd3 prepare-celeba-hq SRC DST``: split CelebAMask-HQ into train/val/test example folders.

Reads the release (``CelebAMask-HQ-attribute-anno.txt``, ``CelebA-HQ-to-CelebA-mapping.txt``,
``CelebA-HQ-img/<idx>.jpg``), splits it 80/10/10 stratified on Male x Wearing_Lipstick x Smiling (or by whole
identities), and writes ``DST/<split>/hq-<idx>/{image.jpg, example.json}`` as documented in ``layout``.

Safe to interrupt and re-run: ``dataset.json`` is written first (so a re-run with other split options is
refused instead of mixing two splits), each example's ``example.json`` last (so finished examples are
skipped). ``--overwrite`` rewrites every example and only then removes folders the new split no longer has.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from sd3_lora_celeba.config import argument, option
from sd3_lora_celeba.data.celeba_files import (
    read_attribute_file,
    read_hq_mapping,
    read_identity_file,
    require_rows,
)
from sd3_lora_celeba.data.crop import check_jpeg_bytes
from sd3_lora_celeba.data.dataset import (
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
    HQ_ATTRIBUTES,
    HQ_IMAGES,
    HQ_MAPPING,
    IMAGE,
    SPLITS,
)

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

    # Everything is validated: from here on we write.
    config.dst.mkdir(parents=True, exist_ok=True)
    write_dataset_info(config.dst, info)
    for split in SPLITS:
        if (config.dst / split).is_dir():
            remove_stale_temp_files(config.dst / split)

    written = skipped = 0
    with tqdm(total=len(ids), desc="prepare-celeba-hq", unit="image") as bar:
        for i, (example_id, split, image_path) in enumerate(
            zip(ids, splits, release.image_paths, strict=True)
        ):
            bar.update()
            folder = example_dir(config.dst, split, example_id)
            if is_finished(folder) and not config.overwrite:
                skipped += 1
                continue
            data = image_path.read_bytes()
            check_jpeg_bytes(image_path, data)  # before writing anything of this example
            atomic_write_bytes(folder / IMAGE, data)  # released bytes unchanged: no re-encoding loss
            record = example_record(
                example_id=example_id,
                source=SOURCE_HQ,
                source_file=f"{HQ_IMAGES}/{image_path.name}",
                celeba_file=release.celeba_files[i],
                identity=release.identities[i],
                split=split,
                attributes={name: bool(v) for name, v in zip(ATTRIBUTES, release.attributes[i], strict=True)},
            )
            write_example_record(folder, record)
            written += 1

    if config.overwrite:
        wanted = dict(zip(ids, splits, strict=True))
        stale = [
            (example_id, split)
            for example_id, split in existing_examples(config.dst)
            if wanted.get(example_id) != split
            and not (same_split and example_id.startswith(CELEBA_ID_PREFIX) and split == SPLITS[0])
        ]
        if stale:
            log.info("removing %d example folders that the new split does not hold", len(stale))
            remove_examples(config.dst, stale)
        if not same_split and old is not None and "celeba" in old:
            log.warning("the split changed: CelebA extras were removed; re-run sd3 prepare-celeba")

    info["hq_complete"] = True
    write_dataset_info(config.dst, info)

    values_by_split = {s: release.attributes[assignment == k] for k, s in enumerate(SPLITS)}
    Console().print(frequency_table(values_by_split))
    log.info("attribute frequencies per split (%%):\n%s", "\n".join(frequency_lines(values_by_split)))
    log.info(
        "%s: %s examples (%s); written %d, already done %d",
        config.dst,
        len(ids),
        ", ".join(f"{s} {n}" for s, n in info["split_sizes"].items()),
        written,
        skipped,
    )
    return {"split_sizes": info["split_sizes"], "written": written, "skipped": skipped}
