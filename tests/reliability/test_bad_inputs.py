"""Reliability matrix, part 2: bad inputs across stages give one line, exit code 2, and write nothing.

Stage-specific malformed inputs (annotation files, caches, LoRA shapes...) are tested beside each stage; this
file covers what every command shares: a missing folder, and an empty caption where a real one is needed.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sd3_lora_celeba import layout
from sd3_lora_celeba.cli import cli


@pytest.mark.parametrize(
    "args",
    [
        ["prepare-celeba-hq", "{missing}", "{out}"],
        ["caption-blip2", "{missing}"],
        ["caption-llama3", "{missing}"],
        ["compute-latent-dist", "{missing}"],
        ["compute-prompt-embeds", "3", "{missing}"],
        ["fine-tune", "{missing}", "{missing}"],
        ["copy-images", "{missing}", "{out}"],
        ["generate-images", "{missing}", "{out}"],
        ["fid", "{missing}", "{missing}"],
        ["fid-vs-step", "{missing}", "{missing}"],
        ["fid-vs-guidance", "{missing}"],
    ],
    ids=lambda a: a[0],
)
def test_missing_folder_is_one_line_exit_2_and_nothing_written(tmp_path, args):
    missing, out = tmp_path / "no-such-folder", tmp_path / "out"
    result = CliRunner().invoke(cli, [a.format(missing=missing, out=out) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(missing) in lines[0], result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_empty_blip2_caption_is_refused_by_caption_llama3(tmp_path):
    example = tmp_path / "dataset" / "train" / "hq-00001"
    example.mkdir(parents=True)
    record = {"id": "hq-00001", "attributes": {name: name == "Male" for name in layout.ATTRIBUTES}}
    (example / layout.EXAMPLE_RECORD).write_text(json.dumps(record))
    (example / layout.prompt_file("blip2")).write_text("   \n")
    result = CliRunner().invoke(cli, ["caption-llama3", str(tmp_path / "dataset")])
    assert result.exit_code == 2, result.output
    assert str(example / layout.prompt_file("blip2")) in result.output and "empty" in result.output
    assert not (example / layout.prompt_file("llama3")).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["copy-images", "{dir}", "{out}", "--num-images", "0"], "--num-images 0: must be at least 1"),
        (["compute-prompt-embeds", "3", "{dir}", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (
            ["caption-llama3", "{dir}", "--temperature", "101"],
            "--temperature 101.0: must be between 0 and 100",
        ),
        (
            ["caption-llama3", "{dir}", "--max-caption-words", "0"],
            "--max-caption-words 0: must be at least 1",
        ),
        (["caption-blip2", "{dir}", "--max-caption-words", "0"], "--max-caption-words 0: must be at least 1"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else "",
)
def test_count_out_of_bounds_is_one_line_naming_the_flag(tmp_path, args, message):
    folder, out = tmp_path / "dataset", tmp_path / "out"
    folder.mkdir()
    result = CliRunner().invoke(cli, [a.format(dir=folder, out=out) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and list(folder.iterdir()) == []
