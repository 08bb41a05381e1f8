"""The golden pixel slice of ``generate-images`` (as diffusers' pipeline tests pin an image slice).

Independent of the tiny tokenizers: the cached prompt embeddings of a copy of the tiny world's split are
replaced by seeded random tensors of the same shapes (their metadata, checked on load, is kept), so only the
tiny transformer, VAE, scheduler and the generation code decide the pixels.

Regenerate (after a deliberate change of the tiny model, the scheduler or the generation maths; say why in the
commit)::

    python tests/sample/golden_pixels.py          # rewrites tests/sample/golden_pixels.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).with_name("golden_pixels.json")
ARGS = ["--num-inference-steps", 3, "--num-images", 3, "--guidance-scale", 5.0, "--seed", 11]
ROWS, COLS = slice(24, 40, 3), slice(24, 40, 3)  # a 6 x 6 x 3 slice across the image centre


def randomize_prompt_caches(root: Path, seed: int = 0) -> int:
    """Replace every cached prompt tensor below ``root`` by seeded normal noise of the same shape and dtype."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(root.rglob("prompt_embeds_*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        name = f"{seed}:{path.parent.name}/{path.name}"
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big"))
        noise = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in sorted(tensors.items())}
        save_file(noise, str(path), metadata=metadata)
    return len(files)


def golden_world(world, root: Path) -> Path:
    """A copy of the world's dataset with random prompt caches; returns its test split."""
    dataset = root / "dataset"
    shutil.copytree(world.dataset, dataset)
    assert randomize_prompt_caches(dataset) > 0
    return dataset / "test"


def pixel_slices(folder: Path) -> dict[str, list]:
    from PIL import Image

    return {
        p.name: np.asarray(Image.open(p))[ROWS, COLS].astype(int).tolist()
        for p in sorted(folder.glob("*.png"))
    }


def main() -> None:
    import tempfile

    sys.path.insert(0, str(Path(__file__).parents[1]))  # run as a script: tests/fid_world.py
    from fid_world import build_world, run_cli

    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world")
        split = golden_world(world, Path(tmp))
        out = Path(tmp) / "out"
        result = run_cli("generate-images", split, out, *ARGS, env=world.env)
        assert result.exit_code == 0, result.output
        slices = pixel_slices(out)
        lines = [f"  {json.dumps(name)}: {json.dumps(rows)}" for name, rows in slices.items()]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
