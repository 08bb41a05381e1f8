"""``sd3 prepare-celeba-hq`` end-to-end on the synthetic release: layout, split, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd3_lora_celeba.data import prepare_hq
from sd3_lora_celeba.data.prepare_hq import PrepareCelebAHQConfig, prepare_celeba_hq
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    DATASET_INFO,
    EXAMPLE_RECORD,
    HQ_ATTRIBUTES,
    HQ_IMAGES,
    HQ_MAPPING,
    IMAGE,
    SPLITS,
)
from sd3_lora_celeba.testing.celeba_synth import rewrite_line


def records(dst: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in dst.glob(f"*/*/{EXAMPLE_RECORD}")}


def test_seed_readme_command_builds_the_documented_layout(releases, tmp_path, run_cli):
    hq, _ = releases
    dst = tmp_path / "dataset"
    result = run_cli("prepare-celeba-hq", hq.root, dst)
    assert result.exit_code == 0, result.output
    assert "Attribute frequencies per split" in result.output  # the rich table, on stdout

    info = json.loads((dst / DATASET_INFO).read_text())
    assert info["split_sizes"] == {"train": 32, "val": 4, "test": 4}
    assert info["random_seed"] == 42 and info["split_by_identity"] is False and info["hq_complete"] is True
    found = records(dst)
    assert sorted(found) == sorted(f"hq-{i:05d}" for i in hq.indices)
    for example_id, record in found.items():
        idx = int(example_id[3:])
        folder = dst / record["split"] / example_id
        assert record["id"] == example_id and record["source"] == "celeba-hq"
        assert record["source_file"] == f"{HQ_IMAGES}/{idx}.jpg"
        assert record["celeba_file"] == hq.orig_files[hq.indices.index(idx)]
        assert record["identity"] is None  # no --celeba-dir given
        assert list(record["attributes"]) == list(ATTRIBUTES)  # release order, not sorted
        assert list(record["attributes"].values()) == hq.attributes[hq.indices.index(idx)].tolist()
        # The released JPEG bytes, unchanged.
        assert (folder / IMAGE).read_bytes() == (hq.root / HQ_IMAGES / f"{idx}.jpg").read_bytes()
    assert not list(dst.rglob(".tmp-*"))


def test_split_is_stable_across_runs_and_follows_the_seed(releases, tmp_path, run_cli):
    hq, _ = releases
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        assert run_cli("prepare-celeba-hq", hq.root, tmp_path / name, "--random-seed", seed).exit_code == 0
    splits = {n: {k: r["split"] for k, r in records(tmp_path / n).items()} for n in "abc"}
    assert splits["a"] == splits["b"]
    assert splits["a"] != splits["c"]


def test_split_by_identity_keeps_identities_disjoint(releases, tmp_path, run_cli):
    hq, celeba = releases
    dst = tmp_path / "dataset"
    result = run_cli("prepare-celeba-hq", hq.root, dst, "--split-by-identity", "--celeba-dir", celeba.root)
    assert result.exit_code == 0, result.output
    splits_of: dict[int, set[str]] = {}
    for record in records(dst).values():
        assert record["identity"] == celeba.identities[record["celeba_file"]]
        splits_of.setdefault(record["identity"], set()).add(record["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert len(splits_of) > 3  # several identities, so the test means something
    assert json.loads((dst / DATASET_INFO).read_text())["split_by_identity"] is True


def test_split_by_identity_needs_the_identity_file(releases, tmp_path, run_cli):
    hq, _ = releases
    result = run_cli("prepare-celeba-hq", hq.root, tmp_path / "d", "--split-by-identity")
    assert result.exit_code == 2
    assert "--celeba-dir" in result.output
    assert not (tmp_path / "d").exists()


def test_rerun_skips_finished_examples_and_removes_temp_files(releases, tmp_path, run_cli, snapshot):
    hq, _ = releases
    dst = tmp_path / "dataset"
    assert run_cli("prepare-celeba-hq", hq.root, dst).exit_code == 0
    # An interrupted run: three examples without their record, one with a temp file next to it.
    unfinished = sorted(dst.glob(f"*/*/{EXAMPLE_RECORD}"))[:3]
    for path in unfinished:
        path.unlink()
    stray = unfinished[0].parent / ".tmp-image.jpg.abc123.jpg"
    stray.write_bytes(b"half")
    before = {k: v for k, v in snapshot(dst).items() if k != DATASET_INFO and ".tmp-" not in k}

    summary = prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst))
    assert summary == {"split_sizes": {"train": 32, "val": 4, "test": 4}, "written": 3, "skipped": 37}
    after = snapshot(dst)
    for key, (mtime, _) in before.items():
        if not any(key.startswith(str(p.parent.relative_to(dst))) for p in unfinished):
            assert after[key][0] == mtime, f"{key} was rewritten"
    assert all(p.is_file() for p in unfinished)
    assert not stray.exists()


def test_resume_after_interruption(releases, tmp_path, monkeypatch):
    hq, _ = releases
    dst = tmp_path / "dataset"
    real_write = prepare_hq.write_example_record
    calls = {"n": 0}

    def write_then_die(folder, record):
        if calls["n"] == 10:
            raise KeyboardInterrupt  # as if Ctrl-C hit between image.jpg and example.json
        calls["n"] += 1
        real_write(folder, record)

    monkeypatch.setattr(prepare_hq, "write_example_record", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst))
    assert len(list(dst.glob(f"*/*/{EXAMPLE_RECORD}"))) == 10
    assert json.loads((dst / DATASET_INFO).read_text())["hq_complete"] is False

    monkeypatch.setattr(prepare_hq, "write_example_record", real_write)
    summary = prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst))
    assert (summary["written"], summary["skipped"]) == (30, 10)
    assert len(list(dst.glob(f"*/*/{EXAMPLE_RECORD}"))) == 40
    assert json.loads((dst / DATASET_INFO).read_text())["hq_complete"] is True


def test_other_split_options_need_overwrite(releases, tmp_path, run_cli, snapshot):
    hq, _ = releases
    dst = tmp_path / "dataset"
    assert run_cli("prepare-celeba-hq", hq.root, dst).exit_code == 0
    before = snapshot(dst)
    result = run_cli("prepare-celeba-hq", hq.root, dst, "--random-seed", 7)
    assert result.exit_code == 2
    assert "random_seed 42 -> 7" in result.output and "--overwrite" in result.output
    assert snapshot(dst) == before

    result = run_cli("prepare-celeba-hq", hq.root, dst, "--random-seed", 7, "--overwrite")
    assert result.exit_code == 0, result.output
    fresh = tmp_path / "fresh"
    assert run_cli("prepare-celeba-hq", hq.root, fresh, "--random-seed", 7).exit_code == 0
    # Same folders as a fresh run with seed 7: moved examples left no stale folder behind.
    assert sorted(p.relative_to(dst) for p in dst.glob("*/*")) == sorted(
        p.relative_to(fresh) for p in fresh.glob("*/*")
    )
    assert json.loads((dst / DATASET_INFO).read_text())["random_seed"] == 7


def test_example_folders_without_dataset_json_are_not_mixed(releases, tmp_path, run_cli):
    hq, _ = releases
    dst = tmp_path / "dataset"
    (dst / "train" / "hq-99999").mkdir(parents=True)
    result = run_cli("prepare-celeba-hq", hq.root, dst)
    assert result.exit_code == 2 and "no dataset.json" in result.output


MALFORMED = [
    (HQ_ATTRIBUTES, 2, "Male Smiling", ":2: expected the 40 CelebA attribute names"),  # wrong header
    (
        HQ_ATTRIBUTES,
        5,
        "2.jpg" + " 1" * 11,
        ":5: expected 41 fields (name + 40 attributes), got 12",
    ),  # short row
    (HQ_ATTRIBUTES, 1, "30000", ":1: declares 30000 images but holds 40 rows"),  # count mismatch
    (HQ_ATTRIBUTES, 42, None, ":1: declares 40 images but holds 39 rows"),  # truncated file
    (HQ_ATTRIBUTES, 6, "3.jpg" + " 2" * 40, ":6: attribute values must be 1 or -1"),
    (HQ_ATTRIBUTES, 6, "3.png" + " 1" * 40, ":6: expected an image name like 17.jpg"),
    (HQ_MAPPING, 1, "idx orig_file", ":1: expected the header"),  # wrong header
    (HQ_MAPPING, 4, "2 17", ":4: expected 3 fields"),  # short row
    (HQ_MAPPING, 41, None, "CelebAMask-HQ-attribute-anno.txt:42: 39.jpg has no row"),  # row missing
]


@pytest.mark.parametrize(("relpath", "lineno", "new_line", "expected"), MALFORMED)
def test_malformed_annotations_fail_in_one_line_and_overwrite_nothing(
    release_copy, hq_dataset, run_cli, snapshot, error_line, relpath, lineno, new_line, expected
):
    hq_root, _ = release_copy
    dst = hq_dataset
    before = snapshot(dst)
    rewrite_line(hq_root / relpath, lineno, new_line)
    message = error_line(run_cli("prepare-celeba-hq", hq_root, dst, "--overwrite"))
    assert str(hq_root) in message
    assert expected in message
    assert snapshot(dst) == before


def test_missing_image_is_named_before_anything_is_written(release_copy, tmp_path, run_cli, error_line):
    hq_root, _ = release_copy
    (hq_root / HQ_IMAGES / "7.jpg").unlink()
    line = error_line(run_cli("prepare-celeba-hq", hq_root, tmp_path / "dataset"))
    assert f"{hq_root / HQ_IMAGES / '7.jpg'}: image not found" in line
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_fails_without_a_half_example(release_copy, tmp_path, run_cli, error_line, damage):
    hq_root, _ = release_copy
    path = hq_root / HQ_IMAGES / "7.jpg"
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 100 if damage == "garbage" else data[: len(data) // 2])
    dst = tmp_path / "dataset"
    assert f"{path}: cannot decode image" in error_line(run_cli("prepare-celeba-hq", hq_root, dst))
    assert not list(dst.glob("*/hq-00007"))  # no half-written example folder
    assert not list(dst.rglob(".tmp-*"))

    path.write_bytes(data)  # after fixing the file, a re-run completes the dataset
    assert run_cli("prepare-celeba-hq", hq_root, dst).exit_code == 0
    assert len(list(dst.glob(f"*/*/{EXAMPLE_RECORD}"))) == 40
    assert set(SPLITS) == {p.name for p in dst.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _splits_of(dst: Path) -> dict[str, list[str]]:
    """Example id -> the split folders holding a folder of that id (finished or not)."""
    found: dict[str, list[str]] = {}
    for split in SPLITS:
        for child in sorted((dst / split).iterdir()) if (dst / split).is_dir() else []:
            found.setdefault(child.name, []).append(split)
    return found


@pytest.mark.parametrize("kill_after", [0, 7, 25])
def test_overwrite_with_a_new_split_killed_then_rerun_never_mixes_splits(
    releases, tmp_path, monkeypatch, kill_after
):
    hq, _ = releases
    dst = tmp_path / "dataset"
    prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst))
    (sorted(dst.glob("train/hq-*"))[0] / "prompt_blip2.txt").write_text("a caption")
    real_write = prepare_hq.write_example_record
    calls = {"n": 0}

    def write_then_die(folder, record):
        if calls["n"] == kill_after:
            raise KeyboardInterrupt  # killed part-way through the --overwrite run
        calls["n"] += 1
        real_write(folder, record)

    monkeypatch.setattr(prepare_hq, "write_example_record", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst, random_seed=7, overwrite=True))
    # Even right after the kill, no id is in two split folders.
    assert all(len(s) == 1 for s in _splits_of(dst).values()), _splits_of(dst)

    monkeypatch.setattr(prepare_hq, "write_example_record", real_write)
    prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=dst, random_seed=7))  # without --overwrite
    fresh = tmp_path / "fresh"
    prepare_celeba_hq(PrepareCelebAHQConfig(src=hq.root, dst=fresh, random_seed=7))
    assert _splits_of(dst) == _splits_of(fresh)  # one folder per image, each where seed 7 puts it
    assert {k: r["split"] for k, r in records(dst).items()} == {
        k: r["split"] for k, r in records(fresh).items()
    }
    assert len(list(dst.glob("*/*/prompt_blip2.txt"))) == 1  # the caption moved with its example


def test_corrupt_image_stops_the_run_before_anything_is_written(
    release_copy, hq_dataset, run_cli, snapshot, error_line
):
    hq_root, _ = release_copy
    last = sorted((hq_root / HQ_IMAGES).iterdir(), key=lambda p: int(p.stem))[-1]
    last.write_bytes(last.read_bytes()[:200])  # the last image the write loop would reach
    fresh = hq_root.parent / "fresh"
    line = error_line(run_cli("prepare-celeba-hq", hq_root, fresh))
    assert str(last) in line and "cannot decode image" in line
    assert not fresh.exists()  # not even dataset.json
    before = snapshot(hq_dataset)
    error_line(run_cli("prepare-celeba-hq", hq_root, hq_dataset, "--overwrite", "--random-seed", 3))
    assert snapshot(hq_dataset) == before


def test_16_bit_png_named_jpg_is_converted_not_clipped_to_white(release_copy, tmp_path, run_cli):
    import numpy as np
    from PIL import Image

    hq_root, _ = release_copy
    path = hq_root / HQ_IMAGES / "3.jpg"
    gray16 = np.full((64, 64), 128 * 256, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(gray16).save(path, format="PNG")
    dst = tmp_path / "dataset"
    assert run_cli("prepare-celeba-hq", hq_root, dst).exit_code == 0
    (stored,) = dst.glob(f"*/hq-00003/{IMAGE}")
    with Image.open(stored) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float64)
    assert abs(pixels.mean() - 128) < 3  # not 255 (Pillow's convert("RGB") clips 16-bit values)


def test_empty_release_is_refused(release_copy, tmp_path, run_cli, error_line):
    hq_root, _ = release_copy
    path = hq_root / HQ_ATTRIBUTES
    header = path.read_text().splitlines()[1]
    path.write_text(f"0\n{header}\n")
    line = error_line(run_cli("prepare-celeba-hq", hq_root, tmp_path / "dataset"))
    assert f"{path}: lists no images" in line
    assert not (tmp_path / "dataset").exists()


def test_attribute_table_is_printed_once(releases, tmp_path):
    from click.testing import CliRunner

    from sd3_lora_celeba.cli import cli

    hq, _ = releases
    result = CliRunner().invoke(cli, ["prepare-celeba-hq", str(hq.root), str(tmp_path / "d")])  # not --quiet
    assert result.exit_code == 0, result.output
    assert result.output.count("Arched_Eyebrows") == 1, result.output


@pytest.mark.parametrize("seed", ["-1", str(2**32), "nan"])
def test_random_seed_is_range_checked(releases, tmp_path, run_cli, seed):
    hq, _ = releases
    result = run_cli("prepare-celeba-hq", hq.root, tmp_path / "d", "--random-seed", seed)
    assert result.exit_code == 2 and "--random-seed" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d").exists()
