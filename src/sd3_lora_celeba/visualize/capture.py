"""Capture SD3 attention probabilities and features during denoising (no UI).

SD3's MM-DiT runs one *joint* attention per block (``attn``) over ``[image tokens, text tokens]`` (diffusers
``JointAttnProcessor2_0``: image first, then text). The text tokens are the 77 CLIP positions followed by the T5
positions. SD3.5-medium's MMDiT-X blocks (``dual_attention_layers``) add a second, image-only self-attention
(``attn2``); it is captured as a source of its own.

:func:`capture_attention` swaps the processor of the chosen blocks for :class:`CaptureProcessor`, which

* computes the block output with exactly the operations of ``JointAttnProcessor2_0`` (same projections, so peft
  LoRA layers apply, the same ``F.scaled_dot_product_attention`` call), so denoising is unchanged;
* computes only the probabilities the app keeps: image queries -> the *kept* text keys (the prompt's real
  tokens, not padding) and those text queries -> image keys, softmaxed over all keys as in the model, averaged over
  heads, conditional half of a guidance batch only. Image->text rows come from one extra attention call whose
  values are one-hot rows of the kept text keys, so no (N x N) map is materialised where a fused kernel exists;
* keeps, per block, the features NCUT needs (attention outputs, queries, keys, values), summed over steps.

Nothing is read back to the host during denoising (the step counter counts transformer calls: the SD3 pipeline
calls the transformer once per step), so capture does not stall a GPU. :meth:`Capture.result` moves everything to
the CPU once, in float16, as a :class:`CapturedAttention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FEATURE_SOURCES = ("output", "query", "key", "value")
STORE_DTYPE = torch.float16
CPU_SCORE_ELEMENTS = 2**24  # scores computed at once on the CPU (64 MiB in float32)
VALUE_ALIGNMENT = 8  # value width CUDA's memory-efficient attention needs for 16-bit inputs (4 for float32)


@dataclass
class CapturedAttention:
    """Captured maps of one model and one prompt, on the CPU in float16; explored without regenerating.

    ``image_to_text[(block, step)]``: (N_img, K) probability of each image patch for each kept text token;
    ``text_to_image[(block, step)]``: (K, N_img); ``features[(source, block)]``: (N_tokens, D) mean over the
    captured steps, where source is one of :data:`FEATURE_SOURCES`, prefixed ``attn2 `` for the second attention
    of dual blocks (image tokens only), and N_tokens is N_img + K for the joint attention.
    """

    image_to_text: dict[tuple[int, int], torch.Tensor]
    text_to_image: dict[tuple[int, int], torch.Tensor]
    features: dict[tuple[str, int], torch.Tensor]
    grid: tuple[int, int]
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    kept_columns: tuple[int, ...]

    def nbytes(self) -> int:
        tensors = [*self.image_to_text.values(), *self.text_to_image.values(), *self.features.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, blocks: Iterable[int] | None, steps: Iterable[int] | None) -> tuple[tuple, tuple]:
        """The captured blocks and steps among ``blocks`` / ``steps`` (None: all captured); ValueError if none."""
        chosen_blocks = self.blocks if blocks is None else tuple(b for b in self.blocks if b in set(blocks))
        chosen_steps = self.steps if steps is None else tuple(s for s in self.steps if s in set(steps))
        if not chosen_blocks or not chosen_steps:
            raise ValueError(
                f"nothing captured for those blocks/steps: captured blocks {_ranges(self.blocks)}, "
                f"steps {_ranges(self.steps)}; choose among them or capture again"
            )
        return chosen_blocks, chosen_steps

    def mean_map(self, direction: str, blocks=None, steps=None) -> torch.Tensor:
        """Mean over the chosen captured blocks and steps of ``image_to_text`` or ``text_to_image``, float32."""
        table = self.image_to_text if direction == "image_to_text" else self.text_to_image
        chosen_blocks, chosen_steps = self.select(blocks, steps)
        total = sum(table[(b, s)].float() for b in chosen_blocks for s in chosen_steps)
        return total / (len(chosen_blocks) * len(chosen_steps))

    def feature_sources(self) -> list[str]:
        return sorted({source for source, _ in self.features}, key=_source_order)

    def mean_features(self, source: str, blocks=None) -> torch.Tensor:
        """Mean over the chosen captured blocks of one feature source, float32 (N_tokens, D)."""
        chosen = [b for b in (self.blocks if blocks is None else blocks) if (source, b) in self.features]
        if not chosen:
            raise ValueError(f"no {source} features captured for blocks {_ranges(tuple(blocks or ()))}")
        return sum(self.features[(source, b)].float() for b in chosen) / len(chosen)


def _source_order(source: str) -> tuple[int, int]:
    second = source.startswith("attn2 ")
    return int(second), FEATURE_SOURCES.index(source.removeprefix("attn2 "))


def _ranges(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in (*values[1:], None):
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


@dataclass
class Capture:
    """What a :func:`capture_attention` context collects while the pipeline runs (tensors stay on the device)."""

    blocks: tuple[int, ...]
    steps: frozenset[int] | None  # None = every step
    cfg: bool
    kept_columns: tuple[int, ...]
    features: bool = True
    step: int = -1  # index of the denoising step in progress (= transformer calls so far - 1)
    grid: tuple[int, int] | None = None
    steps_seen: list[int] = field(default_factory=list)
    image_to_text: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    text_to_image: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    feature_sums: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _index: torch.Tensor | None = None

    def active(self) -> bool:
        return self.step >= 0 and (self.steps is None or self.step in self.steps)

    def kept_index(self, device: torch.device) -> torch.Tensor:
        if self._index is None or self._index.device != device:
            self._index = torch.tensor(self.kept_columns, dtype=torch.long, device=device)
        return self._index

    def add_features(self, source: str, block: int, value: torch.Tensor) -> None:
        key = (source, block)
        if key in self.feature_sums:
            self.feature_sums[key].add_(value.float())
        else:
            self.feature_sums[key] = value.float().clone()

    def result(self) -> CapturedAttention:
        """Everything captured, moved to the CPU once, in float16 (features: mean over the captured steps)."""
        if self.grid is None or not self.steps_seen:
            raise ValueError("no attention was captured: check the chosen steps and blocks")
        n = len(self.steps_seen)
        return CapturedAttention(
            image_to_text={k: v.to("cpu", STORE_DTYPE) for k, v in self.image_to_text.items()},
            text_to_image={k: v.to("cpu", STORE_DTYPE) for k, v in self.text_to_image.items()},
            features={k: (v / n).to("cpu", STORE_DTYPE) for k, v in self.feature_sums.items()},
            grid=self.grid,
            blocks=self.blocks,
            steps=tuple(self.steps_seen),
            kept_columns=self.kept_columns,
        )


def image_to_text_probabilities(
    query: torch.Tensor, key: torch.Tensor, num_image_tokens: int, kept: torch.Tensor
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) of the image queries, restricted to the kept text keys; mean over heads.

    ``query``/``key``: (B, heads, N_img + N_txt, d). Returns (B, N_img, K) in float32, normalised over all keys.
    On a GPU one fused attention call whose values are the one-hot rows of the kept text keys (zero for every
    other key) returns exactly those probabilities, with no (N x N) map in memory. On the CPU, where that call
    runs unfused, the scores are computed in chunks of queries and only the kept columns are exponentiated.
    """
    if query.device.type == "cuda":
        return one_hot_attention_probabilities(query, key, num_image_tokens, kept)
    b, heads, n, _ = key.shape
    q = query[:, :, :num_image_tokens]
    scale = query.shape[-1] ** -0.5
    key_t = key.float().transpose(-1, -2)
    chunk = max(1, CPU_SCORE_ELEMENTS // (b * heads * n))
    out = []
    for start in range(0, num_image_tokens, chunk):
        scores = q[:, :, start : start + chunk].float() @ key_t * scale  # (B, heads, c, N)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        out.append(torch.exp(scores[..., num_image_tokens + kept] - lse).mean(dim=1))
    return torch.cat(out, dim=1)


def one_hot_attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, num_image_tokens: int, kept: torch.Tensor
) -> torch.Tensor:
    """:func:`image_to_text_probabilities` as one attention call with one-hot values (fused on a GPU).

    The values get zero columns up to a multiple of :data:`VALUE_ALIGNMENT`: CUDA's memory-efficient kernel, the
    fused one that takes values wider than the heads, needs that width (8 for 16-bit inputs), and with any other
    width the call falls back to the math kernel, which holds the whole (N_img x N) score matrix per head."""
    b, heads, n, _ = key.shape
    k = kept.numel()
    width = -(-k // VALUE_ALIGNMENT) * VALUE_ALIGNMENT
    values = torch.zeros(n, width, device=key.device, dtype=query.dtype)
    values[num_image_tokens + kept, torch.arange(k, device=key.device)] = 1
    q = query[:, :, :num_image_tokens]
    probabilities = F.scaled_dot_product_attention(q, key, values.expand(b, heads, n, width))
    return probabilities[..., :k].float().mean(dim=1)  # (B, N_img, K)


def text_to_image_probabilities(
    query: torch.Tensor, key: torch.Tensor, num_image_tokens: int, kept: torch.Tensor
) -> torch.Tensor:
    """softmax over all keys of the kept text queries, image columns only, mean over heads: (B, K, N_img)."""
    q = query[:, :, num_image_tokens + kept].float()  # (B, heads, K, d)
    scores = q @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1)[..., :num_image_tokens].mean(dim=1)


class CaptureProcessor:
    """``JointAttnProcessor2_0`` with a side channel into a :class:`Capture` (joint ``attn`` or ``attn2``)."""

    def __init__(self, capture: Capture, block: int, second: bool = False) -> None:
        self.capture = capture
        self.block = block
        self.second = second  # attn2 of a dual block: image self-attention, no text stream

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
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N_img, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            txt = [
                proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                txt[0] = attn.norm_added_q(txt[0])
            if attn.norm_added_k is not None:
                txt[1] = attn.norm_added_k(txt[1])
            query = torch.cat([query, txt[0]], dim=2)  # (B, heads, N_img + N_txt, d)
            key = torch.cat([key, txt[1]], dim=2)
            value = torch.cat([value, txt[2]], dim=2)

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

        if self.capture.active():
            self._record(
                query, key, value, hidden_states, residual.shape[1], joint=encoder_hidden_states is not None
            )
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    @torch.no_grad()
    def _record(self, query, key, value, output, num_image_tokens: int, joint: bool) -> None:
        capture = self.capture
        batch = query.shape[0]
        # Under classifier-free guidance the pipeline batches [uncond, cond]: keep the conditional half.
        keep = slice(batch // 2, batch) if capture.cfg else slice(0, batch)
        query, key, value, output = query[keep], key[keep], value[keep], output[keep]
        prefix = "attn2 " if self.second else ""
        if joint and not self.second:
            kept = capture.kept_index(query.device)
            at = (self.block, capture.step)
            capture.image_to_text[at] = image_to_text_probabilities(query, key, num_image_tokens, kept)[0]
            capture.text_to_image[at] = text_to_image_probabilities(query, key, num_image_tokens, kept)[0]
        if not capture.features:
            return
        rows = _feature_rows(
            query.shape[2], num_image_tokens, capture.kept_index(query.device) if joint else None
        )
        capture.add_features(prefix + "output", self.block, output[0, :num_image_tokens])
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            # (heads, N, d) -> (N, heads * d), image tokens then the kept text tokens
            flat = tensor[0].transpose(0, 1).reshape(tensor.shape[2], -1)
            capture.add_features(prefix + name, self.block, flat[rows])


def _feature_rows(n: int, num_image_tokens: int, kept: torch.Tensor | None) -> torch.Tensor:
    image = torch.arange(num_image_tokens, device=kept.device if kept is not None else None)
    return image if kept is None else torch.cat([image, num_image_tokens + kept])


def _processor_name(block: int, second: bool = False) -> str:
    return f"transformer_blocks.{block}.{'attn2' if second else 'attn'}.processor"


def dual_blocks(transformer) -> tuple[int, ...]:
    """Blocks with a second image self-attention (SD3.5 MMDiT-X ``dual_attention_layers``)."""
    return tuple(
        i for i, b in enumerate(transformer.transformer_blocks) if getattr(b, "attn2", None) is not None
    )


@contextlib.contextmanager
def capture_attention(
    transformer,
    blocks: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    cfg: bool = True,
    kept_columns: Sequence[int] | None = None,
    features: bool = True,
) -> Iterator[Capture]:
    """Record attention of ``blocks`` (default all) at denoising ``steps`` (default all) of ``transformer``.

    ``kept_columns``: text-token columns to keep (the prompt's real tokens; default all text positions, which
    needs the text length: it is read from the first call). ``cfg``: the transformer is called on ``[uncond,
    cond]`` batches; only the conditional half is kept. A denoising step is one transformer call, counted from 0.
    ``attn2`` of dual blocks is captured too (features only: it has no text tokens). The original processors are
    put back when the context exits, also after an exception.
    """
    num_blocks = len(transformer.transformer_blocks)
    chosen = tuple(range(num_blocks)) if blocks is None else tuple(sorted(set(blocks)))
    bad = [b for b in chosen if not 0 <= b < num_blocks]
    if bad or not chosen:
        raise ValueError(f"blocks {bad or '(none)'}: choose block indices in 0..{num_blocks - 1}")
    capture = Capture(
        blocks=chosen,
        steps=None if steps is None else frozenset(steps),
        cfg=cfg,
        kept_columns=tuple(kept_columns or ()),
        features=features,
    )
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    original = transformer.attn_processors
    duals = set(dual_blocks(transformer))
    targets = [(b, False) for b in chosen] + [(b, True) for b in chosen if b in duals]
    for b, second in targets:
        proc = original[_processor_name(b, second)]
        if type(proc) is not JointAttnProcessor2_0:
            raise ValueError(
                f"block {b} uses {type(proc).__name__}; attention capture needs diffusers' JointAttnProcessor2_0 "
                "(unfuse QKV projections and do not set another attention processor)"
            )
    patch_size = transformer.config.patch_size

    def on_forward(module, args, kwargs) -> None:
        latents = kwargs.get("hidden_states", args[0] if args else None)  # (B, 16, H/8, W/8)
        capture.grid = (latents.shape[-2] // patch_size, latents.shape[-1] // patch_size)
        if not capture.kept_columns:
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            capture.kept_columns = tuple(range(text.shape[1]))
        capture.step += 1  # shapes only: no device -> host copy
        if capture.active():
            capture.steps_seen.append(capture.step)

    replaced = dict(original)
    for b, second in targets:
        replaced[_processor_name(b, second)] = CaptureProcessor(capture, b, second=second)
    hook = transformer.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        transformer.set_attn_processor(replaced)
        yield capture
    finally:
        hook.remove()
        transformer.set_attn_processor(dict(original))  # it pops from the dict it gets
