"""The app's engine and callbacks on the tiny SD3, without a browser: capture once, explore after, errors, export."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sd3_lora_celeba.cli import cli
from sd3_lora_celeba.testing.tokenizers import EXAMPLE_CAPTION
from sd3_lora_celeba.visualize import app as app_module
from sd3_lora_celeba.visualize.app import (
    VisualizeConfig,
    export_callback,
    generate_callback,
    ncut_callback,
    patch_callback,
    render,
    show_callback,
    word_callback,
)
from sd3_lora_celeba.visualize.explorer import default_capture, entropy, parse_indices, words_of
from sd3_lora_celeba.visualize.figures import DISPLAY_MIN_SIDE, locate_patch, lora_norm_plot

PROMPT = "a photo of a smiling woman with blond hair"


@pytest.fixture(scope="module")
def session(explorer):
    """One capture of the real-length caption and a second prompt, all blocks at steps 0 and 1."""
    session, message = generate_callback(explorer, EXAMPLE_CAPTION + "\n" + PROMPT, 7, 2, 4.0, "all", "0-1")
    assert session is not None, message
    return session


def test_bad_and_corrupt_lora_folders_are_reported_and_skipped(explorer, bad_lora_dir, corrupt_lora_dir):
    assert explorer.model_names == ["base", "checkpoint-000010", "checkpoint-000020"]
    assert len(explorer.errors) == 3
    # The first mismatching key and both shapes are named.
    assert str(bad_lora_dir) in explorer.errors[0] and "does not fit this model" in explorer.errors[0]
    assert "lora_A.weight has shape [2, 35], the model needs [2, 32]" in explorer.errors[0]
    assert str(corrupt_lora_dir) in explorer.errors[1] and "corrupt or truncated" in explorer.errors[1]
    assert "checkpoint-none" in explorer.errors[2] and "not found" in explorer.errors[2]
    assert sorted(explorer.norms["checkpoint-000010"]) == [2, 3, 4]
    assert explorer.pipe.get_list_adapters()["transformer"] == ["lora_0", "lora_1"]


def test_generation_same_seed_base_matches_plain_pipeline(explorer, session, tiny_pipe):
    g = session.generation
    assert g.names == ["base", "checkpoint-000010", "checkpoint-000020"]
    assert len(g.prompts) == 2 and all(len(p.images) == 3 for p in g.prompts)
    call = dict(num_inference_steps=2, guidance_scale=4.0, max_sequence_length=64)
    base, lora = (np.asarray(g.prompts[1].images[i], dtype=np.int16) for i in (0, 1))
    # The app's own pipeline called without capture (its linears on oneDNN): capture changes nothing.
    uncaptured = explorer.pipe(PROMPT, generator=torch.Generator().manual_seed(7), **call).images[0]
    np.testing.assert_array_equal(base, np.asarray(uncaptured, dtype=np.int16))
    assert any(type(m).__name__ == "OneDnnLinear" for m in explorer.pipe.transformer.modules())
    # Stock diffusers (the BLAS's products, rounded differently from oneDNN's): within one grey level.
    plain = tiny_pipe(PROMPT, generator=torch.Generator().manual_seed(7), **call).images[0]
    assert np.abs(base - np.asarray(plain, dtype=np.int16)).max() <= 1
    assert np.abs(base - lora).max() > 0
    assert g.blocks == tuple(range(24)) and g.steps == (0, 1)


def test_words_merge_sub_tokens(session):
    words = session.generation.prompts[0].words
    clip = [w for w in words if w.encoder == "CLIP"]
    t5 = [w for w in words if w.encoder == "T5"]
    # 35 words and their punctuation in each row; CLIP keeps words whole, T5 merges split ones.
    assert [w.text for w in clip][:4] == ["the", "image", "shows", "a"]
    assert len(clip) == len(t5) == 35 + 6
    eyebrows = next(w for w in t5 if w.text == "eyebrows")
    assert len(eyebrows.columns) == 2 and eyebrows.columns[0] >= 77
    assert [w.text for w in t5][:3] == ["The", "image", "shows"]
    assert words_of(["<|startoftext|>", "a</w>", "sm", "iling</w>", "<|endoftext|>"], "CLIP", 0)[
        1
    ].columns == (2, 3)


def test_explore_words_patches_blocks_and_steps_without_regenerating(session, explorer, monkeypatch):
    monkeypatch.setattr(explorer, "generate", lambda *a, **k: pytest.fail("regenerated"))
    g = session.generation
    words = g.prompts[0].words
    smiling = next(i for i, w in enumerate(words) if w.text == "smiling" and w.encoder == "CLIP")
    woman = next(i for i, w in enumerate(words) if w.text == "woman" and w.encoder == "T5")
    assert "Heatmap of 'smiling' (CLIP)" in _text(word_callback(session, f"{smiling}:1", False))
    view, scale, rows, diff, table = render(session)
    side = DISPLAY_MIN_SIDE  # 64 px images enlarged 8x, so the page can scale them to its width
    assert isinstance(view, Image.Image) and view.size == (3 * side + 2 * 4, side)
    assert f'data-word="{smiling}"' in rows and "selected" in rows and rows.count("word-row") == 2
    assert isinstance(diff, Image.Image) and table.count("| checkpoint-") == 2
    single = g.word_maps(0, [smiling])
    # Shift-click adds a word: the map of both is the sum of their maps.
    word_callback(session, f"+{woman}:2", False)
    assert session.words == [smiling, woman]
    np.testing.assert_allclose(g.word_maps(0, session.words), single + g.word_maps(0, [woman]), rtol=1e-5)

    # Other blocks/steps/direction: means over the stored maps.
    assert "Showing blocks 3-4, steps 1" in _text(show_callback(session, "3-4", "1", "text -> image", 0))
    late = g.word_maps(0, [smiling], "text_to_image", blocks=(3, 4), steps=(1,))
    view_late = render(session)[0]
    assert not np.array_equal(np.asarray(view_late), np.asarray(view))
    assert not np.allclose(late, g.word_maps(0, [smiling], "text_to_image", blocks=(10,), steps=(0,)))
    assert "Error" in show_callback(session, "0-10000000", "", "image -> text", 0)  # bounded before any range

    # A click on a patch marks it and tints the words by the attention it pays.
    assert locate_patch(g, side + 4 + 1, 0) == (1, 0, 0)
    assert locate_patch(g, 3 * side + 8 - 1, side - 1) == (2, 3, 3)
    message = _text(patch_callback(session, side + 4 + side // 4 + 3, side - 1))
    assert "row 3, column 1" in message and "checkpoint-000010" in message
    rows_patch = render(session)[2]
    assert rows_patch != rows
    show_callback(session, "", "", "image -> text", 0)


def test_entropy_and_parse_indices():
    assert entropy(np.ones((4, 4))) == pytest.approx(1.0)
    one = np.zeros((4, 4))
    one[1, 2] = 1
    assert entropy(one) == 0.0
    assert parse_indices("0-2, 5", 24, "blocks") == (0, 1, 2, 5)
    assert parse_indices(" all ", 24, "blocks") is None
    with pytest.raises(ValueError, match="0-10000000 out of range; choose indices in 0..23"):
        parse_indices("0-10000000", 24, "blocks")
    with pytest.raises(ValueError, match="3-1 out of range"):
        parse_indices("3-1", 24, "blocks")
    blocks, steps = default_capture(24, 28)
    assert len(blocks) == 4 and all(6 <= b <= 17 for b in blocks) and steps[-1] == 27 and len(steps) == 7


@pytest.mark.parametrize(
    ("prompt", "seed", "blocks", "steps", "expected"),
    [
        ("", 0, "", "", "the prompt is empty"),
        ("   ", 0, "", "", "the prompt is empty"),
        (" ".join(["smiling"] * 80), 0, "", "", "82 CLIP tokens long; the limit is 77"),
        ("a\nb\nc\nd", 0, "", "", "4 prompts: compare at most 3"),
        (PROMPT, 0, "30", "", "capture blocks: 30 out of range; choose indices in 0..23"),
        (PROMPT, 0, "x-y", "", "capture blocks: cannot read"),
        (PROMPT, 0, "", "5", "capture steps: 5 out of range"),
        (PROMPT, 1e20, "", "", "choose a whole number in 0..4294967295"),
        (PROMPT, -1, "", "", "choose a whole number in 0..4294967295"),
        ("<step> " + " ".join(["smiling"] * 80), 0, "", "", "CLIP tokens long"),
    ],
)
def test_bad_inputs_give_a_message(explorer, prompt, seed, blocks, steps, expected):
    session, message = generate_callback(explorer, prompt, seed, 2, 4.0, blocks, steps)
    assert session is None
    assert message.startswith("**Error:**") and expected in _text(message)
    assert "<" not in message.removeprefix("**Error:**")  # HTML-safe


def test_too_long_for_t5_is_refused(explorer):
    session, message = generate_callback(explorer, " ".join(["smiling"] * 70), 0, 2, 4.0, "", "")
    assert session is None and "T5 tokens long; the limit is 64" in message


def test_ncut_sources_and_ranges(session):
    session.prompt = 0
    figure, message = ncut_callback(session, 10, "tsne", "output", False)
    assert isinstance(figure, Image.Image) and "10 eigenvectors" in message
    assert "only 16 tokens per image" in message  # the page says the colours cannot compare at this size
    figure, message = ncut_callback(session, 10, "spectral", "key", True)
    assert isinstance(figure, Image.Image) and "text tokens" in message
    figure, message = ncut_callback(session, 16, "tsne", "output", False)  # 16 image tokens: at most 15
    assert figure is None and "n_eig must be between 1 and 15" in message
    assert ncut_callback(None, 5, "tsne", "output", False)[1] == "**Error:** generate images first"


def test_export_png_svg_npz(session, tmp_path):
    word_callback(session, "2:9", False)
    files, message = export_callback(session, str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in files)
    stem = "the-image-shows-a-young-woman-with-long_seed7_blocks0-23_steps0-1_shows"
    assert names == [f"{stem}.npz", f"{stem}.png", f"{stem}.svg"], names
    png = Image.open(tmp_path / f"{stem}.png")
    assert round(png.info["dpi"][0]) >= 200
    settings = json.loads(png.info["sd3-attention"])
    assert settings["seed"] == 7 and settings["blocks"] == list(range(24)) and settings["words"] == ["shows"]
    assert (tmp_path / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    arrays = np.load(tmp_path / f"{stem}.npz")
    assert arrays["base/image_to_text"].shape == (16, len(session.generation.prompts[0].kept_columns))


def test_lora_norm_plot(explorer):
    assert lora_norm_plot(explorer.norms, explorer.num_blocks).width > 300


def test_importing_the_app_sets_no_environment_variable():
    code = (
        "import os, json; before = dict(os.environ);"
        "import sd3_lora_celeba.visualize.app;"
        "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))"
    )
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED")
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
    assert "HF_HUB_OFFLINE" not in app_module.__dict__.get("__doc__", "").split("Importing")[0]


def test_cli_help_and_validation():
    runner = CliRunner()
    result = runner.invoke(cli, ["visualize-attention-weights", "--help"])
    assert result.exit_code == 0 and "--lora-weight-dir" in result.output and "--share" in result.output
    result = runner.invoke(cli, ["visualize-attention-weights", "--port", "0"])
    assert result.exit_code == 2 and "--port 0" in result.output
    config = VisualizeConfig()
    assert (config.host, config.port, config.share) == ("127.0.0.1", 7860, False)


def _text(message: str) -> str:
    import html

    return html.unescape(message)


@pytest.mark.parametrize(
    ("steps", "guidance", "expected"),
    [(0, 4.0, "denoising steps 0: use 1..200"), (2.5, 4.0, "use a whole number"), (2, float("nan"), "0..30")],
)
def test_bad_numbers_give_a_message(explorer, steps, guidance, expected):
    session, message = generate_callback(explorer, PROMPT, 0, steps, guidance, "", "")
    assert session is None and expected in message


def test_progress_per_model_and_step(explorer):
    calls = []
    session, message = generate_callback(
        explorer,
        PROMPT,
        1,
        2,
        4.0,
        "5",
        "",
        progress=lambda done, total, what: calls.append((done, total, what)),
    )
    assert session is not None, message
    assert [c[0] for c in calls] == list(range(1, 7)) and {c[1] for c in calls} == {6}
    assert calls[0][2] == "prompt 1, base, step 1" and calls[-1][2] == "prompt 1, checkpoint-000020, step 2"
    assert session.generation.blocks == (5,) and session.generation.steps == (1,)  # default steps: the last


def test_model_offload_gives_the_same_images_and_maps(tiny_sd3, lora_dirs, explorer):
    """``--offload model``: hooks move each model to the device only while it runs; LoRA switching and
    capture work through them, and images and maps equal the resident explorer's."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.visualize.explorer import AttentionExplorer

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.transformer.eval()
    length = explorer.max_sequence_length
    offloaded = AttentionExplorer(pipe, lora_dirs, device="cpu", max_sequence_length=length, offload=True)
    models = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in models)
    call = dict(prompts=PROMPT, seed=3, num_inference_steps=2, guidance_scale=4.0, blocks=(1, 5), steps=(1,))
    got, want = offloaded.generate(**call), explorer.generate(**call)
    assert got.names == want.names == ["base", "checkpoint-000010", "checkpoint-000020"]
    for a, b in zip(got.prompts[0].images, want.prompts[0].images, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    base, lora = (np.asarray(got.prompts[0].images[i], np.int16) for i in (0, 2))
    assert np.abs(base - lora).max() > 0  # the adapter was switched on through the hooks
    for a, b in zip(got.prompts[0].captured, want.prompts[0].captured, strict=True):
        assert a.image_to_text.keys() == b.image_to_text.keys() == {(1, 1), (5, 1)}
        for table in ("image_to_text", "text_to_image", "features"):
            for key, value in getattr(a, table).items():
                torch.testing.assert_close(value, getattr(b, table)[key], rtol=0, atol=0)
    # every pipeline call ends by moving the models back and hooking them again
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in models)
    notes = {
        kind: [
            b.value
            for b in app_module.build_app(VisualizeConfig(), ex).blocks.values()
            if b.elem_id == "capture-note"
        ]
        for kind, ex in (("offloaded", offloaded), ("resident", explorer))
    }
    assert "CPU memory" in notes["offloaded"][0] and "CPU memory" not in notes["resident"][0]


@pytest.mark.parametrize(
    ("choice", "weights", "free", "expected"),
    [
        ("auto", 14 * 2**30, 79 * 2**30, False),  # SD3-medium on an 80 GB GPU
        ("auto", 26 * 2**30, 23 * 2**30, True),  # SD3.5-large on a 24 GB GPU
        ("auto", 14 * 2**30, 17 * 2**30, True),  # SD3-medium, workspace does not fit beside the weights
        ("auto", 26 * 2**30, None, False),  # not CUDA
        ("none", 26 * 2**30, 23 * 2**30, False),
        ("model", 1, 79 * 2**30, True),
    ],
)
def test_auto_offload_when_the_pipeline_does_not_fit(choice, weights, free, expected):
    assert app_module.wants_offload(choice, weights, free) is expected


def test_auto_workspace_grows_with_the_image_tokens():
    workspace = app_module.workspace_bytes
    assert workspace(1024, 1024) == app_module.APP_WORKSPACE_BYTES
    assert workspace(512, 1024) < workspace(768, 1024) < workspace(1024, 1024) < workspace(2048, 1024)
    # the token-bound part scales with (resolution / native) ** 2, the fixed part does not
    token_part = workspace(2048, 1024) - workspace(1024, 1024)
    assert token_part == pytest.approx(3 * app_module.APP_TOKEN_BYTES, abs=1)
    # SD3-medium (~14 GiB in bf16) fits a 24 GB GPU at 1024 px but not at 2048 px
    weights, free = 14 * 2**30, 21 * 2**30
    assert not app_module.wants_offload("auto", weights, free, workspace(1024, 1024))
    assert app_module.wants_offload("auto", weights, free, workspace(2048, 1024))


def test_auto_offload_reads_the_resolution(tiny_sd3, tiny_pipe, monkeypatch):
    """``load_explorer``: with free memory for the weights and the native workspace plus 1 GiB, ``auto`` keeps
    the models resident at the native resolution and offloads them at twice its side."""
    native = tiny_pipe.default_sample_size * tiny_pipe.vae_scale_factor
    free = app_module.pipeline_bytes(tiny_pipe) + app_module.workspace_bytes(native, native) + 2**30
    monkeypatch.setattr(app_module, "free_device_bytes", lambda device: free)
    config = dict(model_name=str(tiny_sd3), device="cpu", max_sequence_length=16)
    resident = app_module.load_explorer(VisualizeConfig(**config))
    offloaded = app_module.load_explorer(VisualizeConfig(**config, resolution=2 * native))
    assert (resident.offload, offloaded.offload) == (False, True)
    assert offloaded.resolution == 2 * native


def test_offload_options_are_checked(tiny_pipe):
    runner = CliRunner()
    result = runner.invoke(cli, ["visualize-attention-weights", "--offload", "all"])
    assert result.exit_code == 2 and "--offload" in result.output
    with pytest.raises(app_module.InputError, match="--offload model: with --device cpu"):
        app_module.load_explorer(VisualizeConfig(device="cpu", offload="model"))
    weights = sum(p.nbytes for p in tiny_pipe.transformer.parameters())
    assert app_module.pipeline_bytes(tiny_pipe) > weights > 0


def test_out_of_memory_during_generate_gives_a_message_and_changes_nothing(explorer, monkeypatch):
    """A Generate that runs out of device memory midway (here: the second model's first transformer call)
    ends in one message, and the next Generate gives what it gave before: adapters and processors restored."""
    call = (PROMPT, 5, 2, 4.0, "1,6", "")
    before, message = generate_callback(explorer, *call)
    assert before is not None, message
    transformer = explorer.pipe.transformer
    processors = {k: type(v) for k, v in transformer.attn_processors.items()}
    forward, calls, held, freed = transformer.forward, [], [], []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            held.append(weakref.ref(kwargs["hidden_states"]))  # the failed run's latents, held by its frames
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", failing)
    # the allocator's cache is emptied only after the failed run's tensors are gone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(held[0]() is None))
    session, message = generate_callback(explorer, *call)
    assert session is None and len(calls) == 3 and freed == [True]
    assert "out of GPU memory during Generate" in _text(message) and "--offload model" in message
    monkeypatch.undo()
    assert {k: type(v) for k, v in transformer.attn_processors.items()} == processors
    after, message = generate_callback(explorer, *call)
    assert after is not None, message
    for a, b in zip(after.generation.prompts, before.generation.prompts, strict=True):
        for x, y in zip(a.images, b.images, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(a.captured, b.captured, strict=True):
            for key, value in x.image_to_text.items():
                torch.testing.assert_close(value, y.image_to_text[key], rtol=0, atol=0)
    offloaded = type("Offloaded", (), {"offload": True})()
    assert "--offload model" not in app_module.out_of_memory_message(offloaded)


def test_other_errors_during_generate_are_not_swallowed(explorer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(explorer.pipe.transformer, "forward", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        generate_callback(explorer, PROMPT, 5, 2, 4.0, "", "")
