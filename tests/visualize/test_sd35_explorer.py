"""The explorer on an SD3.5-medium-like tiny world: attn2 of the dual blocks is its own NCUT source in the app."""

from __future__ import annotations

import pytest
from PIL import Image

from sd3_lora_celeba.visualize.app import (
    VisualizeConfig,
    build_app,
    generate_callback,
    load_explorer,
    ncut_callback,
)


@pytest.fixture(scope="module")
def sd35_explorer(tiny_sd3_family):
    path = tiny_sd3_family("sd3.5-medium")
    return load_explorer(VisualizeConfig(model_name=str(path), device="cpu", max_sequence_length=32))


def test_attn2_of_dual_blocks_is_a_source_in_the_app(sd35_explorer):
    assert sd35_explorer.dual_blocks == tuple(range(13))
    session, message = generate_callback(sd35_explorer, "a smiling woman", 0, 1, 4.0, "2,20", "")
    assert session is not None, message
    captured = session.generation.prompts[0].captured[0]
    assert captured.feature_sources() == [
        "output",
        "query",
        "key",
        "value",
        "attn2 output",
        "attn2 query",
        "attn2 key",
        "attn2 value",
    ]
    assert ("attn2 key", 2) in captured.features and (
        "attn2 key",
        20,
    ) not in captured.features  # 20 is not dual
    figure, message = ncut_callback(session, 5, "spectral", "attn2 output", False)
    assert isinstance(figure, Image.Image) and "NCUT of attn2 output" in message
    app = build_app(VisualizeConfig(port=7999), explorer=sd35_explorer)
    dropdown = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "ncut-source")
    assert ("attn2 value", "attn2 value") in dropdown.choices
