"""``caption-blip2``: unconditional BLIP-2 captions of every image (``prompt_blip2.txt``).

The default model is ``Salesforce/blip2-flan-t5-xl-coco`` (ViT-g + Q-Former + Flan-T5-XL, fine-tuned on COCO
captions). Captioning is unconditional: the T5 encoder sees only the image's query tokens and an empty text,
the way BLIP-2 produces COCO-style captions. Greedy decoding by default (``--num-beams 1``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.captioning.loop import (
    examples_with_files,
    model_name_option,
    run_caption_loop,
)
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.models.loading import BLIP2_MODEL_ENV, DEFAULT_BLIP2_MODEL, Precision, resolve_dtype
from sd3_lora_celeba.parallel import process_state, stage_lock

log = logging.getLogger(__name__)

OUTPUT = layout.prompt_file("blip2")
WHAT = "caption-blip2"


@dataclasses.dataclass
class CaptionBlip2Config:
    """Options of ``sd3 caption-blip2``."""

    dataset: Path = argument("Dataset root, one split, or any folder below it.")
    model_name: str = model_name_option(
        DEFAULT_BLIP2_MODEL, BLIP2_MODEL_ENV, "BLIP-2 hub id or local transformers folder."
    )
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    batch_size: int = option(16, "Images per generate call (per process).", min=1)
    max_new_tokens: int = option(30, "Most tokens generated per caption.", min=1, max=4096)
    num_beams: int = option(1, "Beam search width (1 = greedy).", min=1, max=64)
    max_caption_words: int = option(
        30,
        "Warn about captions longer than this many words (or repeating themselves); they are still written.",
        min=1,
    )
    precision: Precision = option(
        "auto", "Model dtype. auto = bfloat16 on CUDA (float16 without bf16 support), float32 on CPU."
    )
    overwrite: bool = option(False, "Caption again examples that already have prompt_blip2.txt.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if not self.model_name:
            raise ValueError(f"--model-name is empty: give a hub id or a folder (or set {BLIP2_MODEL_ENV})")


def load_blip2(model_name: str, revision: str | None, dtype: torch.dtype, device: torch.device):
    """The BLIP-2 model (eval mode, on ``device``) and its processor."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from sd3_lora_celeba.models.loading import load_pretrained

    revision = revision or "main"
    processor = load_pretrained(
        Blip2Processor.from_pretrained, model_name, what="BLIP-2 processor", revision=revision
    )
    model = load_pretrained(
        Blip2ForConditionalGeneration.from_pretrained,
        model_name,
        what="BLIP-2 model",
        revision=revision,
        dtype=dtype,
    )
    model = model.to(device).eval()
    if processor.num_query_tokens is None:
        # Checkpoints saved before transformers 4.47 lack it; the processor must expand the image tokens.
        processor.num_query_tokens = model.config.num_query_tokens
    if model.config.image_token_index is None:
        model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids(
            processor.image_token.content
        )
    return model, processor


@torch.inference_mode()
def generate_captions(model, processor, images: list, *, max_new_tokens: int, num_beams: int) -> list[str]:
    """Unconditional captions of a batch of PIL images, one per image."""
    # An empty text per image: the processor prepends the query-token placeholders and T5 appends </s>,
    # i.e. the encoder input of BLIP-2's unconditional captioning.
    inputs = processor(images=images, text=[""] * len(images), return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)  # (B, 3, H, W)
    output_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    return [text.strip() for text in processor.batch_decode(output_ids, skip_special_tokens=True)]


def _read_images(example_dirs: list[Path]) -> list:
    from PIL import Image

    from sd3_lora_celeba.data.crop import to_rgb
    from sd3_lora_celeba.errors import InputError

    images = []
    for d in example_dirs:
        try:
            with Image.open(d / layout.IMAGE) as image:
                images.append(to_rgb(image, d / layout.IMAGE))  # 16-bit scaled, not clipped to white
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise InputError(
                f"{d / layout.IMAGE}: cannot read image ({exc}); replace it (sd3 prepare-celeba-hq rewrites "
                "an example whose example.json is deleted)"
            ) from None
    return images


def caption_blip2(config: CaptionBlip2Config) -> int:
    """Write ``prompt_blip2.txt`` for every example with an image; return how many this process wrote."""
    examples = examples_with_files(config.dataset, (layout.EXAMPLE_RECORD, layout.IMAGE), WHAT)

    def load_generator():
        device = process_state().device
        dtype = resolve_dtype(config.precision, device)
        log.info(
            "%s: loading %s (%s) on %s", WHAT, config.model_name, str(dtype).removeprefix("torch."), device
        )
        model, processor = load_blip2(config.model_name, config.model_revision, dtype, device)

        def generate(batch: list[Path]) -> list[str]:
            return generate_captions(
                model,
                processor,
                _read_images(batch),
                max_new_tokens=config.max_new_tokens,
                num_beams=config.num_beams,
            )

        return generate

    with stage_lock(config.dataset, WHAT, f"{WHAT} {config.dataset}", processes=True):
        stats = run_caption_loop(
            examples,
            output_name=OUTPUT,
            load_generator=load_generator,
            batch_size=config.batch_size,
            overwrite=config.overwrite,
            what=WHAT,
            max_words=config.max_caption_words,
        )
    return stats.written
