"""``sd3 caption-llama3`` on the tiny Llama: prompt, cleaning, reproducibility, resumability."""

from __future__ import annotations

import json

import pytest

from sd3_lora_celeba import layout
from sd3_lora_celeba.captioning import llama3
from sd3_lora_celeba.captioning.llama3 import (
    CaptionLlama3Config,
    batch_seed,
    caption_llama3,
    generate_captions,
)

INPUT, OUTPUT = layout.prompt_file("blip2"), layout.prompt_file("llama3")


@pytest.fixture
def run_captioner(run_cli):
    """``run_captioner(*args)``: ``sd3 --logging-style plain caption-llama3 ARGS...`` (not quiet)."""
    return lambda *args: run_cli("caption-llama3", *args, quiet=False)


@pytest.fixture
def blip2_dataset(make_dataset):
    """A dataset whose examples already have BLIP-2 captions (written by hand: no BLIP-2 run needed)."""
    root = make_dataset({"train": 3, "val": 2})
    for i, record in enumerate(sorted(root.rglob(layout.EXAMPLE_RECORD))):
        (record.parent / INPUT).write_text(f"a face photo number {i}", encoding="utf-8")
    return root


class RecordingGenerate:
    """Wraps ``generate_captions``: records conversations, optionally fails on batch ``fail_on`` or answers ``answer``."""

    def __init__(self, fail_on: int | None = None, answer: str | None = None) -> None:
        self.conversations: list[list] = []
        self.fail_on = fail_on
        self.answer = answer

    def __call__(self, model, tokenizer, conversations, **kwargs):
        self.conversations.append(conversations)
        if self.fail_on is not None and len(self.conversations) == self.fail_on:
            raise RuntimeError("simulated crash")
        if self.answer is not None:
            return [self.answer] * len(conversations)
        return generate_captions(model, tokenizer, conversations, **kwargs)


def test_cli_captions_every_example_with_a_blip2_caption(tiny_env, blip2_dataset, captions, run_captioner):
    lacking = blip2_dataset / "val" / "hq-val-001"
    (lacking / INPUT).unlink()
    result = run_captioner(str(blip2_dataset), "--batch-size", "3", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    written = captions(blip2_dataset, "llama3")
    assert sorted(written) == ["hq-train-000", "hq-train-001", "hq-train-002", "hq-val-000"]
    assert all(text and "\n" not in text and text == " ".join(text.split()) for text in written.values())
    assert "lack prompt_blip2.txt" in result.output  # the skipped example is reported


def test_prompt_gives_caption_and_attribute_sentences(
    tiny_env, blip2_dataset, monkeypatch, captions, run_captioner
):
    example = blip2_dataset / "train" / "hq-train-001"
    record = json.loads((example / layout.EXAMPLE_RECORD).read_text())
    record["attributes"].update(Male=True, No_Beard=False, Attractive=True, Eyeglasses=True)
    (example / layout.EXAMPLE_RECORD).write_text(json.dumps(record))
    recording = RecordingGenerate(
        answer='Here is a short description:\n\n"A man with a beard and glasses."\n'
    )
    monkeypatch.setattr(llama3, "generate_captions", recording)
    assert run_captioner(str(example)).exit_code == 0
    [[messages]] = recording.conversations
    user = messages[1]["content"]
    assert '"a face photo number 1"' in user
    for sentence in ("The person is a man.", "The person has a beard.", "The person wears eyeglasses."):
        assert f"- {sentence}" in user
    assert "attractive" not in user
    assert captions(example, "llama3") == {"hq-train-001": "A man with a beard and glasses."}

    assert run_captioner(str(example), "--overwrite", "--include-subjective").exit_code == 0
    assert "- The person is attractive." in recording.conversations[-1][0][1]["content"]


def _run(root, model, **options) -> dict[str, str]:
    caption_llama3(CaptionLlama3Config(dataset=root, model_name=str(model), max_new_tokens=10, **options))
    return {p.parent.name: p.read_text() for p in sorted(root.rglob(OUTPUT))}


def test_sampling_is_reproducible_with_the_seed(tiny_llama3, blip2_dataset):
    sampled = dict(temperature=1.0, top_p=1.0, batch_size=2, overwrite=True)
    first = _run(blip2_dataset, tiny_llama3, seed=0, **sampled)
    assert len(first) == 5
    assert _run(blip2_dataset, tiny_llama3, seed=0, **sampled) == first
    assert _run(blip2_dataset, tiny_llama3, seed=1, **sampled) != first
    greedy = _run(blip2_dataset, tiny_llama3, seed=0, batch_size=2, overwrite=True)
    assert _run(blip2_dataset, tiny_llama3, seed=5, batch_size=2, overwrite=True) == greedy


def test_batch_seed_depends_on_seed_and_ids_only():
    assert batch_seed(0, ["a", "b"]) == batch_seed(0, ["a", "b"])
    assert len({batch_seed(0, ["a", "b"]), batch_seed(1, ["a", "b"]), batch_seed(0, ["a", "c"])}) == 3
    assert 0 <= batch_seed(123, ["x"]) < 2**63


def test_interrupted_run_resumes_and_rerun_redoes_nothing(
    tiny_env, blip2_dataset, monkeypatch, captions, run_captioner
):
    monkeypatch.setattr(llama3, "generate_captions", RecordingGenerate(fail_on=2))
    result = run_captioner(str(blip2_dataset), "--batch-size", "2", "--max-new-tokens", "6")
    assert isinstance(result.exception, RuntimeError)
    assert len(captions(blip2_dataset, "llama3")) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in blip2_dataset.rglob(OUTPUT)}

    recording = RecordingGenerate()
    monkeypatch.setattr(llama3, "generate_captions", recording)
    assert run_captioner(str(blip2_dataset), "--batch-size", "2", "--max-new-tokens", "6").exit_code == 0
    assert [len(c) for c in recording.conversations] == [2, 1]
    assert len(captions(blip2_dataset, "llama3")) == 5
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    assert run_captioner(str(blip2_dataset)).exit_code == 0
    assert len(recording.conversations) == 2  # nothing generated again


def test_empty_answer_is_not_written(tiny_env, blip2_dataset, monkeypatch, captions, run_captioner):
    monkeypatch.setattr(llama3, "generate_captions", RecordingGenerate(answer="Here is the description:\n"))
    result = run_captioner(str(blip2_dataset / "train"))
    assert result.exit_code == 0
    assert captions(blip2_dataset, "llama3") == {}
    assert "empty caption" in result.output


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"Smiling": True}, "no 'Male' attribute"),
        ({"Male": True, "Sunglasses": True}, "unknown attribute(s) Sunglasses"),
        ({"Male": 1}, "attribute(s) Male are not true/false"),
    ],
)
def test_bad_example_record_is_a_one_line_error(tiny_env, blip2_dataset, attributes, message, run_captioner):
    example = blip2_dataset / "val" / "hq-val-000"
    (example / layout.EXAMPLE_RECORD).write_text(json.dumps({"id": example.name, "attributes": attributes}))
    result = run_captioner(str(example))
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]  # after the progress log lines
    assert str(example / layout.EXAMPLE_RECORD) in error and message in error
    assert "Traceback" not in result.output


def test_bad_options_are_rejected(tiny_env, blip2_dataset, run_captioner):
    for args, message in ((["--temperature", "-1"], "--temperature -1.0"), (["--top-p", "0"], "--top-p 0.0")):
        result = run_captioner(str(blip2_dataset), *args)
        assert result.exit_code == 2 and message in result.output


def test_blip2_caption_that_is_not_utf8_is_one_line_naming_it(
    tiny_env, blip2_dataset, captions, run_captioner
):
    bad = blip2_dataset / "val" / "hq-val-000" / layout.prompt_file("blip2")
    bad.write_bytes(b"a smiling woman \xff\xfe")
    result = run_captioner(str(blip2_dataset))
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert f"{bad}: not UTF-8 text (byte 16)" in error and "caption-blip2" in error
    assert "Traceback" not in result.output
    assert captions(blip2_dataset, "llama3") == {}  # checked before anything is written


def test_corrupt_example_record_names_the_command_that_rebuilds_it(tiny_env, blip2_dataset, run_captioner):
    record = blip2_dataset / "val" / "hq-val-000" / layout.EXAMPLE_RECORD
    record.write_bytes(b'{"id": "hq-val-000", "attrib')  # truncated
    result = run_captioner(str(blip2_dataset))
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert f"{record}:1: invalid JSON" in error and "sd3 prepare-celeba-hq" in error


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"), ("--top-p", "nan")],
)
def test_sampling_flags_refuse_nan_and_infinity(blip2_dataset, flag, value, captions, run_captioner):
    result = run_captioner(str(blip2_dataset), flag, value)
    assert result.exit_code == 2, result.output
    assert flag in result.output.strip().splitlines()[-1]
    assert captions(blip2_dataset, "llama3") == {}
