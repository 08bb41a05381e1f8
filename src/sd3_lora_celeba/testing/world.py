"""The whole tiny offline world in one folder: synthetic releases, tiny models, random Inception weights.

``sd3 demo`` and the end-to-end tests point the real commands at it through environment variables
(:meth:`TinyWorld.env`), so every stage runs through its normal loading code::

    WORLD/
    ├── world.json               written last: the world is complete
    ├── CelebAMask-HQ/           synthetic CelebAMask-HQ release (attribute + mapping files, CelebA-HQ-img/)
    ├── CelebA/                  synthetic CelebA release (Anno/, Eval/, Img/img_celeba/)
    ├── models/sd3/              tiny SD3 pipeline (diffusers folder; SD3.5-shaped with --model-family)
    ├── models/blip2/            tiny BLIP-2 (transformers folder)
    ├── models/llama3/           tiny Llama-3-style chat model (transformers folder)
    ├── inception/pt_inception-random.pth   random-weight FID Inception
    └── torch-home/hub/checkpoints/         the same weights where the pytorch-fid command looks
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sd3_lora_celeba.io import atomic_write_json
from sd3_lora_celeba.models.loading import BLIP2_MODEL_ENV, LLAMA3_MODEL_ENV, SD3_MODEL_ENV

WORLD_INFO = "world.json"


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    celeba_hq: Path
    celeba: Path
    sd3: Path
    blip2: Path
    llama3: Path
    inception_weights: Path
    torch_home: Path
    model_family: str = "sd3-medium"  # shape of the tiny SD3 model: a key of testing.tiny_sd3.TINY_SPECS

    def env(self) -> dict[str, str]:
        """Environment that points every default model (and pytorch-fid's weights) into this world."""
        return {
            SD3_MODEL_ENV: str(self.sd3),
            BLIP2_MODEL_ENV: str(self.blip2),
            LLAMA3_MODEL_ENV: str(self.llama3),
            "TORCH_HOME": str(self.torch_home),
            "HF_HUB_OFFLINE": "1",
        }


def build_tiny_world(
    root: Path | str,
    *,
    num_hq_images: int = 60,
    hq_image_size: int = 128,
    num_celeba_extra: int = 24,
    celeba_size_range: tuple[int, int] = (600, 1000),
    seed: int = 0,
    model_family: str = "sd3-medium",
) -> TinyWorld:
    """Build (or reuse, if ``world.json`` exists) the tiny world below ``root``.

    The CelebA in-the-wild images straddle the default ``--min-image-size`` of 768 px, so that
    ``sd3 prepare-celeba`` both keeps and rejects images with its default settings. ``model_family`` shapes the
    tiny SD3 model like SD3-medium (default), SD3.5-medium (MMDiT-X blocks with ``attn2``) or SD3.5-large (38
    blocks); a world already built for another family is refused with a ValueError.
    """
    from sd3_lora_celeba.testing.celeba_synth import make_celeba_hq_release, make_celeba_release
    from sd3_lora_celeba.testing.inception import install_inception_weights, write_random_inception_weights
    from sd3_lora_celeba.testing.tiny_captioners import build_tiny_blip2, build_tiny_llama3
    from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3, tiny_spec

    spec = tiny_spec(model_family)
    root = Path(root)
    world = TinyWorld(
        root=root,
        celeba_hq=root / "CelebAMask-HQ",
        celeba=root / "CelebA",
        sd3=root / "models" / "sd3",
        blip2=root / "models" / "blip2",
        llama3=root / "models" / "llama3",
        inception_weights=root / "inception" / "pt_inception-random.pth",
        torch_home=root / "torch-home",
        model_family=model_family,
    )
    if (root / WORLD_INFO).is_file():
        built = json.loads((root / WORLD_INFO).read_text(encoding="utf-8")).get("model_family", "sd3-medium")
        if built != model_family:
            raise ValueError(
                f"{root}: tiny world built for model family {built}, not {model_family}; use another folder"
            )
        return world
    root.mkdir(parents=True, exist_ok=True)
    make_celeba_hq_release(world.celeba_hq, num_images=num_hq_images, image_size=hq_image_size, seed=seed)
    make_celeba_release(
        world.celeba,
        hq_root=world.celeba_hq,
        num_extra=num_celeba_extra,
        size_range=celeba_size_range,
        seed=seed + 1,
    )
    build_tiny_sd3(world.sd3, spec)
    build_tiny_blip2(world.blip2, seed=seed)
    build_tiny_llama3(world.llama3, seed=seed)
    write_random_inception_weights(world.inception_weights, seed=seed)
    install_inception_weights(world.inception_weights, world.torch_home)
    atomic_write_json(root / WORLD_INFO, json.loads(json.dumps(asdict(world), default=str)))
    return world
