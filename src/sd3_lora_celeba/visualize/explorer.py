"""Generate base and LoRA images with the same seed, capture their attention once, explore it after (no UI).

:class:`AttentionExplorer` loads the SD3 pipeline once and every LoRA checkpoint as a named adapter; a LoRA folder
that does not fit (the first mismatching key and both shapes are named) or cannot be read is reported in
:attr:`AttentionExplorer.errors` and skipped, so the app starts with the rest. :meth:`AttentionExplorer.generate`
renders 1-3 prompts with the base model and each adapter from the same initial noise, capturing the chosen blocks
and steps, and returns a :class:`Generation`: images, captured maps (CPU, float16) and the prompt as *words*
(sub-tokens merged), safe to keep in a per-session state. Choosing other blocks or steps among the captured ones
is a mean over stored maps: no regeneration.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.cpu_linear import use_fast_cpu_linears
from sd3_lora_celeba.models.loading import CLIP_MAX_LENGTH
from sd3_lora_celeba.visualize.capture import CapturedAttention, capture_attention, dual_blocks

log = logging.getLogger(__name__)

BASE_NAME = "base"
CLIP_POSITIONS = CLIP_MAX_LENGTH  # CLIP prompt embeddings fill the first 77 text positions, T5 the rest
MAX_PROMPTS = 3
MAX_SEED = 2**32 - 1
MAX_STEPS = 200
SESSION_BYTES_LIMIT = 3 * 2**30  # captured maps and features kept per browser session
DEFAULT_CAPTURE_BLOCKS = 4  # evenly spread over the middle half of the blocks
DEFAULT_CAPTURE_STEP_STRIDE = 4  # every 4th denoising step, the last one included
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Word:
    """One prompt word: its sub-tokens merged, with their joint-attention text columns."""

    text: str
    encoder: str  # "CLIP" or "T5"
    columns: tuple[int, ...]  # 0..76: CLIP positions; 77 + j: T5 position j


@dataclass
class PromptResult:
    """One prompt rendered by every model."""

    prompt: str
    words: list[Word]
    kept_columns: tuple[int, ...]  # text columns captured (every real token, start/end included)
    images: list[Image.Image]
    captured: list[CapturedAttention]  # one per model

    def kept_index(self, word: Word) -> list[int]:
        position = {c: i for i, c in enumerate(self.kept_columns)}
        return [position[c] for c in word.columns]


@dataclass
class Generation:
    """Every prompt rendered by every model with the attention captured (conditional branch)."""

    seed: int
    names: list[str]  # model names, base first
    prompts: list[PromptResult]
    num_inference_steps: int
    guidance_scale: float
    settings: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return self.prompts[0].captured[0].grid

    @property
    def blocks(self) -> tuple[int, ...]:
        return self.prompts[0].captured[0].blocks

    @property
    def steps(self) -> tuple[int, ...]:
        return self.prompts[0].captured[0].steps

    def nbytes(self) -> int:
        return sum(c.nbytes() for p in self.prompts for c in p.captured)

    def word_maps(
        self, prompt: int, words: Sequence[int], direction: str = "image_to_text", blocks=None, steps=None
    ) -> np.ndarray:
        """(models, h, w) maps of the chosen words (sub-tokens and words summed), float32.

        ``image_to_text``: probability each patch puts on the words; ``text_to_image``: probability the words'
        tokens put on each patch.
        """
        result = self.prompts[prompt]
        index = sorted({i for w in words for i in result.kept_index(result.words[w])})
        if not index:
            raise ValueError("choose at least one word")
        h, w = self.grid
        out = []
        for captured in result.captured:
            table = captured.mean_map(direction, blocks, steps)
            values = table[:, index].sum(-1) if direction == "image_to_text" else table[index].sum(0)
            out.append(values.reshape(h, w).numpy())
        return np.stack(out)

    def word_scores(self, prompt: int, model: int, patch: int | None, blocks=None, steps=None) -> np.ndarray:
        """Attention per word: of the patch ``patch`` (row-major), or the mean over all patches (None)."""
        result = self.prompts[prompt]
        table = result.captured[model].mean_map("image_to_text", blocks, steps)  # (N_img, K)
        row = table.mean(0) if patch is None else table[patch]
        return np.array([float(row[result.kept_index(w)].sum()) for w in result.words])


def entropy(heat: np.ndarray) -> float:
    """Shannon entropy of a map normalised to sum 1, divided by log(N): 0 = one patch, 1 = uniform."""
    p = np.clip(heat.astype(np.float64).ravel(), 0, None)
    total = p.sum()
    if total <= 0 or p.size < 2:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(heat.size))


def parse_indices(text: str, upper: int, what: str) -> tuple[int, ...] | None:
    """Parse ``"0-3, 7"`` into (0, 1, 2, 3, 7); empty or ``all`` means every index (None).

    Bounds are checked on the numbers as written, before any range is built, so ``0-10000000`` is one message.
    """
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    spans: list[tuple[int, int]] = []
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            spans.append((first, last))
    except ValueError:
        raise ValueError(
            f"{what}: cannot read {text[:40]!r}; write indices and ranges such as 0-3,7 or leave empty"
        ) from None
    bad = [f"{a}-{b}" if a != b else str(a) for a, b in spans if not (0 <= a <= b < upper)]
    if bad or not spans:
        shown = ", ".join(bad[:3]) or "nothing chosen"
        raise ValueError(f"{what}: {shown} out of range; choose indices in 0..{upper - 1}")
    return tuple(sorted({i for a, b in spans for i in range(a, b + 1)}))


def pipeline_models(pipe) -> list[torch.nn.Module]:
    """The models of ``pipe`` (text encoders, transformer, VAE): its components that are modules."""
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


def default_capture(num_blocks: int, num_steps: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The app's default capture set, chosen for speed: a few middle blocks, every few steps (last included)."""
    n = min(DEFAULT_CAPTURE_BLOCKS, num_blocks)
    lo, hi = num_blocks / 4, 3 * num_blocks / 4 - 1
    blocks = sorted({min(num_blocks - 1, round(lo + (hi - lo) * i / max(n - 1, 1))) for i in range(n)})
    steps = sorted({*range(num_steps - 1, -1, -DEFAULT_CAPTURE_STEP_STRIDE)})
    return tuple(blocks), tuple(steps)


def words_of(tokens: Sequence[str], encoder: str, offset: int) -> list[Word]:
    """Merge sub-tokens into words: CLIP ends a word with ``</w>``, sentencepiece starts one with U+2581.

    Special tokens (start, end, padding) are left out; punctuation tokens are words of their own.
    """
    words: list[Word] = []
    text, columns = "", []
    for pos, token in enumerate(tokens):
        if token.startswith("<") and token.endswith(">") and "</w>" not in token:
            if columns:
                words.append(Word(text, encoder, tuple(columns)))
            text, columns = "", []
            continue
        piece = token.replace("</w>", "").replace("\u2581", "")
        punctuation = bool(piece) and not any(ch.isalnum() for ch in piece)
        starts = encoder == "T5" and (token.startswith("\u2581") or punctuation)
        if starts and columns:
            words.append(Word(text, encoder, tuple(columns)))
            text, columns = "", []
        text += piece
        columns.append(offset + pos)
        if (encoder == "CLIP" and token.endswith("</w>")) or (encoder == "T5" and punctuation):
            words.append(Word(text, encoder, tuple(columns)))
            text, columns = "", []
    if columns:
        words.append(Word(text, encoder, tuple(columns)))
    return [w for w in words if w.text]


def check_lora_shapes(transformer, path: Path) -> None:
    """InputError naming the first LoRA key whose shape does not fit ``transformer``, with both shapes."""
    from safetensors import safe_open

    modules = dict(transformer.named_modules())
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            name = key.removeprefix("transformer.")
            for part in (".lora_A.", ".lora_B."):
                if part not in name:
                    continue
                module = modules.get(name.split(part)[0])
                shape = tuple(f.get_slice(key).get_shape())
                if module is None or not hasattr(module, "in_features"):
                    raise InputError(
                        f"{path}: LoRA key {key} names no linear layer of this model; "
                        "use a checkpoint trained on the same base model"
                    )
                wanted_dim = module.in_features if part == ".lora_A." else module.out_features
                got_dim = shape[1] if part == ".lora_A." else shape[0]
                if got_dim != wanted_dim:
                    expected = (shape[0], wanted_dim) if part == ".lora_A." else (wanted_dim, shape[1])
                    raise InputError(
                        f"{path}: LoRA does not fit this model: {key} has shape {list(shape)}, the model needs "
                        f"{list(expected)}; use a checkpoint trained on the same base model"
                    )


class AttentionExplorer:
    """The base pipeline plus LoRA adapters, and the generation-with-capture used by the app."""

    def __init__(
        self,
        pipe,
        lora_dirs: Sequence[Path] = (),
        device: str | torch.device = "cpu",
        max_sequence_length: int = 256,
        resolution: int | None = None,
        offload: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.offload = offload
        # With offload every model stays in CPU memory and moves to the device only while it runs.
        self.pipe = pipe if offload else pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cpu":
            # float32 on a CPU: the linears run on oneDNN where it is faster (models/cpu_linear.py), text
            # encoders included
            for model in pipeline_models(pipe):
                use_fast_cpu_linears(model)
        self.max_sequence_length = max_sequence_length
        self.resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        self.adapters: dict[str, str] = {}  # model name -> adapter name
        self.norms: dict[str, dict[int, float]] = {}
        self.errors: list[str] = []
        # adapters are switched on the shared pipeline: one generation at a time
        self._lock = threading.Lock()
        for folder in lora_dirs:
            self._load_lora(Path(folder))
        if self.adapters:
            self.pipe.disable_lora()
        if offload:
            # After the LoRAs: diffusers' LoRA loading re-enables an offload it finds on its own default device.
            # Each pipeline call ends by moving every model back to the CPU and hooking them again, on this device.
            self.pipe.enable_model_cpu_offload(device=self.device)

    def _load_lora(self, folder: Path) -> None:
        from sd3_lora_celeba.models.lora import load_lora_into_pipeline, lora_delta_norms, lora_weights_file

        name = self._unique_name(folder)
        adapter = f"lora_{len(self.adapters)}"
        try:
            path = lora_weights_file(folder)
            try:
                check_lora_shapes(self.pipe.transformer, path)
                norms = lora_delta_norms(folder)
            except InputError:
                raise
            except Exception as exc:  # a truncated or corrupt safetensors file
                raise InputError(
                    f"{path}: cannot read the LoRA file ({type(exc).__name__}: {str(exc)[:120]}); "
                    "it is corrupt or truncated: copy it again or re-run fine-tune"
                ) from None
            load_lora_into_pipeline(self.pipe, folder, adapter_name=adapter)
        except InputError as exc:
            log.warning("skipping LoRA %s: %s", folder, exc.message)
            self.errors.append(exc.message)
            if adapter in self.pipe.get_list_adapters().get("transformer", []):
                self.pipe.delete_adapters(adapter)
            return
        self.adapters[name] = adapter
        self.norms[name] = norms

    def _unique_name(self, folder: Path) -> str:
        # checkpoint-000500 folders of different runs share names: add the run folder when needed.
        name = folder.name or str(folder)
        if name in self.adapters or name == BASE_NAME:
            name = f"{folder.parent.name}/{folder.name}"
        return name

    @property
    def model_names(self) -> list[str]:
        return [BASE_NAME, *self.adapters]

    @property
    def num_blocks(self) -> int:
        return len(self.pipe.transformer.transformer_blocks)

    @property
    def dual_blocks(self) -> tuple[int, ...]:
        return dual_blocks(self.pipe.transformer)

    @property
    def image_tokens(self) -> int:
        side = self.resolution // self.pipe.vae_scale_factor // self.pipe.transformer.config.patch_size
        return side * side

    @property
    def width(self) -> int:
        config = self.pipe.transformer.config
        return config.num_attention_heads * config.attention_head_dim

    def prompt_words(self, prompt: str) -> tuple[list[Word], tuple[int, ...]]:
        """Words of ``prompt`` and the text columns of all its real tokens; InputError if empty or too long."""
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty; type a prompt")
        clip_ids = self.pipe.tokenizer(prompt, truncation=False).input_ids
        if len(clip_ids) > CLIP_POSITIONS:
            raise InputError(
                f"a prompt is {len(clip_ids)} CLIP tokens long; the limit is {CLIP_POSITIONS} "
                "(start and end tokens included): shorten it"
            )
        words = words_of(self.pipe.tokenizer.convert_ids_to_tokens(clip_ids), "CLIP", 0)
        kept = list(range(len(clip_ids)))
        if self.pipe.tokenizer_3 is not None:
            t5_ids = self.pipe.tokenizer_3(prompt, truncation=False).input_ids
            if len(t5_ids) > self.max_sequence_length:
                raise InputError(
                    f"a prompt is {len(t5_ids)} T5 tokens long; the limit is {self.max_sequence_length} "
                    "(--max-sequence-length): shorten it"
                )
            words += words_of(self.pipe.tokenizer_3.convert_ids_to_tokens(t5_ids), "T5", CLIP_POSITIONS)
            kept += [CLIP_POSITIONS + j for j in range(len(t5_ids))]
        return words, tuple(kept)

    def estimate_bytes(self, num_prompts: int, num_words_tokens: int, blocks: int, steps: int) -> int:
        """Session memory of a capture: float16 maps per block and step, features per block and source."""
        n_img = self.image_tokens
        maps = 2 * n_img * num_words_tokens * blocks * steps
        sources = 4 * (1 + (len(self.dual_blocks) > 0))
        features = sources * (n_img + num_words_tokens) * self.width * blocks
        return 2 * (maps + features) * num_prompts * len(self.model_names)

    def _activate(self, name: str) -> None:
        if name == BASE_NAME:
            if self.adapters:
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.adapters[name]], adapter_weights=[1.0])

    def _check(self, prompts, seed, num_inference_steps, blocks, steps):
        prompts = [p for p in prompts if p and p.strip()]
        if not prompts:
            raise InputError("the prompt is empty; type a prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InputError(f"{len(prompts)} prompts: compare at most {MAX_PROMPTS} (one per line)")
        if not 0 <= seed <= MAX_SEED:
            raise InputError(f"seed {seed}: choose a seed in 0..{MAX_SEED}")
        if not 1 <= num_inference_steps <= MAX_STEPS:
            raise InputError(f"denoising steps {num_inference_steps}: use 1..{MAX_STEPS}")
        if steps is not None and max(steps) >= num_inference_steps:
            raise InputError(
                f"capture steps: step {max(steps)} does not exist with {num_inference_steps} denoising steps; "
                f"choose steps in 0..{num_inference_steps - 1}"
            )
        return prompts

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        seed: int,
        num_inference_steps: int,
        guidance_scale: float,
        blocks: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> Generation:
        """Render each prompt with every model from the same seed; capture ``blocks`` at ``steps``.

        None means the default capture set (:func:`default_capture`). ``progress(done, total, what)`` is called
        after every denoising step of every model.
        """
        prompts = self._check(
            [prompts] if isinstance(prompts, str) else list(prompts),
            int(seed),
            int(num_inference_steps),
            blocks,
            steps,
        )
        default_blocks, default_steps = default_capture(self.num_blocks, num_inference_steps)
        blocks = tuple(blocks) if blocks is not None else default_blocks
        steps = tuple(steps) if steps is not None else default_steps
        parsed = [self.prompt_words(p) for p in prompts]
        need = self.estimate_bytes(len(prompts), max(len(k) for _, k in parsed), len(blocks), len(steps))
        if need > SESSION_BYTES_LIMIT:
            raise InputError(
                f"capturing {len(blocks)} blocks x {len(steps)} steps needs about {need / 2**30:.1f} GiB; the "
                f"limit per session is {SESSION_BYTES_LIMIT / 2**30:.0f} GiB: choose fewer blocks or steps"
            )
        cfg = guidance_scale > 1
        total = len(prompts) * len(self.model_names) * num_inference_steps
        results = []
        with self._lock:
            for p_index, (prompt, (words, kept)) in enumerate(zip(prompts, parsed, strict=True)):
                embeds = self.pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    do_classifier_free_guidance=cfg,
                    max_sequence_length=self.max_sequence_length,
                )
                images, captured = [], []
                try:
                    for m_index, name in enumerate(self.model_names):
                        self._activate(name)
                        done = (p_index * len(self.model_names) + m_index) * num_inference_steps
                        image, capture = self._render(
                            embeds,
                            seed,
                            num_inference_steps,
                            guidance_scale,
                            blocks,
                            steps,
                            kept,
                            lambda i, d=done, n=name, p=p_index: (
                                progress and progress(d + i + 1, total, f"prompt {p + 1}, {n}, step {i + 1}")
                            ),
                        )
                        images.append(image)
                        captured.append(capture)
                finally:
                    self._activate(BASE_NAME)
                results.append(PromptResult(prompt, words, kept, images, captured))
        return Generation(
            seed=int(seed),
            names=self.model_names,
            prompts=results,
            num_inference_steps=int(num_inference_steps),
            guidance_scale=float(guidance_scale),
            settings={"num_blocks": self.num_blocks, "resolution": self.resolution},
        )

    def _render(self, embeds, seed, num_steps, guidance, blocks, steps, kept, on_step):
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = embeds
        # A CPU generator makes the initial noise the same on every device and for every model.
        generator = torch.Generator("cpu").manual_seed(int(seed))

        def callback(pipe, i, t, kwargs):
            on_step(i)
            return {}

        with capture_attention(
            self.pipe.transformer, blocks=blocks, steps=steps, cfg=guidance > 1, kept_columns=kept
        ) as capture:
            out = self.pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                num_inference_steps=num_steps,
                guidance_scale=guidance,
                height=self.resolution,
                width=self.resolution,
                generator=generator,
                max_sequence_length=self.max_sequence_length,
                callback_on_step_end=callback,
            )
        return out.images[0], capture.result()
