"""``compute-prompt-embeds ID``: cache one SD3 text encoder's embeddings of every prompt of every example.

ID is 1, 2 or 3 (diffusers ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``), also spelled ``clip-l``,
``clip-g``, ``t5``. Only that encoder is loaded, so the three runs fit on a small GPU one after another.

Every ``prompt_<variant>.txt`` of an example folder (``blip2``, ``llama3``, ``empty``, ...) is embedded into that
folder's ``prompt_embeds_<ID>.safetensors`` (``layout.prompt_embeds_file``)::

    <variant>.prompt_embeds          (L, D)   CLIP: penultimate hidden states; T5: last hidden state
    <variant>.pooled_prompt_embeds   (P,)     CLIP only: the text projection of the final token
    metadata (strings): format, model_name, model_revision, encoder, max_sequence_length, storage_dtype,
                        precision, text_sha256 (JSON: variant -> sha256 of the embedded text)

This is exactly what ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds`` compute
(same tokenizer call: ``padding="max_length"``, truncation, no attention mask), so joining the three files
(:func:`sd3_lora_celeba.data.cached.load_joined_prompt_embeds`) gives ``encode_prompt``'s output.

``--max-sequence-length`` is the token length of the stored sequence, recorded in the file. The pipeline always
pads CLIP prompts to the CLIP tokenizer's 77 tokens and applies ``max_sequence_length`` to T5 only, so for
encoders 1 and 2 it must be 77, and for encoder 3 it is the pipeline's ``max_sequence_length`` (default 77
here, as in the original project; the pipeline's own default is 256; the joined sequence is 77 + L tokens).
Its upper bound is the model's own: ``tokenizer_3``'s ``model_max_length`` (512 for SD3 and SD3.5), checked
once the tokenizer is loaded, before anything is written.

The text is the file's content with surrounding whitespace removed; an empty file embeds the empty string (the
README's ``touch empty-prompt/prompt_empty.txt``).

Bytes per example and variant (``--storage-dtype float16``, the default; float32 doubles them), SD3-medium:
CLIP-L 77 x 768 x 2 + 768 x 2 = 117 KiB, CLIP-G 77 x 1280 x 2 + 1280 x 2 = 195 KiB, T5-XXL 77 x 4096 x 2 = 616 KiB;
about 1.8 MiB per example for the three files with two captions (blip2, llama3).

Resumable: an example is done when its file holds every variant found on disk with the same text hash. An
edited or new caption re-embeds only what changed (the other variants are copied from the old file; a
variant's tensors are found by the tensor-name suffix, so variant names with dots such as ``v1.2`` are kept
too). A file made with another model, revision or length is never mixed in: the command stops and names it;
``--overwrite`` recomputes everything. A file that cannot be read (truncated, not safetensors) is recomputed;
a caption that is not UTF-8 stops the run with one line naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.data.records import read_caption
from sd3_lora_celeba.encode.latents import read_metadata_or_none
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_save_safetensors
from sd3_lora_celeba.models.loading import (
    CLIP_MAX_LENGTH,
    DEFAULT_SD3_MODEL,
    SD3_MODEL_ENV,
    TEXT_ENCODER_ALIASES,
    TEXT_ENCODER_NAMES,
    Precision,
    StorageDtype,
    resolve_dtype,
    torch_dtype,
)

log = logging.getLogger(__name__)

FORMAT = "sd3-prompt-embeds/1"
T5_MAX_LENGTH = 512  # StableDiffusion3Pipeline.check_inputs refuses more
PROMPT_EMBEDS = "prompt_embeds"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"
# Metadata that must agree between a cache file and the current command.
SETTINGS_KEYS = ("model_name", "model_revision", "encoder", "max_sequence_length")


def tensor_key(variant: str, name: str) -> str:
    """Key of one tensor in a prompt-embeds file, e.g. ``blip2.prompt_embeds``."""
    return f"{variant}.{name}"


def key_variant(key: str) -> str | None:
    """The variant of a tensor key (``v1.2.prompt_embeds`` -> ``v1.2``), None for a foreign key.

    Split on the *last* dot: the tensor names hold none, variant names may (``prompt_v1.2.txt``).
    """
    variant, _, name = key.rpartition(".")
    return variant if variant and name in (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS) else None


def encoder_index(encoder: str | int) -> int:
    """1, 2 or 3 from a command-line ID (``1``/``clip-l``, ``2``/``clip-g``, ``3``/``t5``)."""
    key = str(encoder).strip().lower()
    if key not in TEXT_ENCODER_ALIASES:
        raise ValueError(f"ENCODER {encoder!r}: use 1 (clip-l), 2 (clip-g) or 3 (t5)")
    return TEXT_ENCODER_ALIASES[key]


@dataclasses.dataclass
class ComputePromptEmbedsConfig:
    """Options of ``sd3 compute-prompt-embeds``."""

    encoder: str = argument("Text encoder: 1 = CLIP-L (clip-l), 2 = CLIP-G (clip-g), 3 = T5-XXL (t5).")
    dataset: Path = argument("Dataset root, one split, any folder below it, or the empty-prompt folder.")
    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 hub id or local diffusers folder.", env=SD3_MODEL_ENV)
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    max_sequence_length: int = option(
        77, "Tokens per prompt (padded/truncated). Must be 77 for CLIP (1, 2); up to 512 for T5 (3)."
    )
    batch_size: int = option(32, "Prompts per encoder call (per process).", min=1)
    precision: Precision = option(
        "float32", "dtype of the encoder weights; float16/bfloat16 halve T5-XXL's 19 GB on a GPU."
    )
    storage_dtype: StorageDtype = option("float16", "dtype of the stored embeddings.")
    overwrite: bool = option(False, "Re-embed every prompt, even those already cached.")

    def __post_init__(self) -> None:
        check_bounds(self)
        index = encoder_index(self.encoder)
        if index < 3 and self.max_sequence_length != CLIP_MAX_LENGTH:
            raise ValueError(
                f"--max-sequence-length {self.max_sequence_length}: CLIP encoders (1, 2) always use "
                f"{CLIP_MAX_LENGTH} tokens, as StableDiffusion3Pipeline does; it only changes T5 (3)"
            )
        if not 1 <= self.max_sequence_length <= T5_MAX_LENGTH:
            raise ValueError(
                f"--max-sequence-length {self.max_sequence_length}: must be 1 to {T5_MAX_LENGTH}"
            )
        if not self.model_name:
            raise ValueError(f"--model-name is empty: give a hub id or a folder (or set {SD3_MODEL_ENV})")

    @property
    def encoder_index(self) -> int:
        return encoder_index(self.encoder)


# --- prompts and cache files -----------------------------------------------------------------------------


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_prompts(example_dir: Path) -> dict[str, str]:
    """Every ``prompt_<variant>.txt`` of a folder: variant -> text (stripped), sorted by variant."""
    prompts = {}
    for path in sorted(Path(example_dir).iterdir()):
        variant = layout.prompt_variant(path)
        if variant is not None and path.is_file():
            prompts[variant] = read_caption(path)  # one line naming the file if it is not UTF-8
    return prompts


def cached_text_hashes(meta: dict[str, str]) -> dict[str, str]:
    """variant -> sha256 of the text embedded, from a prompt-embeds file's metadata."""
    try:
        return dict(json.loads(meta.get("text_sha256", "{}")))
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}


def check_cache_settings(path: Path, meta: dict[str, str], settings: dict[str, str], fix: str) -> None:
    """InputError naming ``path`` when its metadata disagrees with ``settings`` (a subset of SETTINGS_KEYS)."""
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a prompt-embeds cache (format {meta.get('format')!r}); {fix}")
    for key, expected in settings.items():
        if meta.get(key) != expected:
            raise InputError(f"{path}: made with {key}={meta.get(key)!r}, expected {expected!r}; {fix}")


def stale_variants(
    example_dir: Path,
    settings: dict[str, str],
    overwrite: bool = False,
    prompts: dict[str, str] | None = None,
) -> dict[str, str]:
    """Prompts of ``example_dir`` that need embedding: variant -> text (all of them with ``overwrite``)."""
    prompts = read_prompts(example_dir) if prompts is None else prompts
    path = example_dir / layout.prompt_embeds_file(int(settings["encoder"]))
    if overwrite or not path.is_file():
        return prompts
    meta = read_metadata_or_none(path, f"compute-prompt-embeds {settings['encoder']}")
    if meta is None:  # unreadable: embed every variant again
        return prompts
    check_cache_settings(
        path,
        meta,
        settings,
        "re-run with --overwrite to recompute every example, or use the model and length it was made with",
    )
    hashes = cached_text_hashes(meta)
    return {v: text for v, text in prompts.items() if hashes.get(v) != text_sha256(text)}


# --- encoding --------------------------------------------------------------------------------------------


@torch.inference_mode()
def encode_prompts(
    text_encoder, tokenizer, prompts: list[str], *, encoder: int, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds (B, L, D), pooled_prompt_embeds (B, P) or None for T5), as the SD3 pipeline does."""
    # CLIP: the pipeline pads to the tokenizer's own length (77); T5: to max_sequence_length.
    max_length = tokenizer.model_max_length if encoder < 3 else max_sequence_length
    text_inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    input_ids = text_inputs.input_ids.to(text_encoder.device)  # (B, L)
    if encoder == 3:
        return text_encoder(input_ids)[0], None  # (B, L, 4096)
    outputs = text_encoder(input_ids, output_hidden_states=True)
    # SD3 conditions on the penultimate layer (clip_skip=None), and pools with the text projection.
    return outputs.hidden_states[-2], outputs[0]  # (B, 77, D), (B, P)


def count_truncated(tokenizer, prompts: list[str], max_length: int) -> int:
    """How many prompts are longer than ``max_length`` tokens (the pipeline cuts them off the same way)."""
    # Truncated at max_length + 1: enough to tell, and no "longer than the specified maximum" warning.
    ids = tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=max_length + 1).input_ids
    return sum(len(row) > max_length for row in ids)


def check_t5_length(tokenizer, max_sequence_length: int, model_name: str) -> None:
    """Refuse a ``--max-sequence-length`` beyond what the model's T5 tokenizer (``tokenizer_3``) takes."""
    limit = min(T5_MAX_LENGTH, int(tokenizer.model_max_length))
    if max_sequence_length > limit:
        raise InputError(
            f"--max-sequence-length {max_sequence_length}: {model_name}'s T5 tokenizer takes at most {limit} "
            f"tokens (tokenizer_3 model_max_length); use {limit} or less"
        )


def _existing_tensors(path: Path, keep: set[str]) -> dict[str, torch.Tensor]:
    """Tensors of the variants in ``keep`` from an existing cache file (to rewrite it with new variants)."""
    from safetensors import safe_open

    if not path.is_file() or not keep:
        return {}
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key_variant(key) in keep:
                tensors[key] = f.get_tensor(key)
    return tensors


def compute_prompt_embeds(config: ComputePromptEmbedsConfig) -> dict[str, int]:
    """Embed the new or changed prompts of this process's examples with one text encoder; returns counts."""
    encoder = config.encoder_index
    what = f"compute-prompt-embeds {encoder} ({TEXT_ENCODER_NAMES[encoder]})"
    dataset = Path(config.dataset)
    if not dataset.is_dir():
        raise InputError(f"{dataset}: folder not found; pass the dataset root, a split or an example folder")
    found = layout.find_example_dirs(dataset)
    example_dirs = [d for d in found if read_prompts(d)]
    if len(example_dirs) < len(found):
        log.warning(
            "%s: %d example folder(s) have no prompt_*.txt yet; they are skipped",
            what,
            len(found) - len(example_dirs),
        )
    if not example_dirs:
        raise InputError(
            f"{dataset}: no prompt_*.txt file at or below it; run caption-blip2 / caption-llama3 first "
            "(or, for the empty prompt, touch empty-prompt/prompt_empty.txt)"
        )
    settings = {
        "model_name": config.model_name,
        "model_revision": config.model_revision or "",
        "encoder": str(encoder),
        "max_sequence_length": str(CLIP_MAX_LENGTH if encoder < 3 else config.max_sequence_length),
    }
    with parallel.stage_lock(
        dataset, f"compute-prompt-embeds-{encoder}", f"{what} {dataset}", processes=True
    ):
        written, embedded, truncated = _embed_pending(config, example_dirs, settings, what)
    max_length = int(settings["max_sequence_length"])
    if truncated:
        log.warning(
            "%s: %d prompt(s) longer than %d tokens were truncated, as StableDiffusion3Pipeline does%s",
            what,
            truncated,
            max_length,
            "" if encoder < 3 else "; raise --max-sequence-length to keep more of them",
        )
    return {"examples": len(example_dirs), "written": written, "embedded": embedded}


def _embed_pending(
    config: ComputePromptEmbedsConfig, example_dirs: list[Path], settings: dict[str, str], what: str
) -> tuple[int, int, int]:
    """Embed this process's pending prompts; return (files written, prompts embedded, prompts truncated)."""
    from sd3_lora_celeba.models.loading import load_text_encoder

    encoder = int(settings["encoder"])
    state = parallel.process_state()
    pending = parallel.pending_for_this_process(
        example_dirs, lambda d: not stale_variants(d, settings), overwrite=config.overwrite, what=what
    )
    # Every process must finish its is_done scan before any writes, or the shards would disagree.
    state.wait_for_everyone()
    written = embedded = truncated = 0
    max_length = int(settings["max_sequence_length"])
    if pending:
        text_encoder, tokenizer = load_text_encoder(
            encoder, config.model_name, config.model_revision, resolve_dtype(config.precision, state.device)
        )
        if encoder == 3:
            check_t5_length(tokenizer, config.max_sequence_length, config.model_name)
        text_encoder = text_encoder.to(state.device)
        storage = torch_dtype(config.storage_dtype)
        file_name = layout.prompt_embeds_file(encoder)
        with parallel.progress(len(pending), desc=what) as bar:
            # Examples in groups of --batch-size; their prompts are encoded --batch-size at a time.
            for group in parallel.batched(pending, config.batch_size):
                prompts = {d: read_prompts(d) for d in group}
                todo = [(d, stale_variants(d, settings, config.overwrite, prompts[d])) for d in group]
                items = [(d, v, text) for d, stale in todo for v, text in stale.items()]
                new: dict[Path, dict[str, torch.Tensor]] = {d: {} for d in group}
                for chunk in parallel.batched(items, config.batch_size):
                    prompt_embeds, pooled = encode_prompts(
                        text_encoder,
                        tokenizer,
                        [text for _, _, text in chunk],
                        encoder=encoder,
                        max_sequence_length=config.max_sequence_length,
                    )
                    for j, (d, variant, _) in enumerate(chunk):
                        new[d][tensor_key(variant, PROMPT_EMBEDS)] = prompt_embeds[j].to("cpu", storage)
                        if pooled is not None:
                            new[d][tensor_key(variant, POOLED_PROMPT_EMBEDS)] = pooled[j].to("cpu", storage)
                    embedded += len(chunk)
                    truncated += count_truncated(tokenizer, [text for _, _, text in chunk], max_length)
                for d, stale in todo:
                    # Unchanged variants are copied from the old file; prompt files deleted since are dropped.
                    kept = set(prompts[d]) - set(stale)
                    old = {k: v.to(storage) for k, v in _existing_tensors(d / file_name, kept).items()}
                    tensors = {**old, **new[d]}
                    hashes = {v: text_sha256(text) for v, text in stale.items()}
                    hashes.update({v: text_sha256(prompts[d][v]) for v in kept})
                    meta = {
                        "format": FORMAT,
                        **settings,
                        "storage_dtype": config.storage_dtype,
                        "precision": config.precision,
                        "text_sha256": json.dumps(hashes, sort_keys=True),
                    }
                    atomic_save_safetensors(d / file_name, tensors, meta)
                    written += 1
                bar.update(len(group))
    log.info(
        "%s: process %d of %d wrote %d file(s), %d prompt(s) embedded",
        what,
        state.process_index,
        state.num_processes,
        written,
        embedded,
    )
    return written, embedded, truncated
