"""generate-images reproduces its golden pixel slice (see golden_pixels.py for what it pins and how to regenerate)."""

from __future__ import annotations

import json

import numpy as np
from golden_pixels import ARGS, GOLDEN, golden_world, pixel_slices


def test_generate_images_matches_the_golden_pixel_slice(world, tmp_path, run_cli):
    split = golden_world(world, tmp_path)
    out = tmp_path / "out"
    result = run_cli("generate-images", split, out, *ARGS, env=world.env)
    assert result.exit_code == 0, result.output
    got, expected = pixel_slices(out), json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(expected) and len(got) == 3
    for name in expected:  # one grey level: the tolerance of batching / BLAS rounding
        assert np.abs(np.array(got[name]) - np.array(expected[name])).max() <= 1, name
