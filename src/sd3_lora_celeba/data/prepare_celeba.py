"""``sd3 prepare-celeba CELEBA CELEBAMASK_HQ DST``: add face crops of extra CelebA images to the train split.

Run after ``prepare-celeba-hq``. Of the 202,599 in-the-wild CelebA images it drops

* the sources of CelebA-HQ images (the mapping's ``orig_file``): they would duplicate val/test faces,
* with an identity-disjoint split (``dataset.json``), every image of a person who is in val or test,
* images whose short side is below ``--min-image-size`` (checked from the file header, without decoding),

and saves the rest as square crops of side ``min(W, H)`` centred on the face box (``crop.square_crop_box``)
to ``DST/train/celeba-<file stem>/``. Work is spread over ``--num-workers`` processes in two passes: first
every candidate image is checked (decoded at reduced scale; its face box must have its centre inside the
image), so a corrupt image or a bad box stops the run before anything is written; then each worker writes
``image.jpg`` then ``example.json`` atomically, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.data.celeba_files import (
    bbox_line_number,
    read_attribute_file,
    read_bbox_file,
    read_hq_mapping,
    read_identity_file,
    require_rows,
)
from sd3_lora_celeba.data.crop import bbox_inside, check_image_bytes, crop_face, image_size, is_large_enough
from sd3_lora_celeba.data.records import (
    SOURCE_CELEBA,
    celeba_example_id,
    example_dir,
    example_record,
    existing_examples,
    is_finished,
    read_dataset_info,
    remove_examples,
    write_dataset_info,
    write_example_record,
)
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_write_bytes, remove_stale_temp_files
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ATTRIBUTES,
    CELEBA_BBOX,
    CELEBA_ID_PREFIX,
    CELEBA_IDENTITY,
    CELEBA_IMAGES,
    DATASET_INFO,
    HQ_ID_PREFIX,
    HQ_MAPPING,
    IMAGE,
    SPLITS,
)
from sd3_lora_celeba.parallel import stage_lock

log = logging.getLogger(__name__)
TRAIN = SPLITS[0]
RESULT_OPTIONS = ("min_image_size", "max_images")  # a re-run must match them or pass --overwrite


@dataclass
class PrepareCelebAConfig:
    celeba: Path = argument("CelebA release folder (holds Anno/, Eval/ and Img/img_celeba/).")
    celebamask_hq: Path = argument("CelebAMask-HQ release folder (for CelebA-HQ-to-CelebA-mapping.txt).")
    dst: Path = argument("Dataset folder made by sd3 prepare-celeba-hq.")
    min_image_size: int = option(768, "Reject images whose shorter side is below this many pixels.")
    num_workers: int = option(4, "Processes that read, crop and save images.")
    max_images: int | None = option(None, "Process at most this many candidate images (after filtering).")
    overwrite: bool = option(False, "Redo every CelebA example even if DST already holds it.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.min_image_size < 1:
            raise ValueError(
                f"--min-image-size must be a positive number of pixels, got {self.min_image_size}"
            )
        if not 1 <= self.num_workers <= 256:
            raise ValueError(f"--num-workers must be 1 to 256, got {self.num_workers}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(
                f"--max-images must be at least 1 (or left out for all images), got {self.max_images}"
            )


@dataclass(frozen=True)
class CropTask:
    """One candidate image: everything a worker process needs, and nothing it must look up."""

    image_path: Path
    celeba_file: str
    identity: int
    attributes: tuple[bool, ...]  # 40, release order; a tuple, not the record dict, to keep 200k tasks small
    bbox: tuple[int, int, int, int]
    out_dir: Path
    min_image_size: int

    def record(self, crop_box: tuple[int, int, int, int]) -> dict[str, Any]:
        return example_record(
            example_id=self.out_dir.name,
            source=SOURCE_CELEBA,
            source_file=f"{CELEBA_IMAGES}/{self.celeba_file}",
            celeba_file=self.celeba_file,
            identity=self.identity,
            split=TRAIN,
            attributes=dict(zip(ATTRIBUTES, self.attributes, strict=True)),
            bbox=list(self.bbox),
            crop_box=list(crop_box),
        )


def process_image(task: CropTask) -> tuple[str, str]:
    """Reject, or crop and save, one image: ``("kept" | "rejected" | "error", error message)``.

    Errors come back as values, not exceptions, so the parent reports them as one line and stops the pool.
    """
    try:
        width, height = image_size(task.image_path)
        if not is_large_enough(width, height, task.min_image_size):
            return "rejected", ""
        data, box = crop_face(task.image_path, task.bbox)
        atomic_write_bytes(task.out_dir / IMAGE, data)
        write_example_record(task.out_dir, task.record(box))
        return "kept", ""
    except InputError as exc:
        return "error", exc.message


def check_task(task: CropTask) -> tuple[str, str]:
    """Check one image without writing: ``("ok" | "rejected" | "error" | "bbox", error message or "WxH")``."""
    try:
        width, height = image_size(task.image_path)
        if not is_large_enough(width, height, task.min_image_size):
            return "rejected", ""
        check_image_bytes(task.image_path, task.image_path.read_bytes())
        if not bbox_inside(width, height, task.bbox):
            return "bbox", f"{width}x{height}"
        return "ok", ""
    except InputError as exc:
        return "error", exc.message


def _run_tasks(
    tasks: list[CropTask], num_workers: int, fn: Callable[[CropTask], tuple[str, str]] | None = None
) -> Iterator[tuple[str, str]]:
    """Results of ``fn`` (default ``process_image``) over ``tasks`` in order, in-process or over a pool."""
    fn = fn or process_image
    if num_workers == 1 or len(tasks) < 2:
        yield from map(fn, tasks)
        return
    chunksize = max(1, min(64, len(tasks) // (num_workers * 8)))
    batch = 256 * num_workers * chunksize  # bounds the futures alive at once, for 200k-image runs
    executor = ProcessPoolExecutor(max_workers=num_workers)
    try:
        for start in range(0, len(tasks), batch):
            yield from executor.map(fn, tasks[start : start + batch], chunksize=chunksize)
    finally:
        # On an error (or Ctrl-C) drop the queued work instead of finishing 200k images first.
        executor.shutdown(wait=True, cancel_futures=True)


def _forbidden_identities(dst: Path, mapping: dict[int, str], identities: dict[str, int]) -> set[int]:
    """Identities of the val/test CelebA-HQ examples of ``dst``."""
    forbidden: set[int] = set()
    for example_id, split in existing_examples(dst):
        if split == TRAIN or not example_id.startswith(HQ_ID_PREFIX):
            continue
        idx = int(example_id[len(HQ_ID_PREFIX) :])
        if idx not in mapping or mapping[idx] not in identities:
            raise InputError(
                f"{dst / split / example_id}: HQ image {idx} has no identity in the given releases; pass the "
                "CELEBA and CELEBAMASK_HQ folders that DST was prepared from"
            )
        forbidden.add(identities[mapping[idx]])
    return forbidden


def _check_options(config: PrepareCelebAConfig, info: dict[str, Any]) -> dict[str, Any]:
    """The options recorded in ``dataset.json``; refuse other result options than last time without
    --overwrite (the folder may move between runs: what was kept or rejected depends only on these)."""
    options = {
        "celeba_dir": str(config.celeba),
        "min_image_size": config.min_image_size,
        "max_images": config.max_images,
    }
    old = info.get("celeba")
    old_options = old.get("options", {}) if isinstance(old, dict) else {}
    changed = [
        f"{k} {old_options.get(k)!r} -> {options[k]!r}"
        for k in RESULT_OPTIONS
        if old_options.get(k) != options[k]
    ]
    if old is not None and changed and not config.overwrite:
        raise InputError(
            f"{Path(config.dst) / DATASET_INFO}: CelebA extras were prepared with other options "
            f"({', '.join(changed)}); pass --overwrite to redo them"
        )
    return options


def prepare_celeba(config: PrepareCelebAConfig) -> dict[str, Any]:
    """Add filtered, face-cropped CelebA images to ``DST/train``; return counts (kept, rejected, dropped)."""
    dst, celeba = Path(config.dst), Path(config.celeba)
    info = read_dataset_info(dst)
    if info is None or not info.get("hq_complete"):
        raise InputError(
            f"{dst / DATASET_INFO}: not found or unfinished; run sd3 prepare-celeba-hq CELEBAMASK_HQ DST first"
        )
    if not celeba.is_dir():
        raise InputError(f"{celeba}: not a folder; pass the CelebA release folder (holding Anno/ and Img/)")
    mapping = read_hq_mapping(Path(config.celebamask_hq) / HQ_MAPPING)
    attr_path, bbox_path, identity_path = (
        celeba / CELEBA_ATTRIBUTES,
        celeba / CELEBA_BBOX,
        celeba / CELEBA_IDENTITY,
    )
    table = read_attribute_file(attr_path)
    if len(table) == 0:
        raise InputError(f"{attr_path}: lists no images; the release is empty or its download incomplete")
    bboxes = read_bbox_file(bbox_path)
    identities = read_identity_file(identity_path)
    require_rows(bbox_path, bboxes, list(table.files), attr_path)
    require_rows(identity_path, identities, list(table.files), attr_path)

    hq_sources = set(mapping.values())
    by_identity = bool(info.get("split_by_identity"))
    forbidden = _forbidden_identities(dst, mapping, identities) if by_identity else set()
    candidates: list[int] = []
    dropped_sources = dropped_identities = 0
    for i, name in enumerate(table.files):
        if name in hq_sources:
            dropped_sources += 1
        elif identities[name] in forbidden:
            dropped_identities += 1
        else:
            candidates.append(i)
    if config.max_images is not None:
        candidates = candidates[: config.max_images]

    options = _check_options(config, info)
    image_dir = celeba / CELEBA_IMAGES
    missing = next(
        (image_dir / table.files[i] for i in candidates if not (image_dir / table.files[i]).is_file()), None
    )
    if missing is not None:
        raise InputError(
            f"{missing}: image not found, but {attr_path.name} lists it; the release is incomplete"
        )

    tasks: list[CropTask] = []
    kept_ids: set[str] = set()
    already = 0
    for i in candidates:
        name = table.files[i]
        example_id = celeba_example_id(name)
        folder = example_dir(dst, TRAIN, example_id)
        if is_finished(folder) and not config.overwrite:
            already += 1
            kept_ids.add(example_id)
            continue
        attributes = tuple(bool(v) for v in table.values[i])
        tasks.append(
            CropTask(
                image_dir / name,
                name,
                identities[name],
                attributes,
                bboxes[name],
                folder,
                config.min_image_size,
            )
        )

    _check_tasks(tasks, config.num_workers, bbox_path)

    # Everything is validated: from here on we write, holding the dataset's lock.
    with stage_lock(dst, "prepare", f"prepare-celeba {dst}"):
        if read_dataset_info(dst) != info:
            raise InputError(f"{dst / DATASET_INFO}: changed by another run meanwhile; run again")
        info["celeba"] = {"options": options, "complete": False}
        write_dataset_info(dst, info)
        if (dst / TRAIN).is_dir():
            remove_stale_temp_files(dst / TRAIN)
        summary = _write_crops(config, tasks, kept_ids, already)
        summary["dropped_hq_sources"] = dropped_sources
        summary["dropped_val_test_identities"] = dropped_identities
        info["celeba"] = {"options": options, "complete": True, **summary}
        write_dataset_info(dst, info)
    log.info(
        "%s: %d CelebA crops in train (%d new); rejected %d below %d px; dropped %d CelebA-HQ sources and %d "
        "images of val/test identities",
        dst / TRAIN,
        summary["kept"],
        summary["newly_kept"],
        summary["rejected_small"],
        config.min_image_size,
        dropped_sources,
        dropped_identities,
    )
    return summary


def _check_tasks(tasks: list[CropTask], num_workers: int, bbox_path: Path) -> None:
    """Check every image of ``tasks`` (pass 1, nothing written); InputError naming the first bad one."""
    with (
        tqdm(total=len(tasks), desc="checking images", unit="image", disable=None if tasks else True) as bar,
        closing(_run_tasks(tasks, num_workers, check_task)) as results,
    ):
        for task, (status, message) in zip(tasks, results, strict=True):
            if status == "error":
                raise InputError(message)
            if status == "bbox":
                lineno = bbox_line_number(bbox_path, task.celeba_file)
                raise InputError(
                    f"{bbox_path}:{lineno}: the face box {task.bbox} of {task.celeba_file} lies outside its "
                    f"{message} image (its centre must be inside); fix the row or re-download the file"
                )
            bar.update()


def _write_crops(
    config: PrepareCelebAConfig, tasks: list[CropTask], kept_ids: set[str], already: int
) -> dict:
    """Crop and save the checked ``tasks`` (pass 2); return the counts of the summary."""
    dst = Path(config.dst)
    counts = {"kept": 0, "rejected": 0}
    # closing(): on an error the generator's finally (pool shutdown) runs now, not at garbage collection.
    with (
        tqdm(total=len(tasks), desc="prepare-celeba", unit="image") as bar,
        closing(_run_tasks(tasks, config.num_workers)) as results,
    ):
        for task, (status, message) in zip(tasks, results, strict=True):
            if status == "error":
                raise InputError(message)
            counts[status] += 1
            if status == "kept":
                kept_ids.add(task.out_dir.name)
            bar.update()
            bar.set_postfix(kept=counts["kept"] + already, rejected=counts["rejected"], refresh=False)

    if config.overwrite:
        stale = [
            (example_id, split)
            for example_id, split in existing_examples(dst)
            if example_id.startswith(CELEBA_ID_PREFIX) and (example_id not in kept_ids or split != TRAIN)
        ]
        if stale:
            log.info("removing %d CelebA examples that these options no longer keep", len(stale))
            remove_examples(dst, stale)

    return {
        "kept": counts["kept"] + already,
        "newly_kept": counts["kept"],
        "rejected_small": counts["rejected"],
    }
