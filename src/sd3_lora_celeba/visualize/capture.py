"""Capture SD3 joint-attention probabilities and outputs during denoising (no UI).

SD3's MM-DiT runs one *joint* attention per block over the concatenation ``[image tokens, text tokens]``
(diffusers ``JointAttnProcessor2_0``: image first, then text). The text tokens are the 77 CLIP positions (CLIP-L
and CLIP-G share positions; their embeddings sit side by side in the channels) followed by the T5 positions
(``max_sequence_length``). :func:`capture_attention` swaps the processor of the chosen blocks for
:class:`CaptureJointAttnProcessor`, which

* computes the block output with exactly the operations of ``JointAttnProcessor2_0`` (same projections, so peft
  LoRA layers apply, and the same ``F.scaled_dot_product_attention`` call), so denoising is unchanged;
* separately recomputes ``softmax(Q K^T / sqrt(d))`` in chunks of query tokens (the full 4429 x 4429 map of a
  1024 px image never exists at once) and keeps only image->text and text->image probabilities, averaged over
  heads, for the conditional half of a classifier-free-guidance batch;
* keeps the image-stream attention output (after ``to_out``) of the conditional half, the per-token features for
  NCUT.

Everything is accumulated as running sums per block over the chosen denoising steps; :meth:`Capture.maps`
averages over blocks and steps. The original processors are restored when the context exits, error or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_QUERY_CHUNK = 1024


@dataclass
class BlockSums:
    """Running sums of one block over the captured steps (conditional half of the batch only)."""

    image_to_text: torch.Tensor  # (B, N_img, N_txt) probabilities, mean over heads
    text_to_image: torch.Tensor  # (B, N_txt, N_img)
    image_to_image_mass: torch.Tensor  # (B, N_img) probability mass image queries put on image keys
    text_to_text_mass: torch.Tensor  # (B, N_txt)
    features: torch.Tensor  # (B, N_img, D) image-stream attention output
    steps: int = 0


@dataclass
class AttentionMaps:
    """Attention averaged over heads, the chosen blocks and the chosen steps; tensors on the CPU in float32."""

    image_to_text: torch.Tensor  # (B, N_img, N_txt)
    text_to_image: torch.Tensor  # (B, N_txt, N_img)
    image_to_image_mass: torch.Tensor  # (B, N_img); image_to_text.sum(-1) + this == 1
    text_to_text_mass: torch.Tensor  # (B, N_txt); text_to_image.sum(-1) + this == 1
    features: torch.Tensor  # (B, N_img, D)
    grid: tuple[int, int]  # (h, w) patch grid: N_img == h * w, row-major
    blocks: tuple[int, ...]
    steps: tuple[int, ...]


@dataclass
class Capture:
    """What a :func:`capture_attention` context collected; filled while the pipeline runs."""

    blocks: tuple[int, ...]
    steps: frozenset[int] | None  # None = every step
    cfg: bool
    query_chunk: int = DEFAULT_QUERY_CHUNK
    step: int = -1  # index of the denoising step in progress
    grid: tuple[int, int] | None = None
    steps_seen: list[int] = field(default_factory=list)
    sums: dict[int, BlockSums] = field(default_factory=dict)
    _last_timestep: float | None = None

    def active(self) -> bool:
        return self.step >= 0 and (self.steps is None or self.step in self.steps)

    def maps(self, blocks: Iterable[int] | None = None) -> AttentionMaps:
        """Mean over ``blocks`` (default: all captured) and over the captured steps."""
        chosen = tuple(sorted(self.sums if blocks is None else blocks))
        missing = [b for b in chosen if b not in self.sums]
        if not chosen or missing:
            captured = ", ".join(map(str, sorted(self.sums))) or "none"
            raise ValueError(
                f"no attention captured for block(s) {missing or 'any'}; captured blocks: {captured} "
                "(check the chosen steps and blocks)"
            )

        def mean(name: str) -> torch.Tensor:
            total = sum(getattr(self.sums[b], name) / self.sums[b].steps for b in chosen)
            return (total / len(chosen)).float().cpu()

        assert self.grid is not None
        return AttentionMaps(
            image_to_text=mean("image_to_text"),
            text_to_image=mean("text_to_image"),
            image_to_image_mass=mean("image_to_image_mass"),
            text_to_text_mass=mean("text_to_text_mass"),
            features=mean("features"),
            grid=self.grid,
            blocks=chosen,
            steps=tuple(sorted(set(self.steps_seen))),
        )

    def _add(self, block: int, values: dict[str, torch.Tensor]) -> None:
        sums = self.sums.get(block)
        if sums is None:
            self.sums[block] = BlockSums(**{k: v.float().clone() for k, v in values.items()}, steps=1)
            return
        for name, value in values.items():
            getattr(sums, name).add_(value.float())
        sums.steps += 1


def chunked_joint_probabilities(
    query: torch.Tensor, key: torch.Tensor, num_image_tokens: int, chunk: int = DEFAULT_QUERY_CHUNK
) -> dict[str, torch.Tensor]:
    """Image<->text blocks of ``softmax(Q K^T / sqrt(d))`` over all keys, averaged over heads.

    ``query``/``key``: (B, heads, N_img + N_txt, d), image tokens first. Rows are softmaxed over *all* keys (as in
    the joint attention itself) in chunks of ``chunk`` query tokens, in float32 for accuracy whatever the model
    dtype; only the cross-modal parts and the within-modality mass are kept, so memory stays
    O(B * heads * chunk * N) instead of O(B * heads * N^2).
    """
    scale = query.shape[-1] ** -0.5  # the default scale of F.scaled_dot_product_attention
    key = key.float()
    n_img = num_image_tokens
    image_to_text, image_mass, text_to_image, text_mass = [], [], [], []
    for start in range(0, query.shape[2], chunk):
        q = query[:, :, start : start + chunk].float()
        probs = torch.softmax(q @ key.transpose(-1, -2) * scale, dim=-1).mean(dim=1)  # (B, c, N)
        # Split the chunk at the image/text boundary of the query axis.
        split = max(0, min(n_img - start, probs.shape[1]))
        img_rows, txt_rows = probs[:, :split], probs[:, split:]
        image_to_text.append(img_rows[..., n_img:])
        image_mass.append(img_rows[..., :n_img].sum(-1))
        text_to_image.append(txt_rows[..., :n_img])
        text_mass.append(txt_rows[..., n_img:].sum(-1))
    return {
        "image_to_text": torch.cat(image_to_text, dim=1),  # (B, N_img, N_txt)
        "image_to_image_mass": torch.cat(image_mass, dim=1),  # (B, N_img)
        "text_to_image": torch.cat(text_to_image, dim=1),  # (B, N_txt, N_img)
        "text_to_text_mass": torch.cat(text_mass, dim=1),  # (B, N_txt)
    }


class CaptureJointAttnProcessor:
    """``JointAttnProcessor2_0`` with a side channel that records attention into a :class:`Capture`."""

    def __init__(self, capture: Capture, block: int) -> None:
        self.capture = capture
        self.block = block

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # The output path mirrors diffusers' JointAttnProcessor2_0 op for op, so the result is bit-identical.
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N_img, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            txt_query = attn.add_q_proj(encoder_hidden_states)
            txt_key = attn.add_k_proj(encoder_hidden_states)
            txt_value = attn.add_v_proj(encoder_hidden_states)
            txt_query = txt_query.view(batch_size, -1, attn.heads, head_dim).transpose(
                1, 2
            )  # (B, heads, N_txt, d)
            txt_key = txt_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            txt_value = txt_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                txt_query = attn.norm_added_q(txt_query)
            if attn.norm_added_k is not None:
                txt_key = attn.norm_added_k(txt_key)
            query = torch.cat([query, txt_query], dim=2)  # (B, heads, N_img + N_txt, d)
            key = torch.cat([key, txt_key], dim=2)
            value = torch.cat([value, txt_value], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None and self.capture.active():
            self._record(query, key, hidden_states, num_image_tokens=residual.shape[1])

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    @torch.no_grad()
    def _record(
        self, query: torch.Tensor, key: torch.Tensor, output: torch.Tensor, num_image_tokens: int
    ) -> None:
        batch = query.shape[0]
        # Under classifier-free guidance the pipeline batches [uncond, cond]: keep the conditional half.
        keep = slice(batch // 2, batch) if self.capture.cfg else slice(0, batch)
        values = chunked_joint_probabilities(
            query[keep], key[keep], num_image_tokens, chunk=self.capture.query_chunk
        )
        values["features"] = output[keep]  # (B_cond, N_img, D)
        self.capture._add(self.block, values)


def _processor_name(block: int) -> str:
    return f"transformer_blocks.{block}.attn.processor"


@contextlib.contextmanager
def capture_attention(
    transformer,
    blocks: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    cfg: bool = True,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> Iterator[Capture]:
    """Record joint attention of ``blocks`` (default all) at denoising ``steps`` (default all) of ``transformer``.

    ``cfg``: the transformer is called on ``[uncond, cond]`` batches (the pipeline's guidance_scale > 1); only the
    conditional half is kept. A denoising step is one distinct timestep passed to the transformer, counted from 0.
    The original attention processors are put back when the context exits, also after an exception.
    """
    num_blocks = len(transformer.transformer_blocks)
    chosen = tuple(range(num_blocks)) if blocks is None else tuple(sorted(set(blocks)))
    bad = [b for b in chosen if not 0 <= b < num_blocks]
    if bad or not chosen:
        raise ValueError(f"blocks {bad or '(none)'}: choose block indices in 0..{num_blocks - 1}")
    capture = Capture(
        blocks=chosen, steps=None if steps is None else frozenset(steps), cfg=cfg, query_chunk=query_chunk
    )
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    original = transformer.attn_processors
    for b in chosen:
        proc = original[_processor_name(b)]
        if type(proc) is not JointAttnProcessor2_0:
            raise ValueError(
                f"block {b} uses {type(proc).__name__}; attention capture needs diffusers' JointAttnProcessor2_0 "
                "(unfuse QKV projections and do not set another attention processor)"
            )
    patch_size = transformer.config.patch_size

    def on_forward(module, args, kwargs) -> None:
        latents = kwargs.get("hidden_states", args[0] if args else None)  # (B, 16, H/8, W/8)
        timestep = kwargs.get("timestep", args[3] if len(args) > 3 else None)
        capture.grid = (latents.shape[-2] // patch_size, latents.shape[-1] // patch_size)
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if t != capture._last_timestep:
            capture._last_timestep = t
            capture.step += 1
            if capture.active():
                capture.steps_seen.append(capture.step)

    replaced = dict(original)
    for b in chosen:
        replaced[_processor_name(b)] = CaptureJointAttnProcessor(capture, b)
    hook = transformer.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        transformer.set_attn_processor(replaced)
        yield capture
    finally:
        hook.remove()
        transformer.set_attn_processor(dict(original))  # it pops from the dict it gets
