"""Crop geometry against the face box, and the rejection rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sd3_lora_celeba.data.crop import crop_face, image_size, is_large_enough, square_crop_box
from sd3_lora_celeba.errors import InputError


def test_crop_is_centred_on_the_box_when_it_fits():
    # 1000x800 image, box centre (500, 400): the 800 square fits centred.
    assert square_crop_box(1000, 800, (450, 350, 100, 100)) == (100, 0, 900, 800)
    # Portrait image: side = width, centred vertically on the box centre (y = 600).
    left, top, right, bottom = square_crop_box(600, 1200, (250, 550, 100, 100))
    assert (left, right) == (0, 600)
    assert (top + bottom) / 2 == 600
    assert bottom - top == 600


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ((0, 10, 50, 50), (0, 0, 800, 800)),  # face at the left border: clamped to x = 0
        ((950, 10, 50, 50), (200, 0, 1000, 800)),  # face at the right border: clamped to x = W - side
        ((-30, 0, 60, 40), (0, 0, 800, 800)),  # box sticking out of the image: still inside
    ],
)
def test_crop_is_clamped_inside_the_image(bbox, expected):
    assert square_crop_box(1000, 800, bbox) == expected


def test_crop_invariants_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(500):
        width, height = (int(v) for v in rng.integers(10, 400, size=2))
        w, h = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        left, top, right, bottom = square_crop_box(width, height, (x, y, w, h))
        side = min(width, height)
        assert right - left == side and bottom - top == side
        assert 0 <= left and right <= width and 0 <= top and bottom <= height
        cx, cy = x + w / 2, y + h / 2
        if side / 2 <= cx <= width - side / 2:  # not clamped horizontally: centre kept to the nearest pixel
            assert abs((left + right) / 2 - cx) <= 0.5
        if side / 2 <= cy <= height - side / 2:
            assert abs((top + bottom) / 2 - cy) <= 0.5


def test_rejection_rule_uses_the_short_side():
    assert is_large_enough(768, 768, 768)
    assert is_large_enough(2000, 768, 768)
    assert not is_large_enough(2000, 767, 768)
    assert not is_large_enough(767, 5000, 768)


def test_crop_face_cuts_the_pixels_of_the_box(tmp_path):
    # Left half black, right half white; a box on the white side near the right border.
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, 150:] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    data, box = crop_face(path, (260, 40, 30, 20))
    assert box == (200, 0, 300, 100)
    crop = np.asarray(Image.open(io.BytesIO(data)))
    assert crop.shape == (100, 100, 3)
    assert crop.mean() > 250  # all from the white side


def test_image_size_reads_the_header_and_names_bad_files(tmp_path):
    good = tmp_path / "a.jpg"
    Image.new("RGB", (123, 45)).save(good)
    assert image_size(good) == (123, 45)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"b\.jpg: cannot read image"):
        image_size(bad)
