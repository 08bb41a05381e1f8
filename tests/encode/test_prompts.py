"""compute-prompt-embeds: the README steps, equality with the SD3 pipeline, resume, stale captions, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd3_lora_celeba import layout
from sd3_lora_celeba.data.cached import load_joined_prompt_embeds
from sd3_lora_celeba.encode import prompts as prompts_mod
from sd3_lora_celeba.errors import InputError


def read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def pipeline_embeds(pipe, prompt: str, max_sequence_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt, prompt, prompt, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
    return prompt_embeds[0], pooled_prompt_embeds[0]


def test_readme_steps_run_as_written(tiny_env, tiny_pipe, make_dataset, run_cli):
    """The seed README's commands, verbatim but for the path (the env var points at the tiny model)."""
    root = make_dataset()
    for encoder in ("1", "2", "3"):
        result = run_cli("compute-prompt-embeds", encoder, root)
        assert result.exit_code == 0, result.output
    empty = root / "empty-prompt"
    empty.mkdir()
    (empty / "prompt_empty.txt").touch()
    for encoder in ("1", "2", "3"):
        result = run_cli("compute-prompt-embeds", encoder, empty)
        assert result.exit_code == 0, result.output

    tensors, meta = read_cache(root / "train" / "ex-000" / layout.prompt_embeds_file(3))
    assert set(tensors) == {"blip2.prompt_embeds", "llama3.prompt_embeds"}
    assert meta["max_sequence_length"] == "77" and meta["storage_dtype"] == "float16"
    assert set(read_cache(empty / layout.prompt_embeds_file(1))[0]) == {
        "empty.prompt_embeds",
        "empty.pooled_prompt_embeds",
    }
    # The default float16 storage stays within float16 rounding of the pipeline's float32 output.
    for example_dir, variant, text in [
        (root / "val" / "ex-004", "llama3", (root / "val" / "ex-004" / "prompt_llama3.txt").read_text()),
        (empty, "empty", ""),
    ]:
        prompt_embeds, pooled = load_joined_prompt_embeds(example_dir, variant, model_name=str(tiny_env))
        expected, expected_pooled = pipeline_embeds(tiny_pipe, text)
        torch.testing.assert_close(prompt_embeds, expected, atol=5e-3, rtol=2e-3)
        torch.testing.assert_close(pooled, expected_pooled, atol=5e-3, rtol=2e-3)


@pytest.fixture
def embedded(tiny_sd3, make_dataset) -> Path:
    """A dataset with all three float32 caches, made through the Python functions."""
    root = make_dataset({"train": 3})
    for encoder in ("clip-l", "clip-g", "t5"):  # the aliases
        config = prompts_mod.ComputePromptEmbedsConfig(
            encoder=encoder, dataset=root, model_name=str(tiny_sd3), storage_dtype="float32", batch_size=4
        )
        assert prompts_mod.compute_prompt_embeds(config) == {"examples": 3, "written": 3, "embedded": 6}
    return root


def test_cache_equals_pipeline_encoders(embedded, tiny_pipe):
    for example_dir in sorted((embedded / "train").iterdir()):
        for variant in ("blip2", "llama3"):
            text = (example_dir / layout.prompt_file(variant)).read_text()
            # Per encoder, against the pipeline's own helpers.
            for index in (0, 1):
                tensors, meta = read_cache(example_dir / layout.prompt_embeds_file(index + 1))
                with torch.no_grad():
                    expected, expected_pooled = tiny_pipe._get_clip_prompt_embeds(
                        text, clip_model_index=index
                    )
                torch.testing.assert_close(
                    tensors[f"{variant}.prompt_embeds"], expected[0], atol=1e-5, rtol=1e-5
                )
                torch.testing.assert_close(
                    tensors[f"{variant}.pooled_prompt_embeds"], expected_pooled[0], atol=1e-5, rtol=1e-5
                )
                assert meta["max_sequence_length"] == "77" and meta["encoder"] == str(index + 1)
            tensors, _ = read_cache(example_dir / layout.prompt_embeds_file(3))
            with torch.no_grad():
                expected = tiny_pipe._get_t5_prompt_embeds(text, max_sequence_length=77)
            torch.testing.assert_close(tensors[f"{variant}.prompt_embeds"], expected[0], atol=1e-5, rtol=1e-5)


def test_rerun_redoes_nothing_and_edited_caption_redoes_one(
    embedded, tiny_sd3, tiny_pipe, mtimes, monkeypatch
):
    config = prompts_mod.ComputePromptEmbedsConfig(
        encoder="2", dataset=embedded, model_name=str(tiny_sd3), storage_dtype="float32"
    )
    name = layout.prompt_embeds_file(2)
    before = mtimes(embedded, name)
    real = prompts_mod.encode_prompts
    monkeypatch.setattr(
        prompts_mod, "encode_prompts", lambda *a, **k: pytest.fail("finished prompts re-encoded")
    )
    assert prompts_mod.compute_prompt_embeds(config) == {"examples": 3, "written": 0, "embedded": 0}
    assert mtimes(embedded, name) == before

    seen: list[str] = []

    def spy(text_encoder, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return real(text_encoder, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(prompts_mod, "encode_prompts", spy)
    edited = embedded / "train" / "ex-001"
    (edited / "prompt_blip2.txt").write_text("an edited caption\n")
    old, _ = read_cache(edited / name)
    assert prompts_mod.compute_prompt_embeds(config) == {"examples": 3, "written": 1, "embedded": 1}
    assert seen == ["an edited caption"]  # stripped, and the unchanged llama3 caption is not re-encoded
    after = mtimes(embedded, name)
    assert [k for k in after if after[k] != before[k]] == ["ex-001"]
    new, meta = read_cache(edited / name)
    torch.testing.assert_close(new["llama3.prompt_embeds"], old["llama3.prompt_embeds"], atol=0, rtol=0)
    with torch.no_grad():
        expected, _ = tiny_pipe._get_clip_prompt_embeds("an edited caption", clip_model_index=1)
    torch.testing.assert_close(new["blip2.prompt_embeds"], expected[0], atol=1e-5, rtol=1e-5)
    assert prompts_mod.cached_text_hashes(meta)["blip2"] == prompts_mod.text_sha256("an edited caption")

    # A new variant is embedded alone, too.
    seen.clear()
    (edited / "prompt_extra.txt").write_text("one more caption")
    assert prompts_mod.compute_prompt_embeds(config)["embedded"] == 1
    assert seen == ["one more caption"]
    assert set(read_cache(edited / name)[0]) >= {"extra.prompt_embeds", "blip2.prompt_embeds"}


def test_interrupted_run_resumes_with_the_rest(tiny_sd3, make_dataset, mtimes, monkeypatch):
    root = make_dataset({"train": 5})
    real = prompts_mod.encode_prompts

    def crash_on_call(n: int):
        calls = []

        def encode(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("killed")
            return real(*args, **kwargs)

        return encode

    # Batch size 2: a group of 2 examples holds 4 prompts, i.e. 2 encoder calls.
    config = prompts_mod.ComputePromptEmbedsConfig(
        encoder="3", dataset=root, model_name=str(tiny_sd3), batch_size=2
    )
    monkeypatch.setattr(prompts_mod, "encode_prompts", crash_on_call(2))
    with pytest.raises(RuntimeError, match="killed"):
        prompts_mod.compute_prompt_embeds(config)
    assert mtimes(root, layout.prompt_embeds_file(3)) == {}  # half-embedded examples are not written

    monkeypatch.setattr(prompts_mod, "encode_prompts", crash_on_call(3))  # dies in the second group
    with pytest.raises(RuntimeError, match="killed"):
        prompts_mod.compute_prompt_embeds(config)
    first = mtimes(root, layout.prompt_embeds_file(3))
    assert sorted(first) == ["ex-000", "ex-001"]
    assert not list(root.rglob(".tmp-*"))

    monkeypatch.setattr(prompts_mod, "encode_prompts", real)
    assert prompts_mod.compute_prompt_embeds(config) == {"examples": 5, "written": 3, "embedded": 6}
    after = mtimes(root, layout.prompt_embeds_file(3))
    assert len(after) == 5 and all(after[k] == first[k] for k in first)


def test_t5_length_and_other_model_are_checked(embedded, tiny_sd3, tiny_pipe, run_cli, tmp_path):
    example = embedded / "train" / "ex-002"
    # Another length for T5 is refused on an existing cache, and accepted with --overwrite.
    result = run_cli(
        "compute-prompt-embeds", "t5", embedded, "--model-name", tiny_sd3, "--max-sequence-length", 32
    )
    assert result.exit_code == 2
    assert "prompt_embeds_3.safetensors" in result.output and "--overwrite" in result.output
    result = run_cli(
        "compute-prompt-embeds",
        "t5",
        example,
        "--model-name",
        tiny_sd3,
        "--max-sequence-length",
        32,
        "--overwrite",
        "--storage-dtype",
        "float32",
    )
    assert result.exit_code == 0, result.output
    tensors, meta = read_cache(example / layout.prompt_embeds_file(3))
    assert tensors["blip2.prompt_embeds"].shape == (32, 64) and meta["max_sequence_length"] == "32"
    prompt_embeds, pooled = load_joined_prompt_embeds(example, "blip2", max_sequence_length=32)
    expected, expected_pooled = pipeline_embeds(tiny_pipe, (example / "prompt_blip2.txt").read_text(), 32)
    assert prompt_embeds.shape == (77 + 32, 64)
    torch.testing.assert_close(prompt_embeds, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="ex-002.*max_sequence_length=32, expected 77"):
        load_joined_prompt_embeds(example, "blip2", max_sequence_length=77)

    # The same weights under another name count as another model: refused, never mixed.
    other = tmp_path / "other-model"
    other.symlink_to(tiny_sd3, target_is_directory=True)
    result = run_cli("compute-prompt-embeds", "1", embedded, "--model-name", other)
    assert result.exit_code == 2 and "model_name=" in result.output
    with pytest.raises(InputError, match="ex-002.*prompt_embeds_1.safetensors.*expected"):
        load_joined_prompt_embeds(example, "blip2", model_name=str(other))


def test_bad_arguments(tiny_sd3, make_dataset, run_cli, tmp_path):
    root = make_dataset({"train": 1})
    result = run_cli("compute-prompt-embeds", "4", root, "--model-name", tiny_sd3)
    assert result.exit_code == 2 and "clip-l" in result.output
    result = run_cli("compute-prompt-embeds", "clip-g", root, "--max-sequence-length", 100)
    assert result.exit_code == 2 and "CLIP" in result.output
    result = run_cli("compute-prompt-embeds", "t5", root, "--max-sequence-length", 600)
    assert result.exit_code == 2 and "512" in result.output
    (tmp_path / "no-captions").mkdir()
    result = run_cli("compute-prompt-embeds", "1", tmp_path / "no-captions", "--model-name", tiny_sd3)
    assert result.exit_code == 2 and "prompt_empty.txt" in result.output
    assert prompts_mod.ComputePromptEmbedsConfig(encoder="T5", dataset=root).encoder_index == 3


def test_long_caption_is_truncated_like_the_pipeline(tiny_sd3, tiny_pipe, make_dataset, caplog):
    root = make_dataset({"train": 1})
    long_text = " ".join(f"word{i}" for i in range(120))
    (root / "train" / "ex-000" / "prompt_llama3.txt").write_text(long_text)
    config = prompts_mod.ComputePromptEmbedsConfig(
        encoder="1", dataset=root, model_name=str(tiny_sd3), storage_dtype="float32"
    )
    with caplog.at_level("WARNING"):
        prompts_mod.compute_prompt_embeds(config)
    assert "1 prompt(s) longer than 77 tokens were truncated" in caplog.text
    tensors, _ = read_cache(root / "train" / "ex-000" / layout.prompt_embeds_file(1))
    with torch.no_grad():
        expected, _ = tiny_pipe._get_clip_prompt_embeds(long_text, clip_model_index=0)
    torch.testing.assert_close(tensors["llama3.prompt_embeds"], expected[0], atol=1e-5, rtol=1e-5)
