"""Generate base and LoRA images with the same seed and capture their attention (the app's engine, no UI).

:class:`AttentionExplorer` loads the SD3 pipeline once and every LoRA checkpoint as a named adapter; a LoRA folder
that does not fit is reported in :attr:`AttentionExplorer.errors` and skipped, so the app starts with the rest.
:meth:`AttentionExplorer.generate` encodes the prompt once (LoRA only touches the transformer), then denoises the
same initial noise with the base model and each adapter under :func:`capture_attention`, and returns a
:class:`Generation`: plain images, tensors and token labels, safe to keep in a per-session state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.visualize.capture import AttentionMaps, capture_attention

log = logging.getLogger(__name__)

BASE_NAME = "base"
CLIP_POSITIONS = 77  # CLIP prompt embeddings fill the first 77 text positions, T5 the rest


@dataclass(frozen=True)
class TextToken:
    """One real (non-padding) prompt token and its column among the joint-attention text tokens."""

    column: int  # 0..76: CLIP position; 77..: T5 position 77 + j
    text: str
    encoder: str  # "CLIP" or "T5"

    @property
    def label(self) -> str:
        return f"{self.encoder} {self.text}"


@dataclass
class Generation:
    """One prompt rendered by every model, with the attention each model paid (conditional branch)."""

    prompt: str
    seed: int
    names: list[str]  # model names, base first
    images: list[Image.Image]
    maps: list[AttentionMaps]  # one per model, batch of 1
    tokens: list[TextToken]

    @property
    def grid(self) -> tuple[int, int]:
        return self.maps[0].grid

    def features(self) -> torch.Tensor:
        """Image-token attention outputs of all models, (num_models, N_img, D), for joint NCUT."""
        return torch.cat([m.features for m in self.maps], dim=0)


def parse_indices(text: str, upper: int, what: str) -> tuple[int, ...] | None:
    """Parse ``"0-3, 7"`` into (0, 1, 2, 3, 7); empty or ``all`` means every index (None)."""
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            out.update(range(first, last + 1))
    except ValueError:
        raise ValueError(
            f"{what}: cannot read {text!r}; write indices and ranges such as 0-3,7 or leave empty"
        ) from None
    bad = sorted(i for i in out if not 0 <= i < upper)
    if bad or not out:
        raise ValueError(f"{what}: {bad or 'nothing chosen'} out of range; choose indices in 0..{upper - 1}")
    return tuple(sorted(out))


def _clean(token: str) -> str:
    # CLIP marks word ends with </w>, sentencepiece marks word starts with U+2581.
    return token.replace("</w>", "").replace("\u2581", "") or token


class AttentionExplorer:
    """The base pipeline plus LoRA adapters, and the generation-with-capture used by the app."""

    def __init__(
        self,
        pipe,
        lora_dirs: Sequence[Path] = (),
        device: str | torch.device = "cpu",
        max_sequence_length: int = 256,
        resolution: int | None = None,
    ) -> None:
        from sd3_lora_celeba.models.lora import load_lora_into_pipeline, lora_delta_norms

        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        self.adapters: dict[str, str] = {}  # model name -> adapter name
        self.norms: dict[str, dict[int, float]] = {}
        self.errors: list[str] = []
        self._lock = (
            threading.Lock()
        )  # adapters are switched on the shared pipeline: one generation at a time
        for folder in lora_dirs:
            folder = Path(folder)
            name = self._unique_name(folder)
            adapter = f"lora_{len(self.adapters)}"
            try:
                norms = lora_delta_norms(folder)
                load_lora_into_pipeline(self.pipe, folder, adapter_name=adapter)
            except InputError as exc:
                log.warning("skipping LoRA %s: %s", folder, exc.message)
                self.errors.append(exc.message)
                if adapter in self.pipe.get_list_adapters().get("transformer", []):
                    self.pipe.delete_adapters(adapter)
                continue
            self.adapters[name] = adapter
            self.norms[name] = norms
        if self.adapters:
            self.pipe.disable_lora()

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

    def prompt_tokens(self, prompt: str) -> list[TextToken]:
        """Real tokens of ``prompt`` with their text columns; InputError if it is empty or too long."""
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty; type a prompt")
        tokens: list[TextToken] = []
        clip_ids = self.pipe.tokenizer(prompt, truncation=False).input_ids
        if len(clip_ids) > CLIP_POSITIONS:
            raise InputError(
                f"the prompt is {len(clip_ids)} CLIP tokens long; the limit is {CLIP_POSITIONS} "
                "(start and end tokens included): shorten the prompt"
            )
        for pos, tok in enumerate(self.pipe.tokenizer.convert_ids_to_tokens(clip_ids)):
            tokens.append(TextToken(column=pos, text=_clean(tok), encoder="CLIP"))
        if self.pipe.tokenizer_3 is not None:
            t5_ids = self.pipe.tokenizer_3(prompt, truncation=False).input_ids
            if len(t5_ids) > self.max_sequence_length:
                raise InputError(
                    f"the prompt is {len(t5_ids)} T5 tokens long; the limit is {self.max_sequence_length} "
                    "(--max-sequence-length): shorten the prompt"
                )
            for pos, tok in enumerate(self.pipe.tokenizer_3.convert_ids_to_tokens(t5_ids)):
                tokens.append(TextToken(column=CLIP_POSITIONS + pos, text=_clean(tok), encoder="T5"))
        return tokens

    def _activate(self, name: str) -> None:
        if name == BASE_NAME:
            if self.adapters:
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        self.pipe.set_adapters([self.adapters[name]], adapter_weights=[1.0])

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        seed: int,
        num_inference_steps: int,
        guidance_scale: float,
        blocks: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> Generation:
        """Render ``prompt`` with every model from the same seed; attention of ``blocks`` at ``steps`` (None: all)."""
        tokens = self.prompt_tokens(prompt)
        if num_inference_steps < 1:
            raise InputError("steps: use at least 1 denoising step")
        if steps is not None and max(steps) >= num_inference_steps:
            raise InputError(
                f"capture steps: step {max(steps)} does not exist with {num_inference_steps} denoising steps; "
                f"choose steps in 0..{num_inference_steps - 1}"
            )
        cfg = guidance_scale > 1
        images, maps = [], []
        with self._lock:
            (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = (
                self.pipe.encode_prompt(
                    prompt=prompt,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    do_classifier_free_guidance=cfg,
                    max_sequence_length=self.max_sequence_length,
                )
            )
            try:
                for name in self.model_names:
                    self._activate(name)
                    # A CPU generator makes the initial noise the same on every device and for every model.
                    generator = torch.Generator("cpu").manual_seed(seed)
                    with capture_attention(
                        self.pipe.transformer, blocks=blocks, steps=steps, cfg=cfg
                    ) as capture:
                        out = self.pipe(
                            prompt_embeds=prompt_embeds,
                            negative_prompt_embeds=negative_prompt_embeds,
                            pooled_prompt_embeds=pooled_prompt_embeds,
                            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                            num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale,
                            height=self.resolution,
                            width=self.resolution,
                            generator=generator,
                            max_sequence_length=self.max_sequence_length,
                        )
                    images.append(out.images[0])
                    maps.append(capture.maps())
            finally:
                self._activate(BASE_NAME)
        return Generation(
            prompt=prompt, seed=seed, names=self.model_names, images=images, maps=maps, tokens=tokens
        )
