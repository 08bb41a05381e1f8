"""Throughput of the captioning stages on CPU with the tiny captioners: examples per second.

Builds the tiny BLIP-2 and Llama 3 models and a synthetic dataset in a temporary folder, then runs
``caption-blip2`` and ``caption-llama3`` through their Python entry points (one process, as the CLI does).
The time covers the whole stage (model loading included), which is what a user waits for.

    python benchmarks/bench_captioning.py [--examples 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from sd3_lora_celeba import layout  # noqa: E402
from sd3_lora_celeba.captioning.blip2 import CaptionBlip2Config, caption_blip2  # noqa: E402
from sd3_lora_celeba.captioning.llama3 import CaptionLlama3Config, caption_llama3  # noqa: E402
from sd3_lora_celeba.testing.tiny_captioners import build_tiny_blip2, build_tiny_llama3  # noqa: E402


def make_dataset(root: Path, count: int, seed: int = 0) -> None:
    """``count`` training examples with a 64 px image and random attributes."""
    rng = random.Random(seed)
    for i in range(count):
        d = root / "train" / f"hq-{i:05d}"
        d.mkdir(parents=True)
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(d / layout.IMAGE)
        attributes = {name: rng.random() < 0.3 for name in layout.ATTRIBUTES}
        record = {"id": d.name, "source": "celeba-hq", "split": "train", "attributes": attributes}
        (d / layout.EXAMPLE_RECORD).write_text(json.dumps(record), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        blip2 = build_tiny_blip2(tmp_path / "blip2")
        llama3 = build_tiny_llama3(tmp_path / "llama3")
        dataset = tmp_path / "dataset"
        make_dataset(dataset, args.examples)

        stages = (
            ("caption-blip2", lambda: caption_blip2(
                CaptionBlip2Config(dataset=dataset, model_name=str(blip2), batch_size=args.batch_size)
            )),
            ("caption-llama3", lambda: caption_llama3(
                CaptionLlama3Config(dataset=dataset, model_name=str(llama3), batch_size=args.batch_size)
            )),
        )  # fmt: skip
        print(
            f"{args.examples} examples, batch size {args.batch_size}, CPU, {torch.get_num_threads()} thread(s)"
        )
        for name, run in stages:
            start = time.perf_counter()
            written = run()
            seconds = time.perf_counter() - start
            print(
                f"{name:15s} {written:4d} captions in {seconds:6.2f} s  = {written / seconds:7.1f} examples/s"
            )


if __name__ == "__main__":
    main()
