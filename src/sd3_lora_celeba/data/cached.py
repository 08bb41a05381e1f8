"""The cached training dataset: latents and the three prompt embeddings of each example, joined by example id.

Each sample is built from the files of ONE example folder (``latent_dist.safetensors`` and
``prompt_embeds_{1,2,3}.safetensors``, see :mod:`sd3_lora_celeba.layout`), so latents and captions can never be
paired by loop position (the bug of the diffusers SD3 LoRA script, diffusers issue 14430).

Joining follows ``StableDiffusion3Pipeline.encode_prompt``::

    clip = cat([CLIP-L (77, 768), CLIP-G (77, 1280)], -1)      # (77, 2048)
    prompt_embeds = cat([pad(clip, to 4096), T5 (L, 4096)], -2)  # (77 + L, 4096)
    pooled_prompt_embeds = cat([CLIP-L (768), CLIP-G (1280)])   # (2048,)

Every random choice of a sample (flip, latent noise, caption variant, caption dropout) comes from a generator
seeded with the sample seed of the item ``(index, sample_seed)``, so a sampler yielding such pairs makes the
data stream reproducible whatever the worker count or loader order. With a ``noise_draw`` (training), the
sample's diffusion noise and noise level are drawn there too, in the loader workers.

Every cache is checked once, when the dataset is built (model, sizes, variants, caption hashes); items then
read only the tensors they need and keep the prompt embeddings in their storage dtype (cast on the device).
In the training loader's workers (:class:`PackedInWorkers`) each sample is written straight into its row of
the worker's shared batch buffer (:class:`PackedBatch`), so no sample tensor is made only to be copied.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sd3_lora_celeba import layout
from sd3_lora_celeba.data.records import read_attributes
from sd3_lora_celeba.encode import latents as latent_cache
from sd3_lora_celeba.encode import prompts as prompt_cache
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.layout import EMPTY_VARIANT

log = logging.getLogger(__name__)

ENCODERS = (1, 2, 3)


_OVERWRITE_HINT = " (add --overwrite to redo the files made with other settings)"


def _compute_latents_fix(example_dir: Path, overwrite_hint: bool = True) -> str:
    return f"run sd3 compute-latent-dist {example_dir.parent}" + (_OVERWRITE_HINT if overwrite_hint else "")


def _compute_prompts_fix(encoder: int, example_dir: Path, overwrite_hint: bool = True) -> str:
    # The empty-prompt folder is its own target (README: sd3 compute-prompt-embeds N .../empty-prompt).
    target = example_dir if example_dir.name == layout.EMPTY_PROMPT_DIR else example_dir.parent
    return f"run sd3 compute-prompt-embeds {encoder} {target}" + (_OVERWRITE_HINT if overwrite_hint else "")


@dataclass(frozen=True)
class _PromptCacheInfo:
    path: Path
    meta: dict[str, str]
    keys: frozenset[str]
    tensors: dict[str, Tensor]  # those of ``load_variant`` (if asked for and present), else empty


def _prompt_cache_info(example_dir: Path, encoder: int, load_variant: str | None = None) -> _PromptCacheInfo:
    """Header (metadata, tensor names) of one prompt-embeds file, and the tensors of ``load_variant`` read in
    the same open (one open per file and sample); InputError naming the fix when the file is missing."""
    from safetensors import safe_open

    path = example_dir / layout.prompt_embeds_file(encoder)
    if not path.is_file():
        raise InputError(
            f"{example_dir.name}: {path} is missing; {_compute_prompts_fix(encoder, example_dir, False)}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = dict(f.metadata() or {}), frozenset(f.keys())
            prefix = f"{load_variant}."
            tensors = {
                k[len(prefix) :]: f.get_tensor(k) for k in keys if load_variant and k.startswith(prefix)
            }
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise InputError(
            f"{example_dir.name}: {path} is unreadable ({exc}); delete it and run the command again"
        ) from None
    if meta.get("format") != prompt_cache.FORMAT:
        raise InputError(
            f"{example_dir.name}: {path} is not a prompt-embeds cache; delete it and run the command again"
        )
    return _PromptCacheInfo(path, meta, keys, tensors)


def _check_prompt_caches(
    example_dir: Path,
    variants: Sequence[str],
    *,
    model_name: str | None,
    model_revision: str | None,
    max_sequence_length: int | None,
    load_variant: str | None = None,
) -> dict[int, _PromptCacheInfo]:
    """The three prompt caches of an example, checked: present, same model, T5 length, variants, fresh text."""
    infos = {i: _prompt_cache_info(example_dir, i, load_variant) for i in ENCODERS}
    first = infos[1].meta
    want_model = model_name if model_name is not None else first.get("model_name")
    want_revision = model_revision if model_revision is not None else first.get("model_revision", "")
    for i, info in infos.items():
        for key, want in (("model_name", want_model), ("model_revision", want_revision)):
            if info.meta.get(key) != want:
                raise InputError(
                    f"{example_dir.name}: {info.path} was made with {key}={info.meta.get(key)!r}, expected {want!r}; "
                    f"{_compute_prompts_fix(i, example_dir)}"
                )
    t5_length = infos[3].meta.get("max_sequence_length")
    if max_sequence_length is not None and t5_length != str(max_sequence_length):
        raise InputError(
            f"{example_dir.name}: {infos[3].path} was made with max_sequence_length={t5_length}, expected "
            f"{max_sequence_length}; run sd3 compute-prompt-embeds 3 {example_dir.parent} --overwrite "
            f"--max-sequence-length {max_sequence_length}"
        )
    for variant in variants:
        for i, info in infos.items():
            if prompt_cache.tensor_key(variant, prompt_cache.PROMPT_EMBEDS) not in info.keys:
                raise InputError(
                    f"{example_dir.name}: {info.path} lacks prompt variant '{variant}'; "
                    f"{_compute_prompts_fix(i, example_dir)}"
                )
        # An edited caption whose cache was not refreshed would train on the old text.
        prompt_path = example_dir / layout.prompt_file(variant)
        if prompt_path.is_file():
            digest = prompt_cache.text_sha256(prompt_path.read_text(encoding="utf-8").strip())
            for i, info in infos.items():
                if prompt_cache.cached_text_hashes(info.meta).get(variant) != digest:
                    raise InputError(
                        f"{example_dir.name}: {prompt_path} changed after {info.path} was made; "
                        f"run sd3 compute-prompt-embeds {i} {example_dir.parent}"
                    )
    return infos


def load_joined_prompt_embeds(
    example_dir: Path,
    variant: str,
    *,
    model_name: str | None = None,
    max_sequence_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(prompt_embeds (77+L, D_t5), pooled_prompt_embeds (P_l + P_g,)) exactly as
    ``StableDiffusion3Pipeline.encode_prompt`` would give (batch dim removed), in float32.

    Raises :class:`InputError` naming the example, the file and the fix when a cache is missing, lacks the
    variant, holds embeddings of an older version of the caption, or was made with another model / T5 length
    (when ``model_name`` / ``max_sequence_length`` are given; the three files must always agree on the model).
    """
    example_dir = Path(example_dir)
    infos = _check_prompt_caches(
        example_dir,
        [variant],
        model_name=model_name,
        model_revision=None,
        max_sequence_length=max_sequence_length,
        load_variant=variant,
    )
    embeds = {i: info.tensors[prompt_cache.PROMPT_EMBEDS].float() for i, info in infos.items()}
    pooled = {i: infos[i].tensors[prompt_cache.POOLED_PROMPT_EMBEDS].float() for i in (1, 2)}
    return join_prompt_embeds(embeds, pooled)


def join_prompt_embeds(
    embeds: dict[int, Tensor],
    pooled: dict[int, Tensor],
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Join the per-encoder embeddings ``{1: CLIP-L, 2: CLIP-G, 3: T5}`` and pooled ``{1, 2}`` as
    ``encode_prompt`` does; keeps their dtype (the cache's storage dtype). ``out``: the two tensors to write the
    result into (a batch row, say), of any floating dtype; each part is then copied once."""
    clip_tokens, width_l, width_g = embeds[1].shape[-2], embeds[1].shape[-1], embeds[2].shape[-1]
    if out is None:
        out = tuple(torch.empty(shape, dtype=dtype) for dtype, shape in _joined_specs(embeds, pooled))
    prompt_embeds, pooled_prompt_embeds = out
    clip = prompt_embeds[:clip_tokens]  # (77, D_t5): CLIP-L, CLIP-G, zeros (encode_prompt's padding)
    clip[:, :width_l].copy_(embeds[1])
    clip[:, width_l : width_l + width_g].copy_(embeds[2])
    clip[:, width_l + width_g :].zero_()
    prompt_embeds[clip_tokens:].copy_(embeds[3])  # (L, D_t5)
    pooled_prompt_embeds[: pooled[1].shape[-1]].copy_(pooled[1])
    pooled_prompt_embeds[pooled[1].shape[-1] :].copy_(pooled[2])
    return prompt_embeds, pooled_prompt_embeds


def _joined_specs(
    embeds: dict[int, Tensor], pooled: dict[int, Tensor]
) -> tuple[tuple[torch.dtype, tuple[int, ...]], tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of the prompt embeddings and of the pooled embeddings :func:`join_prompt_embeds` makes
    from these parts: the dtype ``torch.cat`` would give."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in embeds.values()])
    shape = (embeds[1].shape[-2] + embeds[3].shape[-2], embeds[3].shape[-1])  # (77 + L, D_t5)
    pooled_dtype = torch.promote_types(pooled[1].dtype, pooled[2].dtype)
    return (dtype, shape), (pooled_dtype, (pooled[1].shape[-1] + pooled[2].shape[-1],))


def _read_joined_unchecked(example_dir: Path, variant: str) -> tuple[Tensor, Tensor]:
    """The joined embeddings of a variant whose caches the dataset already checked: three opens, no metadata
    parsing, no caption hashing; storage dtype."""
    return join_prompt_embeds(*_read_parts_unchecked(example_dir, variant))


def _read_parts_unchecked(example_dir: Path, variant: str) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """The per-encoder embeddings and pooled embeddings of :func:`_read_joined_unchecked`, not yet joined."""
    from safetensors import safe_open

    embeds, pooled = {}, {}
    for i in ENCODERS:
        path = example_dir / layout.prompt_embeds_file(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                embeds[i] = f.get_tensor(prompt_cache.tensor_key(variant, prompt_cache.PROMPT_EMBEDS))
                if i != 3:
                    pooled[i] = f.get_tensor(
                        prompt_cache.tensor_key(variant, prompt_cache.POOLED_PROMPT_EMBEDS)
                    )
        except Exception as exc:  # noqa: BLE001 - replaced or truncated while training
            raise InputError(
                f"{example_dir.name}: {path} became unreadable during training ({exc}); "
                f"{_compute_prompts_fix(i, example_dir)}"
            ) from None
    return embeds, pooled


def _read_attributes(example_dir: Path) -> np.ndarray:
    """The 40 CelebA attributes of ``example.json`` (``records.read_attributes``) in release order; zeros
    when there is no record."""
    attributes = read_attributes(example_dir, missing_ok=True)
    return np.array([attributes.get(name, False) for name in layout.ATTRIBUTES], dtype=bool)


def _check_latent_caches(dirs: list[Path], model_name: str | None) -> dict[str, str]:
    """Latent caches: present, same model / image size / factors everywhere; returns those settings."""
    expect: dict[str, str] = {}
    if model_name is not None:
        expect["model_name"] = model_name
    for d in dirs:
        path = d / layout.LATENT_DIST
        if not path.is_file():
            raise InputError(f"{d.name}: {path} is missing; {_compute_latents_fix(d, False)}")
        meta = latent_cache.read_metadata(path)
        if meta.get("format") != latent_cache.FORMAT:
            raise InputError(f"{d.name}: {path} is not a latent cache; {_compute_latents_fix(d)}")
        for key in ("model_name", "model_revision", "image_size", "shift_factor", "scaling_factor"):
            expect.setdefault(key, meta.get(key, ""))
            if meta.get(key, "") != expect[key]:
                raise InputError(
                    f"{d.name}: {path} was made with {key}={meta.get(key)!r} but other caches (or the "
                    f"requested model) use {expect[key]!r}; {_compute_latents_fix(d)}"
                )
    return expect


@dataclass
class _Read:
    """A sample's random choices and tensors as read from its caches, before its batch tensors are computed."""

    index: int
    sample_seed: int
    generator: torch.Generator  # the sample's stream, after the choices
    mean: Tensor  # (16, H/8, W/8), storage dtype
    logvar: Tensor
    variant: str
    prompt: tuple[dict[int, Tensor], dict[int, Tensor]] | None  # per-encoder parts; None: the empty prompt
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # each tensor of the sample: dtype and shape


class CachedLatentsDataset(torch.utils.data.Dataset):
    """Training samples from the caches of every example folder below ``root``.

    ``variants``: caption variants to draw from (uniformly, per sample); None = every variant present in each
    example except ``empty``. ``caption_dropout``: probability of replacing the caption by the empty prompt
    of ``empty_prompt_dir`` (classifier-free guidance training). ``random_flip``: use the flipped image's
    latents half of the time. ``model_name`` / ``max_sequence_length``: expected model and T5 length (checked
    against every cache); None = whatever the caches agree on.

    Construction reads only file headers and captions, and fails with a message naming the example and the
    command to run when a cache is missing, stale, or disagrees with the others. Items are loaded lazily.
    """

    def __init__(
        self,
        root: Path,
        empty_prompt_dir: Path,
        *,
        variants: Sequence[str] | None = None,
        caption_dropout: float = 0.0,
        random_flip: bool = True,
        model_name: str | None = None,
        max_sequence_length: int | None = None,
        noise_draw: Callable[..., dict[str, Tensor]] | None = None,  # (sample seed, shape, out=)
    ) -> None:
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout {caption_dropout}: must be between 0 and 1")
        root, empty_prompt_dir = Path(root), Path(empty_prompt_dir)
        if not root.is_dir():
            raise InputError(
                f"{root}: dataset folder not found; pass a split folder such as /path/to/dataset/train"
            )
        if not (empty_prompt_dir / layout.prompt_file(EMPTY_VARIANT)).is_file():
            raise InputError(
                f"{empty_prompt_dir / layout.prompt_file(EMPTY_VARIANT)}: not found; create it with "
                f"mkdir {empty_prompt_dir}; touch {empty_prompt_dir / layout.prompt_file(EMPTY_VARIANT)} "
                f"and run sd3 compute-prompt-embeds 1, 2 and 3 on {empty_prompt_dir}"
            )
        empty_resolved = empty_prompt_dir.resolve()
        dirs = [d for d in layout.find_example_dirs(root) if d.resolve() != empty_resolved]
        if not dirs:
            raise InputError(
                f"{root}: no example folder at or below it; pass a split folder of a prepared dataset"
            )
        dirs.sort(key=layout.example_id)
        ids = [layout.example_id(d) for d in dirs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"{root}: example id {dup} appears in two folders; pass a single split")

        self.root = root
        self.example_dirs: list[Path] = dirs
        self.ids: list[str] = ids
        self.caption_dropout = float(caption_dropout)
        self.random_flip = bool(random_flip)
        self.noise_draw = noise_draw

        expect = _check_latent_caches(dirs, model_name)
        self.model_name: str = expect["model_name"]
        self.model_revision: str = expect["model_revision"]
        self.image_size = int(expect["image_size"])
        self.shift_factor = float(expect["shift_factor"])
        self.scaling_factor = float(expect["scaling_factor"])

        # Prompt caches: every needed variant, same model as the latents, same T5 length everywhere.
        self.variants: list[tuple[str, ...]] = []
        self.max_sequence_length = max_sequence_length
        for d in dirs:
            wanted = tuple(variants) if variants is not None else self._present_variants(d)
            if not wanted:
                raise InputError(
                    f"{d.name}: no caption (prompt_*.txt) to train on; run sd3 caption-blip2 {d.parent}"
                )
            infos = _check_prompt_caches(
                d,
                wanted,
                model_name=self.model_name,
                model_revision=self.model_revision,
                max_sequence_length=self.max_sequence_length,
            )
            if self.max_sequence_length is None:
                self.max_sequence_length = int(infos[3].meta["max_sequence_length"])
            self.variants.append(wanted)

        _check_prompt_caches(
            empty_prompt_dir,
            [EMPTY_VARIANT],
            model_name=self.model_name,
            model_revision=self.model_revision,
            max_sequence_length=self.max_sequence_length,
        )
        self.empty_prompt_embeds, self.empty_pooled_prompt_embeds = _read_joined_unchecked(
            empty_prompt_dir, EMPTY_VARIANT
        )  # (77 + L, D), (P,), storage dtype
        self.empty_prompt_dir = empty_prompt_dir
        self.attributes: np.ndarray = np.stack([_read_attributes(d) for d in dirs])  # (N, 40) bool
        log.info(
            "cached dataset %s: %d examples, %d px, model %s, T5 length %d",
            root,
            len(dirs),
            self.image_size,
            self.model_name,
            self.max_sequence_length,
        )

    @staticmethod
    def _present_variants(example_dir: Path) -> tuple[str, ...]:
        """Caption variants of an example: its prompt files, or (captions deleted) its CLIP-L cache's variants."""
        found = [v for p in example_dir.iterdir() if (v := layout.prompt_variant(p)) is not None]
        if not found:
            meta = _prompt_cache_info(example_dir, 1).meta
            found = list(prompt_cache.cached_text_hashes(meta))
        return tuple(sorted(v for v in found if v != EMPTY_VARIANT))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        drawn = self._read(item)
        return self._fill(
            drawn, {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape) in drawn.specs.items()}
        )

    def packed_batch(self, items: Sequence[int | tuple[int, int]]) -> PackedBatch:
        """The batch of ``items`` as :func:`collate_packed` gives it in a loader worker, but each sample is
        written straight into its row of the worker's shared buffer: no per-sample tensors to copy in."""
        drawn = [self._read(item) for item in items]
        specs = {
            key: (_batch_dtype([d.specs[key][0] for d in drawn]), (len(drawn), *shape))  # as collate's
            for key, (_, shape) in drawn[0].specs.items()
        }
        fields = {"id": [self.ids[d.index] for d in drawn], "variant": [d.variant for d in drawn]}
        batch, views = _packed_batch(fields, specs)
        for row, d in enumerate(drawn):
            self._fill(d, {key: view[row] for key, view in views.items()})
        return batch

    def _read(self, item: int | tuple[int, int]) -> _Read:
        """Draw the sample's choices and read its tensors (storage dtype)."""
        from safetensors import safe_open

        index, sample_seed = (item, 0) if isinstance(item, (int, np.integer)) else item
        index, sample_seed = int(index), int(sample_seed)
        example_dir = self.example_dirs[index]
        generator = torch.Generator().manual_seed(sample_seed)
        # Always draw every random number, in a fixed order, so one option never shifts another's stream.
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.random_flip
        choices = self.variants[index]
        variant = choices[int(torch.randint(len(choices), (), generator=generator))]
        dropped = bool(torch.rand((), generator=generator) < self.caption_dropout)

        prefix = "flip_" if flip else ""
        with safe_open(str(example_dir / layout.LATENT_DIST), framework="pt") as f:
            mean = f.get_tensor(prefix + "mean")  # (16, H/8, W/8)
            logvar = f.get_tensor(prefix + "logvar")
        if dropped:
            variant = EMPTY_VARIANT
            prompt = None
            prompt_spec, pooled_spec = (
                (t.dtype, tuple(t.shape)) for t in (self.empty_prompt_embeds, self.empty_pooled_prompt_embeds)
            )
        else:
            prompt = _read_parts_unchecked(example_dir, variant)
            prompt_spec, pooled_spec = _joined_specs(*prompt)
        specs = {
            "latents": (torch.float32, tuple(mean.shape)),
            "prompt_embeds": prompt_spec,
            "pooled_prompt_embeds": pooled_spec,
        }
        if self.noise_draw is not None:
            specs.update(sigmas=(torch.float32, ()), noise=(torch.float32, tuple(mean.shape)))
        return _Read(index, sample_seed, generator, mean, logvar, variant, prompt, specs)

    def _fill(self, drawn: _Read, out: dict[str, Tensor]) -> dict:
        """The sample of ``drawn``, its tensors written into ``out`` (``drawn.specs``' keys and shapes)."""
        eps = torch.randn(drawn.mean.shape, generator=drawn.generator)
        std = drawn.logvar.float().mul_(0.5).exp_()
        latents = torch.addcmul(drawn.mean.float(), std, eps, out=out["latents"])  # a VAE posterior sample
        latents.sub_(self.shift_factor).mul_(self.scaling_factor)  # what the transformer sees
        if drawn.prompt is None:
            out["prompt_embeds"].copy_(self.empty_prompt_embeds)
            out["pooled_prompt_embeds"].copy_(self.empty_pooled_prompt_embeds)
        else:
            join_prompt_embeds(*drawn.prompt, out=(out["prompt_embeds"], out["pooled_prompt_embeds"]))
        sample = {
            "id": self.ids[drawn.index],
            "latents": latents,  # (16, H/8, W/8) float32
            "prompt_embeds": out["prompt_embeds"],  # (77 + L, D), storage dtype
            "pooled_prompt_embeds": out["pooled_prompt_embeds"],  # (P,), storage dtype
            "variant": drawn.variant,
        }
        if self.noise_draw is not None:
            drawn_noise = self.noise_draw(drawn.sample_seed, latents.shape, out=out["noise"])
            out["sigmas"].copy_(drawn_noise["sigmas"])
            sample.update(sigmas=out["sigmas"], noise=drawn_noise["noise"])
        return sample


def _batch_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Caches stored in different dtypes (say a float32 empty prompt among float16 captions) meet in float32."""
    return dtypes[0] if all(d == dtypes[0] for d in dtypes) else torch.float32


def _same_dtype(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` in their :func:`_batch_dtype`."""
    dtype = _batch_dtype([t.dtype for t in tensors])
    return [t.to(dtype) for t in tensors]


def collate(samples: list[dict]) -> dict:
    """Stack a list of samples into a batch; ids and variants stay lists. With a ``noise_draw``, the batch has
    ``noise`` (B, 16, H/8, W/8) and ``sigmas`` (B,) as well."""
    batch = {key: [s[key] for s in samples] for key in ("id", "variant")}
    for key, value in samples[0].items():
        if isinstance(value, Tensor):
            batch[key] = torch.stack(_same_dtype([s[key] for s in samples]))  # latents, embeds, noise, sigmas
    return batch


# A worker's batch buffer starts with a 64-byte header; its first int32 says whether the buffer is in use.
_HEADER_BYTES = 64
_FREE, _IN_USE = 0, 1
# Reusable buffers per worker: the batches a worker can have in flight (prefetch 2, one being pinned, one being
# unpacked). When all are in use (a consumer that never unpacks, say) the worker takes a one-off buffer.
_POOL_SIZE = 4


@dataclass
class _Slot:
    buffer: Tensor
    key: tuple[int, int, int] | None  # (worker pid, nonce, slot) for a pooled buffer; None for a one-off
    sent: bool = False  # the main process has received this buffer (and keeps it mapped)


_pool: list[_Slot] = []  # this worker process's buffers; empty in the main process
_pool_owner: tuple[int, int] | None = None  # (pid, nonce) of the process that owns _pool
_received: dict[tuple[int, int, int], Tensor] = {}  # main process: the pooled buffers of live workers


def _state(buffer: Tensor) -> Tensor:
    return buffer[:4].view(torch.int32)


def _take_slot(nbytes: int) -> _Slot:
    """A shared-memory uint8 buffer of at least ``_HEADER_BYTES + nbytes`` from this worker's pool, marked in use.

    New shared memory costs a page fault per 4 KiB page in the worker (and again where it is read), and
    handing a new buffer over costs a socket connection; a pooled buffer costs neither once the main process
    has it."""
    global _pool, _pool_owner
    if _pool_owner is None or _pool_owner[0] != os.getpid():  # a forked process's pool is its parent's
        _pool, _pool_owner = [], (os.getpid(), int.from_bytes(os.urandom(8), "little"))
    nbytes += _HEADER_BYTES
    free = [slot for slot in _pool if int(_state(slot.buffer)) == _FREE]
    slot = next((slot for slot in free if slot.buffer.numel() >= nbytes), None)
    if slot is None:
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
        if free:  # a free buffer too small for this batch: a larger one takes its place
            slot = free[0]
            slot.buffer, slot.sent = buffer, False
        elif len(_pool) < _POOL_SIZE:
            slot = _Slot(buffer, (*_pool_owner, len(_pool)))
            _pool.append(slot)
        else:
            slot = _Slot(buffer, None)
    _state(slot.buffer).fill_(_IN_USE)
    return slot


def release_exited_worker_buffers() -> None:
    """Drop the main process's references to the batch buffers of loader workers that have exited (called when
    a new worker's first buffer arrives, and by the training loop once its loader is gone)."""
    from sd3_lora_celeba.io import process_alive

    for key in [k for k in _received if not process_alive(k[0])]:
        del _received[key]


class PackedBatch:
    """A batch from a loader worker: ``fields`` (ids, variants) and every tensor in ONE shared-memory buffer.

    A worker hands each tensor to the main process separately (a socket round trip per tensor), which cost more
    than reading the sample; one buffer per batch is one hand-over. The worker reuses its buffers: the first
    batch in a pooled buffer carries it, later ones only its key (the main process keeps the buffers it has
    received, :data:`_received`). The worker refills a buffer only once the main process is done with it:
    :meth:`pin_memory` (the loader's pinning thread, CUDA) copies the batch out and marks it free at once;
    :meth:`unpack` (no pinning) gives views of the buffer and marks it free when the last of them is freed.
    Nothing reads a buffer after it is marked free.
    """

    def __init__(
        self, fields: dict, buffer: Tensor, layout: list, key=None, *, send_buffer=True, shared=True
    ):
        self.fields, self.buffer, self.layout, self.key = fields, buffer, layout, key
        self.send_buffer, self.shared = send_buffer, shared

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not self.send_buffer:
            state["buffer"] = None  # the main process has it under ``key``
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.key is None or not self.shared:
            return
        if self.buffer is None:
            self.buffer = _received[self.key]
        else:
            if self.key[:2] not in {k[:2] for k in _received}:
                release_exited_worker_buffers()  # a new worker: drop the buffers of workers that are gone
            _received[self.key] = self.buffer
        self.send_buffer = True  # pickled again (another process): carry the buffer

    def pin_memory(self, device: object = None) -> PackedBatch:
        if not self.shared:
            return self
        pinned = self.buffer.pin_memory()
        _state(self.buffer).fill_(_FREE)  # the worker may overwrite it from now on
        return PackedBatch(self.fields, pinned, self.layout, shared=False)

    def unpack(self) -> dict:
        """The batch as :func:`collate` gives it, as views of the buffer: no copy. A worker's buffer goes back to
        it once none of the views (nor anything viewing them) is referenced any more."""
        if self.shared:
            self.buffer, self.shared = _lease(self.buffer), False  # unpacked again: the same lease
        out = dict(self.fields)
        for key, dtype, shape, start in self.layout:
            out[key] = _view(self.buffer, dtype, shape, start)
        return out


def _lease(buffer: Tensor) -> Tensor:
    """A new tensor on ``buffer``'s memory that marks the buffer free when the last tensor sharing its storage
    is freed. The storage holds the numpy array it was made from, so the array's finalizer runs exactly then."""
    array = buffer.numpy()
    weakref.finalize(array, _state(buffer).fill_, _FREE).atexit = False
    return torch.frombuffer(array, dtype=torch.uint8)


def collate_packed(samples: list[dict] | PackedBatch) -> dict | PackedBatch:
    """:func:`collate` for loader workers: a :class:`PackedBatch` (one reused shared buffer per batch).
    :func:`unpack` restores the tensors. Outside a worker it is plain :func:`collate`; a batch the dataset
    already packed (:class:`PackedInWorkers`) passes through."""
    if isinstance(samples, PackedBatch):
        return samples
    if torch.utils.data.get_worker_info() is None:
        return collate(samples)
    fields = {key: [s[key] for s in samples] for key in ("id", "variant")}
    stacks = {k: _same_dtype([s[k] for s in samples]) for k, v in samples[0].items() if isinstance(v, Tensor)}
    batch, views = _packed_batch(fields, {k: (t[0].dtype, (len(t), *t[0].shape)) for k, t in stacks.items()})
    for key, tensors in stacks.items():
        torch.stack(tensors, out=views[key])
    return batch


def _packed_batch(
    fields: dict, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]
) -> tuple[PackedBatch, dict[str, Tensor]]:
    """A :class:`PackedBatch` on a buffer of this worker's pool laid out for ``specs`` (key: dtype, shape), and
    the views of the buffer to write each tensor into."""
    layout, offset = [], _HEADER_BYTES
    for key, (dtype, shape) in specs.items():
        layout.append((key, dtype, shape, offset))
        nbytes = math.prod(shape) * dtype.itemsize
        offset += -(-nbytes // 64) * 64  # each tensor 64-byte aligned
    slot = _take_slot(offset - _HEADER_BYTES)
    views = {key: _view(slot.buffer, dtype, shape, start) for key, dtype, shape, start in layout}
    batch = PackedBatch(fields, slot.buffer, layout, slot.key, send_buffer=not slot.sent)
    slot.sent = slot.key is not None
    return batch, views


class PackedInWorkers(torch.utils.data.Dataset):
    """The loader's view of a :class:`CachedLatentsDataset`: in a loader worker, each batch of items is written
    straight into the worker's shared buffer (:meth:`CachedLatentsDataset.packed_batch`), which
    :func:`collate_packed` passes on; in the main process it is the list of samples, as without it."""

    def __init__(self, dataset: CachedLatentsDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        return self.dataset[item]

    def __getitems__(self, items: Sequence[int | tuple[int, int]]) -> list[dict] | PackedBatch:
        if torch.utils.data.get_worker_info() is None:
            return [self.dataset[item] for item in items]
        return self.dataset.packed_batch(items)


def _view(buffer: Tensor, dtype: torch.dtype, shape: tuple[int, ...], start: int) -> Tensor:
    size = math.prod(shape) * dtype.itemsize
    return buffer[start : start + size].view(dtype).view(shape)


def unpack(batch: dict | PackedBatch) -> dict:
    """The batch of :func:`collate_packed` with its tensors back as entries; a plain batch as it is."""
    return batch.unpack() if isinstance(batch, PackedBatch) else batch
