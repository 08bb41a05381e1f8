"""The shared captioning loop with a fake generator: resumability, empty captions, example selection."""

from __future__ import annotations

import pytest
import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.captioning.loop import examples_with_files, run_caption_loop
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import resolve_dtype

OUTPUT = layout.prompt_file("blip2")


def _run(dirs, generate, **kwargs):
    loads = []

    def load():
        loads.append(1)
        return generate

    stats = run_caption_loop(
        dirs,
        output_name=OUTPUT,
        load_generator=load,
        what="test",
        **{"batch_size": 2, "overwrite": False} | kwargs,
    )
    return stats, len(loads)


def test_loop_writes_by_example_and_skips_finished(make_dataset):
    dirs = examples_with_files(make_dataset({"train": 5}), (layout.EXAMPLE_RECORD, layout.IMAGE), "test")
    stats, loads = _run(dirs, lambda batch: [f"caption of {d.name}" for d in batch])
    assert (stats.assigned, stats.written, stats.empty, loads) == (5, 5, 0, 1)
    assert all((d / OUTPUT).read_text() == f"caption of {d.name}" for d in dirs)
    stats, loads = _run(dirs, lambda batch: pytest.fail("nothing is pending"))
    assert (stats.assigned, loads) == (0, 0)  # no model loaded for a finished dataset
    stats, _ = _run(dirs, lambda batch: ["new"] * len(batch), overwrite=True)
    assert stats.written == 5 and {(d / OUTPUT).read_text() for d in dirs} == {"new"}


def test_empty_captions_stay_pending_and_whitespace_is_collapsed(make_dataset):
    dirs = examples_with_files(make_dataset({"train": 3}), (layout.EXAMPLE_RECORD,), "test")
    stats, _ = _run(dirs, lambda batch: [" a  man\n" if d.name.endswith("1") else " \n " for d in batch])
    assert (stats.written, stats.empty) == (1, 2)
    assert [(d / OUTPUT).read_text() for d in dirs if (d / OUTPUT).exists()] == ["a man"]
    stats, _ = _run(dirs, lambda batch: ["retried"] * len(batch))
    assert stats.assigned == 2 and stats.written == 2


def test_generator_must_return_one_caption_per_example(make_dataset):
    dirs = examples_with_files(make_dataset({"train": 2}), (layout.EXAMPLE_RECORD,), "test")
    with pytest.raises(RuntimeError, match="got 1 captions for 2 examples"):
        _run(dirs, lambda batch: ["only one"])


def test_examples_with_files_needs_every_required_file(make_dataset, caplog):
    root = make_dataset({"train": 2, "val": 1})
    (root / "train" / "hq-train-000" / layout.IMAGE).unlink()
    with caplog.at_level("WARNING"):
        found = examples_with_files(root, (layout.EXAMPLE_RECORD, layout.IMAGE), "test")
    assert [d.name for d in found] == ["hq-train-001", "hq-val-000"]
    assert "1 example folder(s) lack image.jpg" in caplog.text
    with pytest.raises(InputError, match="no example folder with example.json and prompt_blip2.txt"):
        examples_with_files(root, (layout.EXAMPLE_RECORD, OUTPUT), "test")


def test_resolve_dtype(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("float32", cuda) == torch.float32
