"""Tiny worlds per model family: the SD3.5 specs detect as their family; a world of another family is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.models.families import detect_family
from sd3_lora_celeba.testing.tiny_sd3 import TINY_SPECS, TinySD3Spec, tiny_spec
from sd3_lora_celeba.testing.world import WORLD_INFO, build_tiny_world


@pytest.mark.parametrize("family", sorted(TINY_SPECS))
def test_tiny_specs_are_shaped_like_their_family(family):
    spec = tiny_spec(family)
    config = {
        "num_layers": spec.num_layers,
        "dual_attention_layers": list(spec.dual_attention_layers),
        "qk_norm": spec.qk_norm,
    }
    assert detect_family(config) == family


def test_sd3_spec_is_unchanged():
    """The SD3 tiny world (and so the golden losses) keeps its shape: no attn2, no q/k norm, 24 blocks."""
    assert TINY_SPECS["sd3-medium"] == TinySD3Spec()
    assert (TinySD3Spec().num_layers, TinySD3Spec().dual_attention_layers, TinySD3Spec().qk_norm) == (
        24,
        (),
        None,
    )
    with pytest.raises(ValueError, match="unknown model family 'sd4'"):
        tiny_spec("sd4")


def _fake_world(root, family):
    root.mkdir(parents=True)
    (root / WORLD_INFO).write_text(json.dumps({"root": str(root), "model_family": family}))


def test_world_of_another_family_is_refused(tmp_path):
    _fake_world(tmp_path / "w", "sd3-medium")
    assert build_tiny_world(tmp_path / "w").model_family == "sd3-medium"
    with pytest.raises(ValueError, match="built for model family sd3-medium, not sd3.5-medium"):
        build_tiny_world(tmp_path / "w", model_family="sd3.5-medium")


def test_demo_model_family_option(tmp_path):
    _fake_world(tmp_path / "out" / "world", "sd3.5-medium")
    result = CliRunner().invoke(cli, ["demo", str(tmp_path / "out"), "--model-family", "sd3.5-large"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "not sd3.5-large" in result.output
    bad = CliRunner().invoke(cli, ["demo", str(tmp_path / "out"), "--model-family", "sd4"])
    assert bad.exit_code == 2 and "sd3.5-medium" in bad.output
