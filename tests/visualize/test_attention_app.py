"""The app's engine and callbacks on the tiny SD3, without a browser: generation, errors, figures, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.visualize.app import (
    VisualizeConfig,
    generate_callback,
    ncut_callback,
    patch_callback,
    token_callback,
)
from sd3_lora_celeba.visualize.explorer import parse_indices
from sd3_lora_celeba.visualize.figures import locate_patch, lora_norm_plot, side_by_side

PROMPT = "a photo of a smiling woman with blond hair"
MAX_SEQ = 32  # T5 positions of the shared explorer (conftest)


@pytest.fixture(scope="module")
def generation(explorer):
    generation, row, choices, order, message = generate_callback(explorer, PROMPT, 7, 2, 4.0, "", "")
    assert generation is not None, message
    return generation


def test_bad_lora_folders_are_reported_and_skipped(explorer, lora_dirs, bad_lora_dir):
    assert explorer.model_names == ["base", "checkpoint-000010", "checkpoint-000020"]
    assert len(explorer.errors) == 2
    assert str(bad_lora_dir) in explorer.errors[0] and "does not fit" in explorer.errors[0]
    assert "checkpoint-none" in explorer.errors[1] and "not found" in explorer.errors[1]
    assert sorted(explorer.norms["checkpoint-000010"]) == [2, 3, 4]
    assert explorer.pipe.get_list_adapters()["transformer"] == ["lora_0", "lora_1"]


def test_generation_same_seed_base_matches_plain_pipeline(explorer, generation, tiny_pipe):
    assert generation.names == ["base", "checkpoint-000010", "checkpoint-000020"]
    assert len(generation.images) == 3 and len(generation.maps) == 3
    base, lora_a, lora_b = (np.asarray(im, dtype=np.int16) for im in generation.images)
    # The base image is what the untouched pipeline gives for this prompt and seed.
    plain = tiny_pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=4.0,
        max_sequence_length=MAX_SEQ,
        generator=torch.Generator().manual_seed(7),
    ).images[0]
    np.testing.assert_array_equal(base, np.asarray(plain, dtype=np.int16))
    # The LoRAs change the image, and the pipeline is back to the base model afterwards.
    assert np.abs(base - lora_a).max() > 0 and np.abs(base - lora_b).max() > 0
    assert not torch.equal(generation.maps[0].image_to_text, generation.maps[1].image_to_text)
    again = explorer.generate(PROMPT, 7, 2, 4.0)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(generation.images[0]))
    np.testing.assert_array_equal(np.asarray(again.images[2]), np.asarray(generation.images[2]))


def test_tokens_are_labelled_with_their_columns(generation):
    clip = [t for t in generation.tokens if t.encoder == "CLIP"]
    t5 = [t for t in generation.tokens if t.encoder == "T5"]
    assert [t.column for t in clip] == list(range(len(clip)))
    assert clip[0].text == "<|startoftext|>" and clip[-1].text == "<|endoftext|>"
    assert "smiling" in [t.text for t in clip] and any("smil" in t.text for t in t5)
    assert t5[0].column == 77 and t5[-1].text == "</s>"


@pytest.mark.parametrize(
    ("prompt", "blocks", "steps", "expected"),
    [
        ("", "", "", "the prompt is empty"),
        ("   ", "", "", "the prompt is empty"),
        (" ".join(["smiling"] * 80), "", "", "82 CLIP tokens long; the limit is 77"),
        (PROMPT, "30", "", "blocks: [30] out of range; choose indices in 0..23"),
        (PROMPT, "x-y", "", "blocks: cannot read"),
        (PROMPT, "", "5", "capture steps: [5] out of range"),
    ],
)
def test_bad_inputs_give_a_message(explorer, prompt, blocks, steps, expected):
    generation, row, choices, order, message = generate_callback(explorer, prompt, 0, 2, 4.0, blocks, steps)
    assert generation is None and row is None
    assert message.startswith("**Error:**") and expected in message


def test_too_long_for_t5_is_refused(explorer):
    # Fits CLIP (77) but not the 32 T5 positions of this explorer.
    generation, *_, message = generate_callback(explorer, " ".join(["smiling"] * 40), 0, 2, 4.0, "", "")
    assert generation is None and "T5 tokens long; the limit is 32" in message


def test_figure_callbacks(generation):
    token = next(t for t in generation.tokens if t.text == "smiling" and t.encoder == "CLIP")
    figure, message = token_callback(generation, token.column)
    assert isinstance(figure, Image.Image) and figure.width > 3 * 100 and "smiling" in message
    assert token_callback(generation, 60)[1].startswith("**Error:**")  # padding column: not a token
    assert token_callback(None, 1)[1] == "**Error:** generate images first"

    row = side_by_side(generation.images)
    w = row.width // 3  # 64 px images shown 4x enlarged
    assert row.size == (3 * 256, 256) and w == 256
    assert locate_patch(generation, w + 1, 0) == (1, 0, 0)
    assert locate_patch(generation, 3 * w - 1, w - 1) == (2, 3, 3)
    assert locate_patch(generation, 2 * w + 70, 130) == (2, 2, 1)
    figure, message = patch_callback(generation, w + 1, w - 1)
    assert isinstance(figure, Image.Image) and "row 3, column 0" in message and "checkpoint-000010" in message

    figure, message = ncut_callback(generation, 10, "tsne")
    assert isinstance(figure, Image.Image) and "10 eigenvectors" in message
    figure, message = ncut_callback(generation, 60, "tsne")  # 3 images x 16 tokens = 48 tokens
    assert figure is None and "n_eig must be between 1 and 47" in message


def test_lora_norm_plot_and_index_parsing(explorer):
    assert lora_norm_plot(explorer.norms, explorer.num_blocks).width > 300
    assert parse_indices("0-2, 5", 24, "blocks") == (0, 1, 2, 5)
    assert parse_indices(" all ", 24, "blocks") is None


def test_cli_help_and_validation():
    runner = CliRunner()
    result = runner.invoke(cli, ["visualize-attention-weights", "--help"])
    assert result.exit_code == 0 and "--lora-weight-dir" in result.output and "--share" in result.output
    result = runner.invoke(cli, ["visualize-attention-weights", "--port", "0"])
    assert result.exit_code == 2 and "--port 0" in result.output
    config = VisualizeConfig()
    assert (config.host, config.port, config.share) == ("127.0.0.1", 7860, False)
