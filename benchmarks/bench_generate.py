"""Benchmark ``generate-images`` against calling ``StableDiffusion3Pipeline`` with the same cached embeddings.

    python benchmarks/bench_generate.py --quick            # CPU, mid-size model (the CPU goal)
    python benchmarks/bench_generate.py --device cuda      # SD3-medium shapes (random weights), 1024 px, bf16

Both sides generate the same images (same per-image noise, prompts, steps, size, dtype, batch size) from a
folder of cached prompt embeddings in SD3-medium's shapes (CLIP-L 77 x 768, CLIP-G 77 x 1280, T5 256 x 4096,
joined 333 x 4096; pooled 2048) and write them as PNG files, with a fine-tuned LoRA loaded (rank 64 on the
8 joint-attention linears of blocks 4-22, the ``fine-tune`` defaults), which is what FID of a fine-tuned model
runs:

* ``plain``: what a user script does with stock diffusers: ``StableDiffusion3Pipeline.from_pretrained`` without
  text encoders, ``load_lora_weights`` (unfused), one pipeline call per batch with the cached tensors,
  ``image.save(...png)`` in the loop.
* ``ours``: the command's code path, ``load_generation_pipeline`` + ``generate_into`` (LoRA fused, on CUDA
  fused q/k/v, on a CPU float32 linears through oneDNN where it is faster and the feed-forward's tanh GELU
  inside its up-projection's oneDNN product (x86 with AVX-512), PNGs written on a thread pool).
* ``ours --compile`` (CUDA only, not part of the CPU goal; its compile time is reported separately).

Model: ``--quick`` is the mid-size config (24 blocks, width 384, 64 x 64 latents = 512 px, SD3-medium cache
shapes, the tiny 16-channel VAE); ``--device cuda`` is SD3-medium's transformer (24 blocks, width 1536) with
random weights at 1024 px and SD3's VAE shape. Repeats are interleaved (5 on a CPU, 3 on CUDA), ``gc.collect()`` between
configurations; a one-step warm-up run of each side is not timed. Goal ``generate``: plain / ours >= 1.3, in CPU
time of this process on a CPU (its PNG threads included; wall time on a shared machine measures the neighbours),
in wall time on CUDA. On a CPU the table ends with the same-maths ceiling (``ceiling.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_fine_tune import MID  # the mid-size shape the CPU benchmarks share
from ceiling import ceiling_row, count_flops, matmul_rate
from run_all import print_goals

from sd3_lora_celeba.testing.published import SD3_MEDIUM, SD3_VAE

MODEL_TAG = "bench/generate"
TINY_VAE = {**SD3_VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
LORA_BLOCKS = list(range(4, 23))
LORA_RANK = 64


def build_model(root: Path, arch: dict, vae: dict) -> Path:
    """A text-encoder-free SD3 pipeline folder (random, seeded weights) and a LoRA checkpoint beside it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules, save_lora

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**arch).eval()
    autoencoder = AutoencoderKL(**vae).eval()
    folder = root / "model"
    transformer.save_pretrained(folder / "transformer")
    autoencoder.save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusion3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": [None, None],
                "text_encoder_2": [None, None],
                "text_encoder_3": [None, None],
                "tokenizer": [None, None],
                "tokenizer_2": [None, None],
                "tokenizer_3": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
            }  # fmt: skip
        )
    )
    add_lora(transformer, lora_config(lora_target_modules(transformer, LORA_BLOCKS), rank=LORA_RANK))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    save_lora(transformer, root / "lora")
    del transformer
    gc.collect()
    return folder


def write_prompts(root: Path, num_examples: int) -> tuple[Path, Path]:
    """A test split with SD3-medium-shaped prompt caches (what compute-prompt-embeds writes) and the empty prompt."""
    from safetensors.torch import save_file

    from sd3_lora_celeba import layout
    from sd3_lora_celeba.encode import prompts as prompt_cache

    g = torch.Generator().manual_seed(0)
    shapes = {1: ((77, 768), 768), 2: ((77, 1280), 1280), 3: ((256, 4096), None)}

    def prompt_files(folder: Path, variant: str, text: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / layout.prompt_file(variant)).write_text(text, encoding="utf-8")
        for i, (shape, pooled) in shapes.items():
            tensors = {
                prompt_cache.tensor_key(variant, prompt_cache.PROMPT_EMBEDS): torch.randn(
                    *shape, generator=g
                ).half()
            }
            if pooled:
                key = prompt_cache.tensor_key(variant, prompt_cache.POOLED_PROMPT_EMBEDS)
                tensors[key] = torch.randn(pooled, generator=g).half()
            meta = {"format": prompt_cache.FORMAT, "model_name": MODEL_TAG, "model_revision": "", "encoder": str(i),
                    "max_sequence_length": str(shape[0]), "storage_dtype": "float16",
                    "text_sha256": json.dumps({variant: prompt_cache.text_sha256(text.strip())})}  # fmt: skip
            save_file(tensors, str(folder / layout.prompt_embeds_file(i)), metadata=meta)

    split = root / "dataset" / "test"
    for n in range(num_examples):
        prompt_files(split / f"hq-{n:05d}", "blip2", f"a photo of person {n} smiling")
    empty = root / "dataset" / layout.EMPTY_PROMPT_DIR
    prompt_files(empty, "empty", "")
    return split, empty


def plain_setup(model: Path, lora: Path, split: Path, empty: Path, opts: dict):
    """Stock diffusers, as a user script would call it with the cached embeddings; returns run(out)."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba import layout
    from sd3_lora_celeba.data.cached import load_joined_prompt_embeds
    from sd3_lora_celeba.sample.generate import initial_latents

    none = dict.fromkeys(
        ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model), dtype=opts["dtype"], **none)
    pipe.load_lora_weights(str(lora), weight_name=layout.LORA_WEIGHTS)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(opts["device"])
    device, dtype = opts["device"], opts["dtype"]
    examples = sorted(p for p in split.iterdir() if p.is_dir())
    side = opts["size"] // 8

    def run(out: Path, steps: int) -> None:
        neg, neg_pooled = load_joined_prompt_embeds(empty, "empty")
        out.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(examples), opts["batch_size"]):
            batch = examples[start : start + opts["batch_size"]]
            pairs = [load_joined_prompt_embeds(d, "blip2") for d in batch]
            n = len(batch)
            with torch.inference_mode():
                images = pipe(
                    prompt_embeds=torch.stack([p for p, _ in pairs]).to(device, dtype),
                    pooled_prompt_embeds=torch.stack([q for _, q in pairs]).to(device, dtype),
                    negative_prompt_embeds=neg.expand(n, -1, -1).to(device, dtype),
                    negative_pooled_prompt_embeds=neg_pooled.expand(n, -1).to(device, dtype),
                    latents=initial_latents([d.name for d in batch], 0, (16, side, side)).to(device, dtype),
                    height=opts["size"],
                    width=opts["size"],
                    num_inference_steps=steps,
                    guidance_scale=7.0,
                ).images
            for d, image in zip(batch, images, strict=True):
                image.save(out / f"{d.name}.png")

    return run


def ours_setup(model: Path, lora: Path, split: Path, empty: Path, opts: dict, compile: bool = False):
    """The command's code path; returns run(out)."""
    from sd3_lora_celeba.sample import generate as G

    pipe = G.load_generation_pipeline(
        str(model),
        lora_weight_dir=lora,
        dtype=opts["dtype"],
        device=opts["device"],
        compile=compile,
        fuse_qkv=True,
    )
    examples = G.select_examples(split, empty)

    def run(out: Path, steps: int) -> None:
        G.generate_into(
            pipe, examples, out, empty_prompt_dir=empty, prompt_variant="blip2", num_inference_steps=steps,
            guidance_scale=7.0, seed=0, height=opts["size"], width=opts["size"], batch_size=opts["batch_size"],
            shard=False,
        )  # fmt: skip

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device: torch.device, quick: bool, repeats: int | None = None) -> dict:
    """Interleaved timings (s per image; the pipelines are loaded once, before timing) and peak memory."""
    cuda = device.type == "cuda"
    repeats = repeats or (3 if cuda else 5)  # CUDA: 3 of 8 full-size images per side fit the 8-minute budget
    arch, vae = (SD3_MEDIUM, SD3_VAE) if cuda else (MID, TINY_VAE)
    opts = {
        "device": device,
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "size": arch["sample_size"] * 8,
        "steps": 28 if cuda else 2,
        "batch_size": 4 if cuda else 1,
    }
    num_images = 8 if cuda else (1 if quick else 2)
    setups = {"plain": plain_setup, "ours": ours_setup}
    if cuda:
        setups["ours --compile"] = lambda *a: ours_setup(*a, compile=True)
    times: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    peaks: dict[str, float | None] = dict.fromkeys(setups)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        root = Path(tmp)
        model = build_model(root, arch, vae)
        split, empty = write_prompts(root, num_images)
        runs = {name: setup(model, root / "lora", split, empty, opts) for name, setup in setups.items()}
        for repeat in range(repeats + 1):  # repeat 0 warms up (and compiles) with one step; not timed
            for name, run in runs.items():
                out = root / "out" / name.replace(" ", "")
                shutil.rmtree(out, ignore_errors=True)
                gc.collect()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                run(out, opts["steps"] if repeat else 1)
                _sync(device)
                if repeat:
                    times[name].append((time.perf_counter() - start) / num_images)
                    cpu[name].append((time.process_time() - cpu_start) / num_images)
                if cuda:
                    peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        same = _compare(root / "out" / "plain", root / "out" / "ours")
        extra = {}
        if not cuda:  # the FLOPs of ours' images and the CPU-time matmul rate: the same-maths ceiling
            out = root / "out" / "flops"
            extra["flops"] = count_flops(lambda: runs["ours"](out, opts["steps"])) / num_images
            extra["matmul_rate"] = matmul_rate(device, cpu_time=True)
    return {
        **extra,
        "times": times,
        "cpu": cpu,
        "peaks": peaks,
        "opts": opts,
        "num_images": num_images,
        "max_pixel_diff": same,
    }


def _compare(a: Path, b: Path) -> int:
    """Largest pixel difference between the two sides' images (grey levels)."""
    import numpy as np
    from PIL import Image

    worst = 0
    for p in sorted(a.glob("*.png")):
        x = np.asarray(Image.open(p)).astype(int)
        y = np.asarray(Image.open(b / p.name)).astype(int)
        worst = max(worst, int(np.abs(x - y).max()))
    return worst


def goals(device: str, quick: bool) -> list[dict]:
    m = measure(torch.device(device), quick)
    o = m["opts"]
    what = f"{o['size']} px, {o['steps']} steps, batch {o['batch_size']}, {str(o['dtype']).removeprefix('torch.')}"
    rows = [
        [f"{name} wall, s/image ({what})", statistics.median(t), min(t), m["peaks"].get(name)]
        for name, t in m["times"].items()
    ]
    rows += [
        [f"{name} CPU time, s/image", statistics.median(t), min(t), None] for name, t in m["cpu"].items()
    ]
    rows.append(
        [f"max pixel difference plain vs ours: {m['max_pixel_diff']} grey level(s)", None, None, None]
    )
    if "matmul_rate" in m:
        rows.append(ceiling_row(statistics.median(m["cpu"]["plain"]), m["flops"], m["matmul_rate"], "image"))
    # CPU: CPU time of this process (PNG threads included): on a shared machine, wall time mostly measures the
    # neighbours. CUDA: wall time.
    key = "times" if device.startswith("cuda") else "cpu"
    plain, ours = statistics.median(m[key]["plain"]), statistics.median(m[key]["ours"])
    return [{"name": "generate", "ratio": plain / ours, "op": ">=", "target": 1.3, "rows": rows}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="one image per repeat (CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_generate: no CUDA device here; use --device cpu")
        return 2
    print_goals(goals(args.device, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
