"""FID on a validation subset during training (``fine-tune --validation-fid-every N``).

Same code path as the sweeps: the text-encoder-free pipeline, per-image seeds, the cached empty prompt as negative
prompt, the ground-truth copy with cached statistics, pytorch-fid's network and maths. Only the transformer is the
live, LoRA-equipped one from the training loop, so the number matches ``fid-vs-step`` on the saved checkpoint of
that step (up to the LoRA weights' storage dtype).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.evaluate import fid as F
from sd3_lora_celeba.evaluate.copy_images import copy_example_images
from sd3_lora_celeba.sample import generate as G

log = logging.getLogger(__name__)


def validation_fid(
    transformer: torch.nn.Module,
    *,
    model_name: str,
    split_dir: Path,
    empty_prompt_dir: Path | None,
    num_images: int,
    guidance_scale: float = 7.0,
    num_inference_steps: int = 28,
    seed: int = 0,
    inception_weights: Path | None = None,
    work_dir: Path,
    prompt_variant: str = "blip2",
    revision: str | None = None,
    batch_size: int = 4,
    dims: int = 2048,
) -> float:
    """FID of ``transformer``'s images of the first ``num_images`` examples of ``split_dir`` vs their ground truth.

    ``work_dir`` keeps ``ground-truth/`` (copied once, statistics cached) and ``generated/`` (overwritten at every
    call). The transformer is put in eval mode for generation and returned to its previous mode.
    """
    work_dir = Path(work_dir)
    empty = G.find_empty_prompt_dir(split_dir, empty_prompt_dir)
    examples = G.select_examples(split_dir, empty, num_images)
    gt_dir = work_dir / layout.GROUND_TRUTH_DIR
    copy_example_images(examples, gt_dir)
    was_training = transformer.training
    transformer.eval()
    try:
        pipe = G.pipeline_from_transformer(transformer, model_name, revision)
        G.generate_into(
            pipe,
            examples,
            work_dir / "generated",
            empty_prompt_dir=empty,
            prompt_variant=prompt_variant,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
            overwrite=True,  # the weights changed since the last call
            desc="validation images",
            shard=False,  # called on one process of a training run
        )
    finally:
        transformer.train(was_training)
    inception = F.load_inception(dims, inception_weights, transformer.device)
    gt_stats = F.folder_statistics(gt_dir, inception)
    gen_stats = F.folder_statistics(work_dir / "generated", inception, use_cache=False)
    del inception
    return F.frechet_distance(gt_stats, gen_stats)
