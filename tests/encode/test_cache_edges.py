"""The caching stages at their edges: odd caption names and bytes, damaged caches, 16-bit images, memory defaults,
the model's own T5 limit, and no tokenizer warning in a normal run."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd3_lora_celeba import layout
from sd3_lora_celeba.encode import latents as latents_mod
from sd3_lora_celeba.encode import prompts as prompts_mod
from sd3_lora_celeba.errors import InputError


def keys_of(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_caption_variant_with_a_dot_survives_re_embedding_another(tiny_sd3, make_dataset, run_cli):
    root = make_dataset({"train": 1})
    example = root / "train" / "ex-000"
    (example / layout.prompt_file("v1.2")).write_text("a third caption, versioned")
    assert run_cli("compute-prompt-embeds", "1", root, "--model-name", tiny_sd3).exit_code == 0
    cache = example / layout.prompt_embeds_file(1)
    assert {"v1.2.prompt_embeds", "v1.2.pooled_prompt_embeds"} <= keys_of(cache)

    (example / layout.prompt_file("blip2")).write_text("an edited BLIP-2 caption")  # re-embeds blip2 only
    result = run_cli("compute-prompt-embeds", "1", root, "--model-name", tiny_sd3)
    assert result.exit_code == 0, result.output
    assert {"v1.2.prompt_embeds", "v1.2.pooled_prompt_embeds", "blip2.prompt_embeds"} <= keys_of(cache)
    with safe_open(str(cache), framework="pt") as f:
        hashes = json.loads(f.metadata()["text_sha256"])
    assert set(hashes) == {"blip2", "llama3", "v1.2"}
    # Done means done: the next run has nothing to embed.
    config = prompts_mod.ComputePromptEmbedsConfig(encoder="1", dataset=root, model_name=str(tiny_sd3))
    assert prompts_mod.compute_prompt_embeds(config)["embedded"] == 0


def test_caption_that_is_not_utf8_is_one_line_naming_it(tiny_sd3, make_dataset, run_cli, error_line):
    root = make_dataset({"train": 2})
    bad = root / "train" / "ex-001" / layout.prompt_file("llama3")
    bad.write_bytes(b"a caption in latin-1: caf\xe9")
    line = error_line(run_cli("compute-prompt-embeds", "2", root, "--model-name", tiny_sd3))
    assert f"{bad}: not UTF-8 text (byte 25)" in line and "caption-llama3" in line
    assert not list(root.rglob(layout.prompt_embeds_file(2)))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_caches_are_named_and_recomputed(tiny_sd3, make_dataset, run_cli, damage):
    root = make_dataset({"train": 2})
    for args in (["compute-latent-dist", root], ["compute-prompt-embeds", "3", root]):
        assert run_cli(*args, "--model-name", tiny_sd3).exit_code == 0
    example = root / "train" / "ex-000"
    for name in (layout.LATENT_DIST, layout.prompt_embeds_file(3)):
        path = example / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    pattern = r"prompt_embeds_3.safetensors: unreadable cache file.*run sd3 compute-prompt-embeds 3 .*train"
    with pytest.raises(InputError, match=pattern):
        latents_mod.read_metadata(example / layout.prompt_embeds_file(3))
    with pytest.raises(InputError, match=r"latent_dist.safetensors: unreadable.*compute-latent-dist"):
        latents_mod.read_metadata(example / layout.LATENT_DIST)
    other = root / "train" / "ex-001" / layout.LATENT_DIST
    other_mtime = other.stat().st_mtime_ns
    for args in (["compute-latent-dist", root], ["compute-prompt-embeds", "3", root]):
        result = run_cli(*args, "--model-name", tiny_sd3)
        assert result.exit_code == 0, result.output
    assert {"mean", "logvar", "flip_mean", "flip_logvar"} == keys_of(example / layout.LATENT_DIST)
    assert "blip2.prompt_embeds" in keys_of(example / layout.prompt_embeds_file(3))
    assert other.stat().st_mtime_ns == other_mtime  # the sound cache was left alone


def test_16_bit_image_is_scaled_not_clipped_to_white():
    gray16 = Image.fromarray(np.full((16, 16), 64 * 256, dtype=np.uint16))  # a quarter of full scale
    assert gray16.mode == "I;16"
    pixels = latents_mod.preprocess_image(gray16, 16)  # (3, 16, 16) in [-1, 1]
    assert pixels.shape == (3, 16, 16)
    torch.testing.assert_close(pixels.mean(), torch.tensor(64 / 127.5 - 1), atol=1e-3, rtol=0)


def test_default_batch_size_fits_24_gb_at_1024_px_and_is_documented(run_cli):
    assert latents_mod.default_batch_size(1024, "cuda") == 1
    assert latents_mod.default_batch_size(512, "cuda") == 4
    assert latents_mod.default_batch_size(64, "cuda") == 32
    assert latents_mod.default_batch_size(1024, "cpu") == 1
    assert latents_mod.default_batch_size(256, "cpu") == 1
    assert latents_mod.default_batch_size(64, "cpu") == 8
    help_text = " ".join(run_cli("compute-latent-dist", "--help").output.split())
    assert "24 GB GPU" in help_text and "CPU" in help_text
    assert latents_mod.ComputeLatentDistConfig(dataset=".").batch_size is None  # not a fixed 8


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batch-size", 0), ("--batch-size", 10**6), ("--image-size", 12), ("--image-size", 8192)],
)
def test_latent_flags_are_range_checked(run_cli, make_dataset, error_line, flag, value):
    root = make_dataset({"train": 1})
    line = error_line(run_cli("compute-latent-dist", root, flag, value))
    assert flag in line
    assert not list(root.rglob(layout.LATENT_DIST))


def test_t5_length_is_bounded_by_the_models_tokenizer(tiny_sd3, make_dataset, run_cli, error_line, tmp_path):
    model = tmp_path / "short-t5"
    shutil.copytree(tiny_sd3, model)
    config_path = model / "tokenizer_3" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 48
    config_path.write_text(json.dumps(config))
    root = make_dataset({"train": 1})
    line = error_line(
        run_cli("compute-prompt-embeds", "3", root, "--model-name", model, "--max-sequence-length", 64)
    )
    assert "--max-sequence-length 64" in line and "at most 48" in line
    assert not list(root.rglob(layout.prompt_embeds_file(3)))
    result = run_cli("compute-prompt-embeds", "3", root, "--model-name", model, "--max-sequence-length", 48)
    assert result.exit_code == 0, result.output


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_3"])
def test_long_caption_gives_no_tokenizer_length_warning(tiny_sd3, subfolder):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    long_text = " ".join(["word"] * 600)
    records = _Records()
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(records)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # as in --verbose; a quiet run may have lowered it
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_sd3, subfolder=subfolder)
        assert prompts_mod.count_truncated(tokenizer, [long_text, "short"], 77) == 1
        assert not [m for m in records.messages if "Token indices sequence length" in m]
        tokenizer(long_text)  # the plain call the stage used to make: it does warn, so this test can fail
        assert [m for m in records.messages if "Token indices sequence length" in m]
    finally:
        logger.removeHandler(records)
        hf_logging.set_verbosity(verbosity)
