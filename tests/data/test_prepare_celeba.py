"""``sd3 prepare-celeba`` end-to-end on the synthetic releases: filtering, crops, workers, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd3_lora_celeba.data import prepare_celeba as prepare_celeba_module
from sd3_lora_celeba.data.crop import square_crop_box
from sd3_lora_celeba.data.prepare_celeba import PrepareCelebAConfig, prepare_celeba
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ATTRIBUTES,
    CELEBA_BBOX,
    CELEBA_IDENTITY,
    CELEBA_IMAGES,
    DATASET_INFO,
    EXAMPLE_RECORD,
    HQ_MAPPING,
    IMAGE,
)
from sd3_lora_celeba.testing.celeba_synth import FACE_BOX_COLOUR, rewrite_line

MIN_SIZE = 96  # --min-image-size of these tests; the synthetic CelebA sides (48..160 px) straddle it


def celeba_records(dst: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in dst.glob(f"*/celeba-*/{EXAMPLE_RECORD}")}


def expected_kept(celeba, excluded_identities=frozenset()) -> set[str]:
    return {
        f"celeba-{Path(f).stem}"
        for f in celeba.files
        if f not in celeba.hq_sources
        and min(celeba.sizes[f]) >= MIN_SIZE
        and celeba.identities[f] not in excluded_identities
    }


def test_seed_readme_command_adds_filtered_crops_to_train(releases, hq_dataset, run_cli):
    hq, celeba = releases
    dst = hq_dataset
    result = run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", MIN_SIZE)
    assert result.exit_code == 0, result.output
    found = celeba_records(dst)
    kept = expected_kept(celeba)
    assert set(found) == kept
    assert 5 < len(kept) < 60 - 5  # the synthetic sizes straddle the threshold: both outcomes happen
    assert all(p.parent.name == "train" for p in dst.glob("*/celeba-*"))
    info = json.loads((dst / DATASET_INFO).read_text())["celeba"]
    assert info["kept"] == len(kept) and info["complete"] is True
    assert info["dropped_hq_sources"] == len(celeba.hq_sources)
    assert info["rejected_small"] == 60 - len(kept)

    for example_id, record in found.items():
        name = record["celeba_file"]
        width, height = celeba.sizes[name]
        assert record["source"] == "celeba" and record["split"] == "train"
        assert record["source_file"] == f"{CELEBA_IMAGES}/{name}"
        assert record["identity"] == celeba.identities[name]
        assert list(record["attributes"]) == list(ATTRIBUTES)
        assert list(record["attributes"].values()) == celeba.attributes[name].tolist()
        assert tuple(record["bbox"]) == celeba.bboxes[name]
        box = tuple(record["crop_box"])
        assert box == square_crop_box(width, height, celeba.bboxes[name])
        crop = np.asarray(Image.open(dst / "train" / example_id / IMAGE).convert("RGB"), dtype=np.int32)
        side = min(width, height)
        assert crop.shape == (side, side, 3)
        # The face box (filled with FACE_BOX_COLOUR) sits where the crop box says it does.
        x, y, w, h = celeba.bboxes[name]
        cx, cy = x + w // 2 - box[0], y + h // 2 - box[1]
        assert np.abs(crop[cy, cx] - FACE_BOX_COLOUR).max() < 40
        # And the crop is the original's pixels (up to JPEG noise).
        original = np.asarray(Image.open(celeba.root / CELEBA_IMAGES / name).convert("RGB"), dtype=np.int32)
        assert np.abs(crop - original[box[1] : box[3], box[0] : box[2]]).mean() < 4


def test_identity_disjoint_split_drops_val_test_identities(releases, tmp_path, run_cli):
    hq, celeba = releases
    dst = tmp_path / "dataset"
    args = ("--split-by-identity", "--celeba-dir", celeba.root)
    assert run_cli("prepare-celeba-hq", hq.root, dst, *args).exit_code == 0
    held_out = {
        json.loads(p.read_text())["identity"]
        for split in ("val", "test")
        for p in (dst / split).glob(f"*/{EXAMPLE_RECORD}")
    }
    result = run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", MIN_SIZE)
    assert result.exit_code == 0, result.output
    found = celeba_records(dst)
    assert set(found) == expected_kept(celeba, held_out)
    assert not {r["identity"] for r in found.values()} & held_out
    assert json.loads((dst / DATASET_INFO).read_text())["celeba"]["dropped_val_test_identities"] > 0


def test_worker_processes_give_the_same_result(releases, hq_dataset, tmp_path, run_cli):
    hq, celeba = releases
    one = hq_dataset
    two = tmp_path / "dataset-2"
    assert run_cli("prepare-celeba-hq", hq.root, two).exit_code == 0
    for dst, workers in ((one, 1), (two, 2)):
        args = ("--min-image-size", MIN_SIZE, "--num-workers", workers)
        assert run_cli("prepare-celeba", celeba.root, hq.root, dst, *args).exit_code == 0
    assert celeba_records(one) == celeba_records(two)
    for example_id in celeba_records(one):
        assert (one / "train" / example_id / IMAGE).read_bytes() == (
            two / "train" / example_id / IMAGE
        ).read_bytes()


def test_max_images_limits_the_candidates(releases, hq_dataset):
    hq, celeba = releases
    config = PrepareCelebAConfig(
        celeba=celeba.root,
        celebamask_hq=hq.root,
        dst=hq_dataset,
        min_image_size=MIN_SIZE,
        max_images=10,
        num_workers=1,
    )
    summary = prepare_celeba(config)
    assert summary["kept"] + summary["rejected_small"] == 10


def test_resume_redoes_only_unfinished_examples(releases, hq_dataset, snapshot, monkeypatch):
    hq, celeba = releases
    dst = hq_dataset
    config = PrepareCelebAConfig(
        celeba=celeba.root, celebamask_hq=hq.root, dst=dst, min_image_size=MIN_SIZE, num_workers=1
    )
    real_process = prepare_celeba_module.process_image
    calls = {"n": 0}

    def process_then_die(task):
        if calls["n"] == 30:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_process(task)

    monkeypatch.setattr(prepare_celeba_module, "process_image", process_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_celeba(config)
    done_early = set(celeba_records(dst))
    assert 0 < len(done_early) < len(expected_kept(celeba))
    before = snapshot(dst / "train")

    monkeypatch.setattr(prepare_celeba_module, "process_image", real_process)
    summary = prepare_celeba(config)
    assert summary["kept"] == len(expected_kept(celeba))
    assert summary["newly_kept"] == len(expected_kept(celeba)) - len(done_early)
    after = snapshot(dst / "train")
    assert all(after[k][0] == v[0] for k, v in before.items()), "finished examples were rewritten"
    assert set(celeba_records(dst)) == expected_kept(celeba)


def test_other_options_need_overwrite(releases, hq_dataset, run_cli, snapshot, error_line):
    hq, celeba = releases
    dst = hq_dataset
    assert run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", MIN_SIZE).exit_code == 0
    before = snapshot(dst)
    line = error_line(run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", 120))
    assert "min_image_size 96 -> 120" in line and "--overwrite" in line
    assert snapshot(dst) == before

    result = run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", 120, "--overwrite")
    assert result.exit_code == 0, result.output
    kept = {
        f"celeba-{Path(f).stem}"
        for f in celeba.files
        if f not in celeba.hq_sources and min(celeba.sizes[f]) >= 120
    }
    assert set(celeba_records(dst)) == kept  # images now too small were removed
    assert {p.name for p in (dst / "train").glob("celeba-*")} == kept


def test_needs_prepare_celeba_hq_first(releases, tmp_path, run_cli, error_line):
    hq, celeba = releases
    line = error_line(run_cli("prepare-celeba", celeba.root, hq.root, tmp_path / "empty"))
    assert "dataset.json" in line and "prepare-celeba-hq" in line


MALFORMED = [
    (CELEBA_ATTRIBUTES, 2, "Male Smiling", f"{CELEBA_ATTRIBUTES}:2: expected the 40 CelebA attribute names"),
    (
        CELEBA_ATTRIBUTES,
        9,
        "000007.jpg 1 1 1",
        f"{CELEBA_ATTRIBUTES}:9: expected 41 fields (name + 40 attributes), got 4",
    ),
    (CELEBA_ATTRIBUTES, 1, "202599", f"{CELEBA_ATTRIBUTES}:1: declares 202599 images but holds 100 rows"),
    (CELEBA_BBOX, 2, "image_id x y", f"{CELEBA_BBOX}:2: expected the header 'image_id x_1 y_1 width height'"),
    (CELEBA_BBOX, 10, "000008.jpg 1 2", f"{CELEBA_BBOX}:10: expected 5 fields"),
    (CELEBA_BBOX, 1, "101", f"{CELEBA_BBOX}:1: declares 101 images but holds 100 rows"),
    (CELEBA_BBOX, 102, None, f"{CELEBA_BBOX}:1: declares 100 images but holds 99 rows"),
    (CELEBA_IDENTITY, 5, "000005.jpg", f"{CELEBA_IDENTITY}:5: expected 2 fields"),
    (CELEBA_IDENTITY, 100, None, f"{CELEBA_IDENTITY}: no row for 000"),
    (HQ_MAPPING, 1, "idx orig_file", f"{HQ_MAPPING}:1: expected the header"),
]


@pytest.mark.parametrize(("relpath", "lineno", "new_line", "expected"), MALFORMED)
def test_malformed_annotations_fail_in_one_line_and_overwrite_nothing(
    releases, release_copy, hq_dataset, run_cli, snapshot, error_line, relpath, lineno, new_line, expected
):
    hq_root, celeba_root = release_copy
    dst = hq_dataset
    args = ("--min-image-size", MIN_SIZE)
    assert run_cli("prepare-celeba", celeba_root, hq_root, dst, *args).exit_code == 0
    before = snapshot(dst)
    root = hq_root if relpath == HQ_MAPPING else celeba_root
    rewrite_line(root / relpath, lineno, new_line)
    line = error_line(run_cli("prepare-celeba", celeba_root, hq_root, dst, *args, "--overwrite"))
    assert f"{root}/{expected}" in line
    assert snapshot(dst) == before


def _first_kept_file(celeba) -> str:
    return next(f for f in celeba.files if f not in celeba.hq_sources and min(celeba.sizes[f]) >= MIN_SIZE)


def test_missing_image_is_named_before_anything_is_written(
    releases, release_copy, hq_dataset, run_cli, snapshot, error_line
):
    _, celeba = releases
    hq_root, celeba_root = release_copy
    name = celeba.files[-1] if celeba.files[-1] not in celeba.hq_sources else _first_kept_file(celeba)
    (celeba_root / CELEBA_IMAGES / name).unlink()
    before = snapshot(hq_dataset)
    line = error_line(
        run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset, "--min-image-size", MIN_SIZE)
    )
    assert f"{celeba_root / CELEBA_IMAGES / name}: image not found" in line
    assert snapshot(hq_dataset) == before


@pytest.mark.parametrize(("damage", "workers"), [("garbage", 1), ("truncated", 1), ("truncated", 2)])
def test_corrupt_image_fails_without_a_half_example(
    releases, release_copy, hq_dataset, run_cli, error_line, damage, workers
):
    _, celeba = releases
    hq_root, celeba_root = release_copy
    name = _first_kept_file(celeba)
    path = celeba_root / CELEBA_IMAGES / name
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 100 if damage == "garbage" else data[: len(data) // 2])
    args = ("--min-image-size", MIN_SIZE, "--num-workers", workers)
    line = error_line(run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset, *args))
    assert str(path) in line and ("cannot read image" in line or "cannot decode image" in line)
    example = hq_dataset / "train" / f"celeba-{Path(name).stem}"
    assert not (example / IMAGE).exists() and not (example / EXAMPLE_RECORD).exists()
    assert not list(hq_dataset.rglob(".tmp-*"))

    path.write_bytes(data)  # fixed: the re-run completes
    assert run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset, *args).exit_code == 0
    assert set(celeba_records(hq_dataset)) == expected_kept(celeba)


def test_hq_overwrite_with_a_new_split_removes_celeba_extras(releases, hq_dataset, run_cli):
    hq, celeba = releases
    dst = hq_dataset
    assert run_cli("prepare-celeba", celeba.root, hq.root, dst, "--min-image-size", MIN_SIZE).exit_code == 0
    # Same split redone: the extras stay valid and stay.
    assert run_cli("prepare-celeba-hq", hq.root, dst, "--overwrite").exit_code == 0
    assert set(celeba_records(dst)) == expected_kept(celeba)
    assert "celeba" in json.loads((dst / DATASET_INFO).read_text())
    # A new split may put their identities in val/test: the extras go, and prepare-celeba must run again.
    assert run_cli("prepare-celeba-hq", hq.root, dst, "--overwrite", "--random-seed", 7).exit_code == 0
    assert not list(dst.glob("*/celeba-*"))
    assert "celeba" not in json.loads((dst / DATASET_INFO).read_text())


def _last_kept_file(celeba) -> str:
    return [f for f in celeba.files if f not in celeba.hq_sources and min(celeba.sizes[f]) >= MIN_SIZE][-1]


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_last_image_stops_the_run_before_anything_is_written(
    releases, release_copy, hq_dataset, run_cli, snapshot, error_line, workers
):
    _, celeba = releases
    hq_root, celeba_root = release_copy
    path = celeba_root / CELEBA_IMAGES / _last_kept_file(celeba)
    path.write_bytes(path.read_bytes()[:300])  # the last image the workers would reach
    before = snapshot(hq_dataset)
    args = ("--min-image-size", MIN_SIZE, "--num-workers", workers)
    line = error_line(run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset, *args))
    assert str(path) in line and ("cannot read image" in line or "cannot decode image" in line)
    assert snapshot(hq_dataset) == before  # no crop, and dataset.json untouched


def test_face_box_outside_the_image_is_refused_with_file_and_line(
    releases, release_copy, hq_dataset, run_cli, snapshot, error_line
):
    _, celeba = releases
    hq_root, celeba_root = release_copy
    name = _last_kept_file(celeba)
    bbox_path = celeba_root / CELEBA_BBOX
    lineno = next(i for i, line in enumerate(bbox_path.read_text().splitlines(), 1) if line.startswith(name))
    width, height = celeba.sizes[name]
    rewrite_line(bbox_path, lineno, f"{name} {width + 10} 5 20 20")  # right of the image
    before = snapshot(hq_dataset)
    line = error_line(
        run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset, "--min-image-size", MIN_SIZE)
    )
    assert f"{bbox_path}:{lineno}: the face box" in line and "outside" in line
    assert snapshot(hq_dataset) == before


def test_empty_release_is_refused(release_copy, hq_dataset, run_cli, snapshot, error_line):
    hq_root, celeba_root = release_copy
    for relpath in (CELEBA_ATTRIBUTES, "Anno/list_bbox_celeba.txt"):
        path = celeba_root / relpath
        lines = path.read_text().splitlines()
        path.write_text(f"0\n{lines[1]}\n")
    before = snapshot(hq_dataset)
    line = error_line(run_cli("prepare-celeba", celeba_root, hq_root, hq_dataset))
    assert f"{celeba_root / CELEBA_ATTRIBUTES}: lists no images" in line
    assert snapshot(hq_dataset) == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--num-workers", "0"), ("--num-workers", "257"), ("--min-image-size", "0"), ("--max-images", "nan")],
)
def test_numeric_flags_are_range_checked(releases, hq_dataset, run_cli, snapshot, flag, value):
    hq, celeba = releases
    before = snapshot(hq_dataset)
    result = run_cli("prepare-celeba", celeba.root, hq.root, hq_dataset, flag, value)
    assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output
    assert snapshot(hq_dataset) == before
