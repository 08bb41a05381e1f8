"""Regenerate ``golden_losses.json``: ``python tests/train/make_golden.py`` from the repository root.

Builds the tiny model and world in a temporary folder, runs the golden fine-tune (see ``train_helpers``: 4 steps
on captioned examples, so the joined CLIP-L + CLIP-G + T5 embeddings are pinned) and writes its per-step losses.

When to regenerate: only when a deliberate change alters the training numbers: the tiny model or tokenizers
(``sd3_lora_celeba.testing``), the seed derivation (``sd3_lora_celeba.seeding``), the flow maths or the data
stream. Check first that the change is the only cause (e.g. run the golden command on the previous commit's
training code against the new tiny world: the losses must agree bit for bit), then run this script and say in
the commit message why the numbers moved.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_helpers import GOLDEN_FILE, GOLDEN_FILE_ARGS, build_world, golden_command, invoke, losses  # noqa: E402

from sd3_lora_celeba.models.loading import SD3_MODEL_ENV  # noqa: E402
from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd3(Path(tmp) / "tiny-sd3")
        world = build_world(Path(tmp) / "dataset", model)
        invoke(golden_command(world, Path(tmp) / "run", *GOLDEN_FILE_ARGS), {SD3_MODEL_ENV: str(model)})
        values = losses(Path(tmp) / "run")
    GOLDEN_FILE.write_text(json.dumps({"losses": values}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN_FILE}: {values}")


if __name__ == "__main__":
    main()
