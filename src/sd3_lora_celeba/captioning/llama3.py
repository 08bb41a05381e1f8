"""``caption-llama3``: rewrite each BLIP-2 caption with the CelebA attributes into ``prompt_llama3.txt``.

The default model is ``meta-llama/Llama-3.1-8B-Instruct`` (gated: log in to Hugging Face and request access).
The prompt (see :mod:`prompting`) gives the BLIP-2 caption and one plain sentence per true attribute and asks
for a short, objective, one-line description; the answer is cleaned into one line (:func:`clean_caption`).

Reproducibility: ``--temperature 0`` decodes greedily. With sampling, torch is seeded at every batch from
``--seed`` and the ids of the batch's examples, so the same batch gives the same captions on every run
(batches depend on ``--batch-size``, the number of processes and which examples were still pending).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.captioning.cleaning import clean_caption
from sd3_lora_celeba.captioning.loop import (
    examples_with_files,
    model_name_option,
    run_caption_loop,
)
from sd3_lora_celeba.captioning.prompting import attribute_sentences, build_messages
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.data import records
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import DEFAULT_LLAMA3_MODEL, LLAMA3_MODEL_ENV, Precision, resolve_dtype
from sd3_lora_celeba.parallel import process_state, stage_lock
from sd3_lora_celeba.seeding import derive_seed

log = logging.getLogger(__name__)

INPUT = layout.prompt_file("blip2")
OUTPUT = layout.prompt_file("llama3")
WHAT = "caption-llama3"


@dataclasses.dataclass
class CaptionLlama3Config:
    """Options of ``sd3 caption-llama3``."""

    dataset: Path = argument("Dataset root, one split, or any folder below it.")
    model_name: str = model_name_option(
        DEFAULT_LLAMA3_MODEL, LLAMA3_MODEL_ENV, "Llama 3 instruct model: hub id or local transformers folder."
    )
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    batch_size: int = option(16, "Prompts per generate call (per process).", min=1)
    max_new_tokens: int = option(77, "Most tokens generated per caption.", min=1, max=4096)
    temperature: float = option(
        0.0, "Sampling temperature; 0 decodes greedily (deterministic).", min=0, max=100
    )
    top_p: float = option(0.9, "Nucleus sampling threshold (used when --temperature > 0).")
    seed: int = option(0, "Seed of the sampling RNG (used when --temperature > 0).")
    include_subjective: bool = option(False, "Also state subjective attributes (Attractive, Chubby).")
    max_caption_words: int = option(
        60, "Warn about captions longer than this many words (or repeating themselves).", min=1
    )
    precision: Precision = option(
        "auto", "Model dtype. auto = bfloat16 on CUDA (float16 without bf16 support), float32 on CPU."
    )
    overwrite: bool = option(False, "Caption again examples that already have prompt_llama3.txt.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        if not self.model_name:
            raise ValueError(f"--model-name is empty: give a hub id or a folder (or set {LLAMA3_MODEL_ENV})")


def read_attributes(example_dir: Path) -> dict[str, bool]:
    """The checked CelebA attributes of an example record (``records.read_attributes``), ``Male`` required."""
    attributes = records.read_attributes(example_dir)
    if "Male" not in attributes:
        path = Path(example_dir) / layout.EXAMPLE_RECORD
        raise InputError(f"{path}: no 'Male' attribute; re-run the prepare stage")
    return attributes


def read_blip2_caption(example_dir: Path) -> str:
    """The example's BLIP-2 caption; an empty one is an InputError (the rewrite would be invented)."""
    path = Path(example_dir) / INPUT
    caption = records.read_caption(path)  # one line naming the file if it is not UTF-8
    if not caption:
        raise InputError(f"{path}: empty BLIP-2 caption; delete the file and re-run sd3 caption-blip2")
    return caption


def example_messages(example_dir: Path, include_subjective: bool) -> list[dict[str, str]]:
    """Chat messages of one example: its BLIP-2 caption and attribute sentences."""
    caption = read_blip2_caption(example_dir)
    return build_messages(caption, attribute_sentences(read_attributes(example_dir), include_subjective))


def batch_seed(seed: int, example_ids: list[str]) -> int:
    """A 63-bit seed from ``--seed`` and the batch's example ids (the project's one scheme, :mod:`seeding`)."""
    return derive_seed(seed, *example_ids)


def load_llama3(model_name: str, revision: str | None, dtype: torch.dtype, device: torch.device):
    """The chat model (eval mode, on ``device``) and its tokenizer, set up for left-padded batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd3_lora_celeba.models.loading import load_pretrained

    revision = revision or "main"
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained,
        model_name,
        what="Llama 3 tokenizer",
        revision=revision,
        padding_side="left",
    )
    if tokenizer.chat_template is None:
        raise InputError(f"{model_name}: the tokenizer has no chat template; use an instruct (chat) model")
    if tokenizer.pad_token is None:
        # Llama 3 defines no pad token; padded positions are masked, so end-of-sequence serves.
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained, model_name, what="Llama 3 model", revision=revision, dtype=dtype
    )
    return model.to(device).eval(), tokenizer


@torch.inference_mode()
def generate_captions(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[str]:
    """One raw answer per conversation, generated as one left-padded batch."""
    texts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations
    ]
    # The chat template already starts with <|begin_of_text|>: add no second one.
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    torch.manual_seed(seed)
    output_ids = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **({"do_sample": False, "temperature": None, "top_p": None} | sampling),
    )
    new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]  # (B, <= max_new_tokens)
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def caption_llama3(config: CaptionLlama3Config) -> int:
    """Write ``prompt_llama3.txt`` for every example with a BLIP-2 caption; return how many this process wrote."""
    examples = examples_with_files(config.dataset, (layout.EXAMPLE_RECORD, INPUT), WHAT)
    # Check every input before the model loads, so a bad file fails in seconds rather than mid-run.
    for example_dir in examples:
        read_blip2_caption(example_dir)
        read_attributes(example_dir)

    def load_generator():
        device = process_state().device
        dtype = resolve_dtype(config.precision, device)
        log.info(
            "%s: loading %s (%s) on %s", WHAT, config.model_name, str(dtype).removeprefix("torch."), device
        )
        model, tokenizer = load_llama3(config.model_name, config.model_revision, dtype, device)

        def generate(batch: list[Path]) -> list[str]:
            conversations = [example_messages(d, config.include_subjective) for d in batch]
            answers = generate_captions(
                model,
                tokenizer,
                conversations,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=batch_seed(config.seed, [layout.example_id(d) for d in batch]),
            )
            return [clean_caption(a) for a in answers]

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
