"""The release readers on the synthetic releases, and their one-line errors on malformed files."""

from __future__ import annotations

import numpy as np
import pytest

from sd3_lora_celeba.data.celeba_files import (
    read_attribute_file,
    read_bbox_file,
    read_hq_mapping,
    read_identity_file,
)
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.layout import (
    ATTRIBUTES,
    CELEBA_ATTRIBUTES,
    CELEBA_BBOX,
    CELEBA_IDENTITY,
    HQ_ATTRIBUTES,
    HQ_MAPPING,
)
from sd3_lora_celeba.testing.celeba_synth import rewrite_line


def test_readers_round_trip_the_synthetic_releases(releases):
    hq, celeba = releases
    table = read_attribute_file(hq.root / HQ_ATTRIBUTES)
    assert table.files == tuple(f"{i}.jpg" for i in hq.indices)
    assert np.array_equal(table.values, hq.attributes)
    assert list(table.row(0)) == list(ATTRIBUTES)
    assert read_hq_mapping(hq.root / HQ_MAPPING) == dict(zip(hq.indices, hq.orig_files, strict=True))
    assert read_bbox_file(celeba.root / CELEBA_BBOX) == celeba.bboxes
    assert read_identity_file(celeba.root / CELEBA_IDENTITY) == celeba.identities
    attrs = read_attribute_file(celeba.root / CELEBA_ATTRIBUTES)
    assert list(attrs.files) == celeba.files
    assert all(np.array_equal(attrs.values[i], celeba.attributes[f]) for i, f in enumerate(attrs.files))


@pytest.mark.parametrize(
    ("relpath", "lineno", "new_line", "reader", "expected"),
    [
        (HQ_ATTRIBUTES, 1, "41", read_attribute_file, r":1: declares 41 images but holds 40 rows"),
        (HQ_ATTRIBUTES, 1, "forty", read_attribute_file, r":1: expected the number of images"),
        (
            HQ_ATTRIBUTES,
            2,
            "Male Smiling",
            read_attribute_file,
            r":2: expected the 40 CelebA attribute names",
        ),
        (HQ_ATTRIBUTES, 5, "2.jpg " + " 1" * 11, read_attribute_file, r":5: expected 41 fields .* got 12"),
        (
            HQ_ATTRIBUTES,
            4,
            "1.jpg " + " 0" * 40,
            read_attribute_file,
            r":4: attribute values must be 1 or -1",
        ),
        (HQ_ATTRIBUTES, 42, None, read_attribute_file, r":1: declares 40 images but holds 39 rows"),
        (HQ_MAPPING, 1, "index orig", read_hq_mapping, r":1: expected the header 'idx orig_idx orig_file'"),
        (HQ_MAPPING, 3, "1  125", read_hq_mapping, r":3: expected 3 fields"),
        (HQ_MAPPING, 3, "x  125  000126.jpg", read_hq_mapping, r":3: idx must be an integer"),
    ],
)
def test_malformed_hq_files_name_file_and_line(release_copy, relpath, lineno, new_line, reader, expected):
    hq_root, _ = release_copy
    rewrite_line(hq_root / relpath, lineno, new_line)
    with pytest.raises(InputError, match=expected) as info:
        reader(hq_root / relpath)
    assert str(hq_root / relpath) in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("relpath", "lineno", "new_line", "reader", "expected"),
    [
        (CELEBA_BBOX, 2, "image_id x y w h", read_bbox_file, r":2: expected the header"),
        (CELEBA_BBOX, 3, "000001.jpg 1 2 3", read_bbox_file, r":3: expected 5 fields"),
        (CELEBA_BBOX, 4, "000002.jpg 1 2 3 zero", read_bbox_file, r":4: a box coordinate must be an integer"),
        (CELEBA_BBOX, 4, "000002.jpg 1 2 0 5", read_bbox_file, r":4: box width and height must be positive"),
        (CELEBA_BBOX, 1, "99", read_bbox_file, r":1: declares 99 images but holds 100 rows"),
        (CELEBA_IDENTITY, 7, "000007.jpg", read_identity_file, r":7: expected 2 fields"),
        (CELEBA_ATTRIBUTES, 3, "000001.jpg 1 -1", read_attribute_file, r":3: expected 41 fields .* got 3"),
    ],
)
def test_malformed_celeba_files_name_file_and_line(release_copy, relpath, lineno, new_line, reader, expected):
    _, celeba_root = release_copy
    rewrite_line(celeba_root / relpath, lineno, new_line)
    with pytest.raises(InputError, match=expected):
        reader(celeba_root / relpath)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(InputError, match=r"list_attr_celeba\.txt: file not found"):
        read_attribute_file(tmp_path / "list_attr_celeba.txt")
