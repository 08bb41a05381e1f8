"""``sd3 caption-blip2`` on the tiny BLIP-2: one caption per example, resumable, keyed by example id."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.captioning import blip2
from sd3_lora_celeba.captioning.blip2 import CaptionBlip2Config, caption_blip2, generate_captions, load_blip2
from sd3_lora_celeba.models.loading import BLIP2_MODEL_ENV, DEFAULT_BLIP2_MODEL

OUTPUT = layout.prompt_file("blip2")


@pytest.fixture
def run_captioner(run_cli):
    """``run_captioner(*args)``: ``sd3 --logging-style plain caption-blip2 ARGS...`` (not quiet)."""
    return lambda *args: run_cli("caption-blip2", *args, quiet=False)


class CountingGenerate:
    """Wraps ``generate_captions``: records each batch size, optionally fails on batch number ``fail_on``."""

    def __init__(self, fail_on: int | None = None, answer: str | None = None) -> None:
        self.batches: list[int] = []
        self.fail_on = fail_on
        self.answer = answer

    def __call__(self, model, processor, images, **kwargs):
        self.batches.append(len(images))
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("simulated crash")
        if self.answer is not None:
            return [self.answer] * len(images)
        return generate_captions(model, processor, images, **kwargs)


def test_cli_captions_every_example_of_the_dataset(tiny_env, make_dataset, captions, run_captioner):
    root = make_dataset({"train": 3, "val": 2, "test": 1})
    (root / layout.EMPTY_PROMPT_DIR).mkdir()
    (root / layout.EMPTY_PROMPT_DIR / layout.prompt_file("empty")).touch()
    result = run_captioner(str(root), "--batch-size", "4", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    written = captions(root, "blip2")
    assert sorted(written) == sorted(p.parent.name for p in root.rglob(layout.EXAMPLE_RECORD))
    assert len(written) == 6
    assert all(text and "\n" not in text and text == text.strip() for text in written.values())
    assert not (root / layout.EMPTY_PROMPT_DIR / OUTPUT).exists()  # not an image example
    assert not list(root.rglob(".tmp-*"))


def test_captions_are_keyed_by_example_not_by_position(tiny_blip2, make_dataset, captions):
    root = make_dataset({"train": 5})
    caption_blip2(
        CaptionBlip2Config(dataset=root, model_name=str(tiny_blip2), batch_size=2, max_new_tokens=6)
    )
    model, processor = load_blip2(str(tiny_blip2), None, blip2.torch.float32, blip2.torch.device("cpu"))
    written = captions(root, "blip2")
    assert len(set(written.values())) > 1  # the images differ, so must (some of) the captions
    for example_id, text in written.items():
        image = Image.open(root / "train" / example_id / layout.IMAGE).convert("RGB")
        assert generate_captions(model, processor, [image], max_new_tokens=6, num_beams=1) == [text]


def test_split_or_single_example_folder(tiny_env, make_dataset, captions, run_captioner):
    root = make_dataset({"train": 2, "val": 2})
    assert run_captioner(str(root / "val")).exit_code == 0
    assert sorted(captions(root, "blip2")) == ["hq-val-000", "hq-val-001"]
    assert run_captioner(str(root / "train" / "hq-train-001")).exit_code == 0
    assert sorted(captions(root, "blip2")) == ["hq-train-001", "hq-val-000", "hq-val-001"]


def test_rerun_redoes_nothing_and_loads_no_model(tiny_env, make_dataset, monkeypatch, run_captioner):
    root = make_dataset({"train": 3})
    assert run_captioner(str(root)).exit_code == 0
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob(OUTPUT)}

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when every example is done")

    monkeypatch.setattr(blip2, "load_blip2", no_model)
    result = run_captioner(str(root))
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in root.rglob(OUTPUT)} == mtimes


def test_interrupted_run_resumes_with_the_rest_only(
    tiny_env, make_dataset, monkeypatch, captions, run_captioner
):
    root = make_dataset({"train": 5})
    crashing = CountingGenerate(fail_on=2)
    monkeypatch.setattr(blip2, "generate_captions", crashing)
    result = run_captioner(str(root), "--batch-size", "2")
    assert isinstance(result.exception, RuntimeError)
    first = captions(root, "blip2")
    assert len(first) == 2  # the first batch was written before the crash
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob(OUTPUT)}

    counting = CountingGenerate()
    monkeypatch.setattr(blip2, "generate_captions", counting)
    assert run_captioner(str(root), "--batch-size", "2").exit_code == 0
    assert counting.batches == [2, 1]  # only the 3 missing examples
    assert len(captions(root, "blip2")) == 5
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_overwrite_redoes_every_example(tiny_env, make_dataset, monkeypatch, captions, run_captioner):
    root = make_dataset({"train": 3})
    assert run_captioner(str(root)).exit_code == 0
    fresh = captions(root, "blip2")
    for p in root.rglob(OUTPUT):
        p.write_text("stale", encoding="utf-8")
    counting = CountingGenerate()
    monkeypatch.setattr(blip2, "generate_captions", counting)
    assert run_captioner(str(root), "--overwrite").exit_code == 0
    assert sum(counting.batches) == 3
    assert captions(root, "blip2") == fresh


def test_empty_caption_is_not_written_and_retried(tiny_blip2, make_dataset, monkeypatch, caplog, captions):
    root = make_dataset({"train": 2})
    monkeypatch.setattr(blip2, "generate_captions", CountingGenerate(answer="  "))
    config = CaptionBlip2Config(dataset=root, model_name=str(tiny_blip2))
    with caplog.at_level(logging.WARNING):
        assert caption_blip2(config) == 0
    assert captions(root, "blip2") == {}
    assert "empty caption" in caplog.text
    monkeypatch.setattr(blip2, "generate_captions", CountingGenerate(answer="a man with glasses"))
    assert caption_blip2(config) == 2
    assert set(captions(root, "blip2").values()) == {"a man with glasses"}


def test_degenerate_caption_is_written_with_a_warning(
    tiny_blip2, make_dataset, monkeypatch, caplog, captions
):
    root = make_dataset({"train": 1})
    monkeypatch.setattr(blip2, "generate_captions", CountingGenerate(answer="a man a man a man"))
    with caplog.at_level(logging.WARNING):
        caption_blip2(CaptionBlip2Config(dataset=root, model_name=str(tiny_blip2)))
    assert list(captions(root, "blip2").values()) == ["a man a man a man"]
    assert "degenerate caption" in caplog.text and "repeats 'a man'" in caplog.text


def test_model_name_defaults_to_the_environment(
    tiny_env, tiny_blip2, tmp_path, make_dataset, monkeypatch, run_captioner
):
    seen = []
    real = blip2.load_blip2
    monkeypatch.setattr(blip2, "load_blip2", lambda name, *a: seen.append(name) or real(name, *a))
    assert run_captioner(str(make_dataset({"train": 1}))).exit_code == 0
    assert seen == [str(tiny_blip2)]
    assert CaptionBlip2Config(dataset=tmp_path).model_name == str(tiny_blip2)
    monkeypatch.delenv(BLIP2_MODEL_ENV)
    assert (
        CaptionBlip2Config(dataset=tmp_path).model_name
        == DEFAULT_BLIP2_MODEL
        == "Salesforce/blip2-flan-t5-xl-coco"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/missing"], "dataset folder not found"),
        (["{empty}"], "no example folder with example.json and image.jpg"),
        (["{root}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["{root}", "--num-beams", "65"], "--num-beams 65: must be between 1 and 64"),
        (["{root}", "--max-new-tokens", "5000"], "--max-new-tokens 5000: must be between 1 and 4096"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_env, tmp_path, make_dataset, args, message, run_captioner):
    root = make_dataset({"train": 1})
    (tmp_path / "empty").mkdir()
    result = run_captioner(*[a.format(root=root, empty=tmp_path / "empty") for a in args])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_one_line_naming_it(tiny_env, make_dataset, damage, run_captioner):
    root = make_dataset({"train": 2})
    image = sorted((root / "train").iterdir())[1] / layout.IMAGE
    data = image.read_bytes()
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 if damage == "garbage" else data[: len(data) // 3])
    result = run_captioner(str(root), "--batch-size", "1", "--max-new-tokens", "4")
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and f"{image}: cannot read image" in last
    assert "Traceback" not in result.output
