"""Throughput of the encode stage on CPU with the tiny SD3 model, and of the cached training loader.

Builds the tiny model and ``--num-examples`` synthetic captioned examples (64 px, two captions each) in a
temporary folder, then times, in one process:

* ``compute-latent-dist`` (VAE posterior of image + flip), examples/s;
* ``compute-prompt-embeds 1``, ``2``, ``3`` (two captions per example), examples/s;
* ``CachedLatentsDataset`` + ``DataLoader`` (batch 8, shuffled, 0 and 2 workers), samples/s.

Each command's time includes loading its model (tiny: well under a second), as a user would see it. Run::

    python benchmarks/bench_encode.py [--num-examples 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def make_examples(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    from sd3_lora_celeba import layout

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"hq-{i:05d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / layout.IMAGE)
        (d / layout.EXAMPLE_RECORD).write_text(json.dumps({"id": d.name, "attributes": {}}))
        (d / layout.prompt_file("blip2")).write_text(f"a photo of person {i} smiling")
        (d / layout.prompt_file("llama3")).write_text(
            f"A close-up portrait of person {i} with dark hair and glasses."
        )
    empty = root / layout.EMPTY_PROMPT_DIR
    empty.mkdir()
    (empty / layout.prompt_file("empty")).touch()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-examples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")

    import torch

    from sd3_lora_celeba.data.cached import CachedLatentsDataset, collate
    from sd3_lora_celeba.encode.latents import ComputeLatentDistConfig, compute_latent_dist
    from sd3_lora_celeba.encode.prompts import ComputePromptEmbedsConfig, compute_prompt_embeds
    from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3

    torch.set_num_threads(args.threads)
    n = args.num_examples
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_sd3(Path(tmp) / "tiny-sd3"))
        root = Path(tmp) / "dataset"
        make_examples(root, n)

        seconds = timed(
            lambda: compute_latent_dist(
                ComputeLatentDistConfig(dataset=root, model_name=model, batch_size=8, num_workers=0)
            )
        )
        rows.append(("compute-latent-dist (batch 8, 64 px)", "examples/s", n / seconds))
        for encoder in ("1", "2", "3"):
            seconds = timed(
                lambda encoder=encoder: compute_prompt_embeds(
                    ComputePromptEmbedsConfig(encoder=encoder, dataset=root, model_name=model, batch_size=32)
                )
            )
            rows.append((f"compute-prompt-embeds {encoder} (2 captions/example)", "examples/s", n / seconds))
            compute_prompt_embeds(
                ComputePromptEmbedsConfig(encoder=encoder, dataset=root / "empty-prompt", model_name=model)
            )

        seconds = timed(lambda: CachedLatentsDataset(root / "train", root / "empty-prompt"))
        rows.append(("CachedLatentsDataset construction (header checks)", "examples/s", n / seconds))
        dataset = CachedLatentsDataset(root / "train", root / "empty-prompt", caption_dropout=0.1)
        for workers in (0, 2):
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=8, shuffle=True, num_workers=workers, collate_fn=collate
            )
            seconds = timed(lambda loader=loader: [None for _ in loader])
            rows.append((f"cached loader, batch 8, {workers} workers", "samples/s", n / seconds))

    print(f"\nencode benchmark: {n} examples, tiny SD3, CPU, torch threads {args.threads}\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'stage':<{width}}  {'rate':>10}  unit")
    for name, unit, rate in rows:
        print(f"{name:<{width}}  {rate:>10.1f}  {unit}")


if __name__ == "__main__":
    main()
