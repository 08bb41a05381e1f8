"""generate-images: per-image seeds, resume, settings guard, LoRA."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.sample.generate import derive_seed, initial_latents

FAST = ["--num-inference-steps", 2]


def _pixels(folder, name):
    return np.asarray(Image.open(folder / name)).astype(int)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "hq-00001") == derive_seed(0, "hq-00001")
    assert len({derive_seed(0, "hq-00001"), derive_seed(1, "hq-00001"), derive_seed(0, "hq-00002")}) == 3
    assert 0 <= derive_seed(2**40, "x") < 2**63


def test_initial_latents_do_not_depend_on_the_batch():
    ids = ["a", "b", "c"]
    batch = initial_latents(ids, 7, (16, 8, 8))
    single = torch.cat([initial_latents([i], 7, (16, 8, 8)) for i in ids])
    assert torch.equal(batch, single)
    assert not torch.equal(batch[0], batch[1])


def test_images_do_not_depend_on_batch_size_and_resume(world, tmp_path, run_cli):
    one, three = tmp_path / "b1", tmp_path / "b3"
    r1 = run_cli("generate-images", world.split, one, *FAST, "--batch-size", 1, env=world.env)
    assert r1.exit_code == 0, r1.output
    r3 = run_cli("generate-images", world.split, three, *FAST, "--batch-size", 3, env=world.env)
    assert r3.exit_code == 0, r3.output
    names = sorted(p.name for p in one.glob("*.png"))
    assert names == sorted(f"{d.name}.png" for d in world.split.iterdir())
    other = _pixels(one, names[1])
    for name in names:
        a, b = _pixels(one, name), _pixels(three, name)
        # Same noise; batched matmuls may round a handful of pixels the other way, never more than one level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
        if name != names[1]:
            assert np.abs(a - other).mean() > 5  # different examples really differ
    settings = json.loads((one / layout.GENERATION_SETTINGS).read_text())
    assert settings["num_inference_steps"] == 2 and settings["lora"] is None
    # Resume: a deleted image is regenerated, the others are left alone.
    mtimes = {n: (one / n).stat().st_mtime_ns for n in names}
    (one / names[0]).unlink()
    again = run_cli("generate-images", world.split, one, *FAST, "--batch-size", 2, env=world.env)
    assert again.exit_code == 0, again.output
    assert all((one / n).stat().st_mtime_ns == mtimes[n] for n in names[1:])
    assert np.abs(_pixels(one, names[0]) - _pixels(three, names[0])).max() <= 1
    # Other settings into the same folder are refused.
    refused = run_cli("generate-images", world.split, one, "--num-inference-steps", 3, env=world.env)
    assert refused.exit_code == 2 and "num_inference_steps" in refused.output


def test_lora_changes_images_and_bad_lora_is_one_line_error(world, tmp_path, run_cli):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    args = [*FAST, "--num-images", 2]
    assert run_cli("generate-images", world.split, base, *args, env=world.env).exit_code == 0
    r = run_cli("generate-images", world.split, tuned, *args, "--lora-weight-dir", world.lora, env=world.env)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tuned.glob("*.png")) == ["hq-00000.png", "hq-00001.png"]
    assert np.abs(_pixels(base, "hq-00000.png") - _pixels(tuned, "hq-00000.png")).mean() > 1
    # A LoRA whose shapes do not fit the model.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-lora"
    bad.mkdir()
    state = load_file(world.lora / layout.LORA_WEIGHTS)
    save_file(
        {k: torch.zeros(v.shape[0] + 3, v.shape[1]) for k, v in state.items()}, bad / layout.LORA_WEIGHTS
    )
    r = run_cli(
        "generate-images", world.split, tmp_path / "x", *args, "--lora-weight-dir", bad, env=world.env
    )
    assert r.exit_code == 2, r.output
    error = r.output.strip().splitlines()[-1]  # earlier lines: diffusers' loading bar
    assert "bad-lora" in error and "does not fit" in error
    missing = run_cli(
        "generate-images", world.split, tmp_path / "y", "--lora-weight-dir", tmp_path, env=world.env
    )
    assert missing.exit_code == 2 and layout.LORA_WEIGHTS in missing.output


def _same(a_dir, b_dir, name) -> bool:
    return np.abs(_pixels(a_dir, name) - _pixels(b_dir, name)).max() <= 1


def test_killed_overwrite_never_leaves_a_mix_and_settings_gate_resume(world, tmp_path, run_cli, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref-seed1"
    assert run_cli("generate-images", world.split, out, *FAST, "--seed", 0, env=world.env).exit_code == 0
    assert run_cli("generate-images", world.split, ref, *FAST, "--seed", 1, env=world.env).exit_code == 0
    old = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(old) == len(list(world.split.iterdir()))
    # --overwrite with another seed, "killed" (a write fails) after two images.
    real_save, calls = Image.Image.save, []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    killed = run_cli(
        "generate-images",
        world.split,
        out,
        *FAST,
        "--seed",
        1,
        "--overwrite",
        "--batch-size",
        2,
        env=world.env,
    )
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert killed.exit_code != 0
    left = sorted(p.name for p in out.glob("*.png"))
    assert left, "the images written before the kill are kept"
    for name in left:  # only new images: none of seed 0 is left beside them
        assert (out / name).read_bytes() != old[name] and _same(out, ref, name)
    assert json.loads((out / layout.GENERATION_SETTINGS).read_text())["seed"] == 1
    # The old settings are refused in one line; the new ones resume to a complete folder.
    refused = run_cli("generate-images", world.split, out, *FAST, "--seed", 0, env=world.env)
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "seed" in refused.output
    resumed = run_cli("generate-images", world.split, out, *FAST, "--seed", 1, env=world.env)
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in out.glob("*.png")) == sorted(old)
    assert all(_same(out, ref, name) for name in old)


def test_images_without_a_settings_record_are_not_counted_as_done(world, tmp_path, run_cli):
    out = tmp_path / "out"
    assert (
        run_cli("generate-images", world.split, out, *FAST, "--num-images", 2, env=world.env).exit_code == 0
    )
    (out / layout.GENERATION_SETTINGS).unlink()  # e.g. a kill inside --overwrite, after the record went
    r = run_cli("generate-images", world.split, out, *FAST, "--num-images", 2, env=world.env)
    assert r.exit_code == 2 and layout.GENERATION_SETTINGS in r.output and "--overwrite" in r.output
    r = run_cli("generate-images", world.split, out, *FAST, "--num-images", 2, "--overwrite", env=world.env)
    assert r.exit_code == 0, r.output
    assert (out / layout.GENERATION_SETTINGS).is_file()


def test_bad_values_and_files_are_one_line_errors_before_any_write(world, tmp_path, run_cli):
    corrupt = tmp_path / "corrupt-lora"
    corrupt.mkdir()
    (corrupt / layout.LORA_WEIGHTS).write_bytes(np.random.default_rng(0).bytes(4096))
    cases = {
        "lora": (["--lora-weight-dir", corrupt], layout.LORA_WEIGHTS),
        "height": (["--height", 1600], "--height 1600"),
        "odd-width": (["--width", 72], "--width"),
        "negative-guidance": (["--guidance-scale", -1], "--guidance-scale"),
        "nan-guidance": (["--guidance-scale", "nan"], "--guidance-scale"),
        "device": (["--device", "cuda"], "--device"),
        "skip-block": (["--skip-guidance-layers", "3,24"], "--skip-guidance-layers 24"),
        "skip-without-cfg": (["--skip-guidance-layers", 3, "--guidance-scale", 1], "--guidance-scale"),
        "skip-window": (
            [
                "--skip-guidance-layers",
                3,
                "--skip-layer-guidance-start",
                0.5,
                "--skip-layer-guidance-stop",
                0.2,
            ],
            "--skip-layer-guidance-start",
        ),
    }
    if torch.cuda.is_available():
        del cases["device"]
    for label, (args, named) in cases.items():
        out = tmp_path / label
        r = run_cli("generate-images", world.split, out, *FAST, *args, env=world.env)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and named in lines[0], (label, r.output)
        assert not out.exists() or not any(out.iterdir()), label  # nothing written


def test_skip_layer_guidance_changes_images_and_is_recorded(world, tmp_path, run_cli):
    plain, slg = tmp_path / "plain", tmp_path / "slg"
    args = ["--num-inference-steps", 3, "--num-images", 2]
    # Steps 1 and 2 of 3 take the extra pass; a strong scale makes the tiny random model show it.
    window = [
        "--skip-layer-guidance-start",
        0,
        "--skip-layer-guidance-stop",
        1,
        "--skip-layer-guidance-scale",
        10,
    ]
    assert run_cli("generate-images", world.split, plain, *args, env=world.env).exit_code == 0
    r = run_cli(
        "generate-images", world.split, slg, *args, "--skip-guidance-layers", "7,8,9", *window, env=world.env
    )
    assert r.exit_code == 0, r.output
    assert np.abs(_pixels(plain, "hq-00000.png") - _pixels(slg, "hq-00000.png")).max() > 3  # beyond rounding
    settings = json.loads((slg / layout.GENERATION_SETTINGS).read_text())
    assert settings["skip_guidance_layers"] == [7, 8, 9] and settings["skip_layer_guidance_stop"] == 1
    assert "skip_guidance_layers" not in json.loads((plain / layout.GENERATION_SETTINGS).read_text())
    # Another skip set into the same folder is another setting.
    r = run_cli(
        "generate-images", world.split, slg, *args, "--skip-guidance-layers", "7", *window, env=world.env
    )
    assert r.exit_code == 2 and "skip_guidance_layers" in r.output


def _stock_images(world, lora_dir, n=2, steps=2, seed=0):
    """The same images with stock diffusers: StableDiffusion3Pipeline, unfused LoRA, the same cached inputs."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.data.cached import load_joined_prompt_embeds
    from sd3_lora_celeba.sample.generate import find_empty_prompt_dir, select_examples

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(world.model), text_encoder=None, text_encoder_2=None, text_encoder_3=None,
        tokenizer=None, tokenizer_2=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=layout.LORA_WEIGHTS)
    empty = find_empty_prompt_dir(world.split)
    examples = select_examples(world.split, empty, n)
    neg, neg_pooled = load_joined_prompt_embeds(empty, "empty")
    pairs = [load_joined_prompt_embeds(d, "blip2") for d in examples]
    size = pipe.transformer.config.sample_size
    latents = initial_latents([d.name for d in examples], seed, (16, size, size))
    with torch.inference_mode():
        images = pipe(
            prompt_embeds=torch.stack([p for p, _ in pairs]),
            pooled_prompt_embeds=torch.stack([q for _, q in pairs]),
            negative_prompt_embeds=neg.expand(n, -1, -1),
            negative_pooled_prompt_embeds=neg_pooled.expand(n, -1),
            latents=latents,
            num_inference_steps=steps,
            output_type="np",
        ).images
    return {f"{d.name}.png": np.round(img * 255).astype(int) for d, img in zip(examples, images, strict=True)}


def test_fused_lora_and_fused_qkv_give_the_stock_pipelines_images(world, tmp_path, run_cli, monkeypatch):
    from sd3_lora_celeba.sample import generate as G

    stock = _stock_images(world, world.lora)
    out = tmp_path / "ours"
    r = run_cli(
        "generate-images",
        world.split,
        out,
        *FAST,
        "--num-images",
        2,
        "--lora-weight-dir",
        world.lora,
        env=world.env,
    )
    assert r.exit_code == 0, r.output
    for name, expected in stock.items():
        assert np.abs(_pixels(out, name) - expected).max() <= 1
    # The CUDA-only fused q/k/v path, forced on the CPU, and back to the base model on a reused pipeline.
    monkeypatch.setattr(G, "qkv_fusion_applies", lambda transformer: True)
    pipe = G.load_generation_pipeline(str(world.model), lora_weight_dir=world.lora, fuse_qkv=True)
    assert getattr(pipe, "_sd3_fused_qkv", False) and getattr(pipe, "_sd3_lora_fused", False)
    # the images above and below come from oneDNN's linears (float32 on a CPU), compared with stock diffusers
    assert any(type(m).__name__ == "OneDnnLinear" for m in pipe.transformer.modules())
    empty = G.find_empty_prompt_dir(world.split)
    examples = G.select_examples(world.split, empty, 2)
    kwargs = dict(
        empty_prompt_dir=empty, prompt_variant="blip2", num_inference_steps=2, guidance_scale=7.0, seed=0
    )
    G.generate_into(pipe, examples, tmp_path / "fused", **kwargs)
    for name, expected in stock.items():
        assert np.abs(_pixels(tmp_path / "fused", name) - expected).max() <= 1
    G.swap_lora(pipe, None)
    G.generate_into(pipe, examples, tmp_path / "base", **kwargs)
    for name, expected in _stock_images(world, None).items():
        assert np.abs(_pixels(tmp_path / "base", name) - expected).max() <= 1


def test_folders_recorded_under_the_old_revision_key_still_match(tmp_path):
    import json

    import pytest
    import torch

    from sd3_lora_celeba.errors import InputError
    from sd3_lora_celeba.sample.generate import check_generation_settings, generation_settings

    settings = generation_settings(
        model_name="m", revision="v1", lora=None, prompt_variant="blip2", empty_prompt_dir=tmp_path,
        num_inference_steps=2, guidance_scale=3.0, seed=0, height=64, width=64, dtype=torch.float32,
    )  # fmt: skip
    assert settings["model_revision"] == "v1" and "revision" not in settings
    old = {("revision" if k == "model_revision" else k): v for k, v in settings.items()}
    (tmp_path / "generation.json").write_text(json.dumps(old))
    check_generation_settings(tmp_path, settings, overwrite=False)  # same settings, old key name
    with pytest.raises(InputError, match="model_revision"):
        check_generation_settings(tmp_path, {**settings, "model_revision": "v2"}, overwrite=False)
