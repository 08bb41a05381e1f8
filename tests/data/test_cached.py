"""The cached training dataset: joined embeddings equal encode_prompt's, each sample keeps its own latent and
caption under shuffling (diffusers issue 14430), seeded randomness, and clear errors for missing/stale caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd3_lora_celeba import layout
from sd3_lora_celeba.data.cached import CachedLatentsDataset, collate, load_joined_prompt_embeds
from sd3_lora_celeba.encode.latents import ComputeLatentDistConfig, compute_latent_dist
from sd3_lora_celeba.encode.prompts import ComputePromptEmbedsConfig, compute_prompt_embeds
from sd3_lora_celeba.errors import InputError

NUM_EXAMPLES = 6


def caption(i: int, variant: str) -> str:
    return f"{variant} caption of person {i}: {'dark' if i % 2 else 'fair'} hair, {i * 7 % 5} freckles"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd3) -> dict:
    """A train split of distinctive examples with every cache (float32), and the empty-prompt folder."""
    model = tiny_sd3
    root = tmp_path_factory.mktemp("cached") / "dataset"
    rng = np.random.default_rng(0)
    for i in range(NUM_EXAMPLES):
        d = root / "train" / f"hq-{i:05d}"
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / layout.IMAGE, quality=95)
        attributes = {name: bool((i + j) % 3 == 0) for j, name in enumerate(layout.ATTRIBUTES)}
        (d / layout.EXAMPLE_RECORD).write_text(json.dumps({"id": d.name, "attributes": attributes}))
        for variant in ("blip2", "llama3"):
            (d / layout.prompt_file(variant)).write_text(caption(i, variant))
    empty = root / layout.EMPTY_PROMPT_DIR
    empty.mkdir()
    (empty / layout.prompt_file("empty")).touch()
    compute_latent_dist(ComputeLatentDistConfig(dataset=root, model_name=str(model), storage_dtype="float32"))
    for encoder in ("1", "2", "3"):
        for target in (root, empty):
            compute_prompt_embeds(
                ComputePromptEmbedsConfig(
                    encoder=encoder, dataset=target, model_name=str(model), storage_dtype="float32"
                )
            )
    return {"model": model, "root": root, "train": root / "train", "empty": empty}


@pytest.fixture(scope="module")
def pipe(world):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(world["model"])


@pytest.fixture
def world_copy(world, tmp_path) -> dict:
    """A writable copy of the world, for tests that break it."""
    root = tmp_path / "dataset"
    shutil.copytree(world["root"], root)
    return {**world, "root": root, "train": root / "train", "empty": root / layout.EMPTY_PROMPT_DIR}


def encode_prompt(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt, prompt, prompt, do_classifier_free_guidance=False, max_sequence_length=77
        )
    return prompt_embeds[0], pooled_prompt_embeds[0]  # (77 + 77, 64), (48,)


def test_joined_embeddings_equal_encode_prompt(world, pipe):
    cases = [(world["train"] / f"hq-{i:05d}", v, caption(i, v)) for i in (0, 3) for v in ("blip2", "llama3")]
    cases.append((world["empty"], "empty", ""))
    for example_dir, variant, text in cases:
        prompt_embeds, pooled_prompt_embeds = load_joined_prompt_embeds(
            example_dir, variant, model_name=str(world["model"]), max_sequence_length=77
        )
        expected, expected_pooled = encode_prompt(pipe, text)
        assert prompt_embeds.shape == (77 + 77, 64) and pooled_prompt_embeds.shape == (16 + 32,)
        torch.testing.assert_close(prompt_embeds, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled_prompt_embeds, expected_pooled, atol=1e-5, rtol=1e-5)


def vae_posterior(pipe, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of an image, computed directly (not from the cache). (16, 8, 8)."""
    x = torch.tensor(np.array(Image.open(image_path).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
    with torch.no_grad():
        dist = pipe.vae.encode((x / 127.5 - 1)[None]).latent_dist
    return dist.mean[0], dist.std[0]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_loader_keeps_each_examples_own_latent_and_caption(world, pipe, num_workers):
    """Regression test for the cache-pairing bug of the diffusers SD3 script (diffusers issue 14430)."""
    dataset = CachedLatentsDataset(world["train"], world["empty"], variants=["llama3"], random_flip=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=4,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(1),
    )
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    seen, eps_of = [], {}
    for batch in loader:
        for j, example_id in enumerate(batch["id"]):
            i = int(example_id.split("-")[1])
            seen.append(example_id)
            expected, expected_pooled = encode_prompt(pipe, caption(i, "llama3"))
            torch.testing.assert_close(batch["prompt_embeds"][j], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                batch["pooled_prompt_embeds"][j], expected_pooled, atol=1e-5, rtol=1e-5
            )
            assert batch["variant"][j] == "llama3"
            # Undo scaling and the posterior of THIS example's image: an integer item is sample seed 0, so
            # every example must reveal the same unit noise; a latent from another image would not.
            mean, std = vae_posterior(pipe, world["train"] / example_id / layout.IMAGE)
            eps_of[example_id] = (batch["latents"][j] / scale + shift - mean) / std
    assert sorted(seen) == dataset.ids and seen != dataset.ids  # all once, really shuffled
    reference = eps_of[dataset.ids[0]]
    assert 0.5 < float(reference.std()) < 1.5  # it is noise, not a constant
    for eps in eps_of.values():
        torch.testing.assert_close(eps, reference, atol=1e-3, rtol=1e-3)


def test_sample_seed_controls_every_random_choice(world):
    dataset = CachedLatentsDataset(world["train"], world["empty"], caption_dropout=0.3)
    a, b = dataset[(2, 123)], dataset[(2, 123)]
    for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        assert torch.equal(a[key], b[key])
    assert a["variant"] == b["variant"]
    samples = [dataset[(2, seed)] for seed in range(40)]
    assert {s["variant"] for s in samples} == {"blip2", "llama3", "empty"}
    assert len({s["latents"].sum().item() for s in samples}) == 40
    dropped = [s for s in samples if s["variant"] == "empty"]
    assert all(torch.equal(s["prompt_embeds"], dataset.empty_prompt_embeds) for s in dropped)

    # Flipping picks the flipped image's posterior: with the same seed, the flip-free dataset's latents are
    # the other one exactly when the flip was drawn.
    no_flip = CachedLatentsDataset(world["train"], world["empty"], random_flip=False, caption_dropout=0.3)
    flipped = [not torch.equal(dataset[(2, s)]["latents"], no_flip[(2, s)]["latents"]) for s in range(20)]
    assert 3 < sum(flipped) < 17

    # A loader over (index, seed) pairs gives the same stream with or without workers.
    pairs = [(i, 1000 + i) for i in range(NUM_EXAMPLES)]
    streams = []
    for num_workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            dataset, sampler=pairs, batch_size=3, num_workers=num_workers, collate_fn=collate
        )
        streams.append(torch.cat([batch["latents"] for batch in loader]))
    assert torch.equal(streams[0], streams[1])


def test_dataset_fields(world):
    dataset = CachedLatentsDataset(world["train"], world["empty"], model_name=str(world["model"]))
    assert dataset.ids == [f"hq-{i:05d}" for i in range(NUM_EXAMPLES)]  # empty-prompt folder excluded
    assert len(dataset) == NUM_EXAMPLES
    assert dataset.attributes.shape == (NUM_EXAMPLES, 40) and dataset.attributes.dtype == bool
    assert dataset.attributes[1].tolist() == [(1 + j) % 3 == 0 for j in range(40)]
    assert dataset.variants[0] == ("blip2", "llama3")
    batch = collate([dataset[(0, 5)], dataset[(4, 6)]])
    assert batch["latents"].shape == (2, 16, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["prompt_embeds"].shape == (2, 154, 64) and batch["pooled_prompt_embeds"].shape == (2, 48)
    assert batch["id"] == ["hq-00000", "hq-00004"]


def test_missing_cache_names_example_and_command(world_copy):
    (world_copy["train"] / "hq-00004" / layout.prompt_embeds_file(2)).unlink()
    with pytest.raises(
        InputError,
        match=r"hq-00004: .*prompt_embeds_2.safetensors is missing; run sd3 compute-prompt-embeds 2",
    ):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"])
    (world_copy["train"] / "hq-00001" / layout.LATENT_DIST).unlink()
    with pytest.raises(
        InputError, match="hq-00001: .*latent_dist.safetensors is missing; run sd3 compute-latent-dist"
    ):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"])


def test_missing_variant_and_empty_prompt(world_copy):
    with pytest.raises(InputError, match="hq-00000: .*lacks prompt variant 'other'"):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"], variants=["other"])
    (world_copy["empty"] / layout.prompt_embeds_file(3)).unlink()
    with pytest.raises(InputError, match=r"empty-prompt: .*compute-prompt-embeds 3 .*empty-prompt"):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"])


def test_other_model_or_length_is_refused(world, world_copy):
    with pytest.raises(InputError, match="hq-00000: .*latent_dist.safetensors was made with model_name="):
        CachedLatentsDataset(world["train"], world["empty"], model_name="stabilityai/other")
    with pytest.raises(InputError, match="hq-00000: .*max_sequence_length=77, expected 256"):
        CachedLatentsDataset(world["train"], world["empty"], max_sequence_length=256)
    # One example re-embedded with another T5 length: the caches disagree, which is refused too.
    compute_prompt_embeds(
        ComputePromptEmbedsConfig(
            encoder="3",
            dataset=world_copy["train"] / "hq-00003",
            model_name=str(world["model"]),
            max_sequence_length=32,
            overwrite=True,
        )
    )
    with pytest.raises(InputError, match="hq-00003: .*max_sequence_length=32, expected 77"):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"])


def test_edited_caption_without_reembedding_is_refused(world_copy):
    (world_copy["train"] / "hq-00002" / layout.prompt_file("blip2")).write_text("a new caption")
    with pytest.raises(
        InputError, match="hq-00002: .*prompt_blip2.txt changed after .*compute-prompt-embeds 1"
    ):
        CachedLatentsDataset(world_copy["train"], world_copy["empty"])


def test_noise_draw_runs_in_the_dataset_and_follows_the_sample_seed(world):
    """The training noise and noise level come with the sample (drawn in the loader workers), from its seed."""
    from sd3_lora_celeba.train.flow import NoiseDraw

    draw = NoiseDraw("logit_normal", 3.0, logit_mean=-0.5)
    dataset = CachedLatentsDataset(world["train"], world["empty"], noise_draw=draw)
    sample = dataset[(3, 77)]
    expected = draw(77, torch.Size((16, 8, 8)))
    assert torch.equal(sample["noise"], expected["noise"]) and torch.equal(
        sample["sigmas"], expected["sigmas"]
    )
    assert not torch.equal(dataset[(3, 78)]["noise"], sample["noise"])
    items = [[(i, 100 + i)] for i in range(NUM_EXAMPLES)]
    streams = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=items, num_workers=workers, collate_fn=collate
        )
        batches = list(loader)
        assert batches[0]["sigmas"].shape == (1,) and batches[0]["noise"].shape == (1, 16, 8, 8)
        streams.append(
            torch.cat(
                [torch.cat([b["noise"].flatten(), b["sigmas"], b["latents"].flatten()]) for b in batches]
            )
        )
    assert torch.equal(streams[0], streams[1])


def test_items_do_not_recheck_caches(world, monkeypatch):
    """Fingerprints and caption hashes are checked once, when the dataset is built, not per sample."""
    from sd3_lora_celeba.encode import latents as latent_cache
    from sd3_lora_celeba.encode import prompts as prompt_cache

    dataset = CachedLatentsDataset(world["train"], world["empty"], caption_dropout=0.5)

    def refuse(*_args, **_kwargs):
        raise AssertionError("re-checked a cache per sample")

    monkeypatch.setattr(prompt_cache, "text_sha256", refuse)
    monkeypatch.setattr(prompt_cache, "cached_text_hashes", refuse)
    monkeypatch.setattr(latent_cache, "read_metadata", refuse)
    for seed in range(12):
        dataset[(seed % NUM_EXAMPLES, seed)]


def _embed_captions_in_float16(world: dict) -> None:
    """Re-embed the train split's captions in float16 (the empty prompt stays float32)."""
    for encoder in ("1", "2", "3"):
        compute_prompt_embeds(
            ComputePromptEmbedsConfig(
                encoder=encoder,
                dataset=world["train"],
                model_name=str(world["model"]),
                storage_dtype="float16",
                overwrite=True,
            )
        )


def test_embeddings_stay_in_their_storage_dtype(world_copy):
    """float16 caches reach the batch as float16 (cast on the device), and mixed storage meets in float32."""
    _embed_captions_in_float16(world_copy)
    dataset = CachedLatentsDataset(world_copy["train"], world_copy["empty"], caption_dropout=0.0)
    half = collate([dataset[(0, 1)], dataset[(1, 2)]])
    assert (
        half["prompt_embeds"].dtype == torch.float16 and half["pooled_prompt_embeds"].dtype == torch.float16
    )
    assert half["latents"].dtype == torch.float32
    dropped = CachedLatentsDataset(world_copy["train"], world_copy["empty"], caption_dropout=1.0)[(0, 1)]
    assert dropped["prompt_embeds"].dtype == torch.float32  # the empty prompt was cached in float32
    assert collate([dataset[(0, 1)], dropped])["prompt_embeds"].dtype == torch.float32


def test_batches_written_in_place_equal_collated_samples(world_copy, monkeypatch):
    """A worker's batch written row by row into its buffer (the training loader's path) holds exactly what
    collating the samples gives: same values and dtypes, float16 captions beside the float32 empty prompt
    meeting in float32 as collate's do, flipped and unflipped latents, noise and noise levels."""
    from sd3_lora_celeba.data import cached
    from sd3_lora_celeba.train.flow import NoiseDraw

    _embed_captions_in_float16(world_copy)
    dataset = CachedLatentsDataset(
        world_copy["train"], world_copy["empty"], caption_dropout=0.5, noise_draw=NoiseDraw("uniform", 3.0)
    )
    items = [(i % NUM_EXAMPLES, 40 + i) for i in range(12)]
    variants = [dataset[item]["variant"] for item in items]
    assert "empty" in variants and set(variants) - {"empty"}  # both kinds of prompt occur
    monkeypatch.setattr(cached, "_pool", [])
    monkeypatch.setattr(cached, "_pool_owner", None)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a worker
    loader_view = cached.PackedInWorkers(dataset)
    captioned = [item for item, v in zip(items, variants, strict=True) if v != "empty"]
    dropped = [item for item, v in zip(items, variants, strict=True) if v == "empty"]
    # one sample; a float16 caption first and the float32 empty prompt after it; float16 captions only
    for batch_items in (items[:1], [captioned[0], dropped[0], captioned[1]], captioned):
        packed = cached.collate_packed(loader_view.__getitems__(batch_items))
        assert isinstance(packed, cached.PackedBatch)
        got, want = cached.unpack(packed), collate([dataset[item] for item in batch_items])
        _assert_same_batch(got, want)
        assert got["variant"] == want["variant"]
        mixed = any(dataset[item]["variant"] == "empty" for item in batch_items)
        assert got["prompt_embeds"].dtype == (torch.float32 if mixed else torch.float16)
        del got, packed
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)  # the main process: plain samples
    samples = loader_view.__getitems__(items[:2])
    _assert_same_batch(collate(samples), collate([dataset[item] for item in items[:2]]))


def _assert_same_batch(got: dict, want: dict) -> None:
    assert set(got) == set(want) and got["id"] == want["id"]
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("in_place", [False, True], ids=["collated", "written-in-place"])
@pytest.mark.parametrize("hold", [False, True], ids=["unpack-as-they-come", "hold-then-unpack"])
def test_packed_batches_from_workers_unpack_to_the_same_tensors(world, hold, in_place):
    """Loader workers hand over one shared buffer per batch and reuse it once the main process is done with the
    batch, whether they collate samples into it (collate_packed) or write each sample into its row
    (PackedInWorkers, the training loader); unpack gives collate's batch whether batches are unpacked and dropped
    as they come (buffers reused) or all held first (every pooled buffer busy: the workers take one-off
    buffers)."""
    from sd3_lora_celeba.data import cached
    from sd3_lora_celeba.data.cached import PackedBatch, PackedInWorkers, collate_packed, unpack
    from sd3_lora_celeba.train.flow import NoiseDraw

    dataset = CachedLatentsDataset(
        world["train"], world["empty"], caption_dropout=0.3, noise_draw=NoiseDraw("logit_normal", 3.0)
    )
    items = [
        [(i % NUM_EXAMPLES, 10 + i), ((i + 1) % NUM_EXAMPLES, 20 + i)] for i in range(6 * cached._POOL_SIZE)
    ]
    loader = torch.utils.data.DataLoader(
        PackedInWorkers(dataset) if in_place else dataset,
        batch_sampler=items,
        num_workers=2,
        collate_fn=collate_packed,
    )
    buffers = set()
    batches = []
    for batch, item in zip(loader, items, strict=True):
        assert isinstance(batch, PackedBatch)  # one buffer came over, not one tensor per key
        buffers.add(batch.buffer.data_ptr())
        if hold:
            batches.append(batch)
        else:  # unpacked, checked and dropped: the buffer goes back to its worker
            _assert_same_batch(unpack(batch), collate([dataset[i] for i in item]))
    if hold:
        for batch, item in zip(batches, items, strict=True):
            _assert_same_batch(unpack(batch), collate([dataset[i] for i in item]))
    # The main process keeps the pooled buffers of this loader's two workers only (earlier loaders' are dropped),
    # and none once its workers are gone.
    assert len({key[:2] for key in cached._received}) == 2
    del loader
    cached.release_exited_worker_buffers()
    assert not cached._received
    if hold:
        assert len(buffers) == len(items)
    else:
        assert len(buffers) <= 2 * cached._POOL_SIZE < len(items)  # reused, never refilled before copied out


def test_pinning_copies_the_batch_out_and_frees_the_worker_buffer(world, monkeypatch):
    """The CUDA path: the loader's pinning thread copies a worker's batch out and marks the buffer free, so the
    worker's next batch reuses it without touching the pinned copy; a forked process never takes its parent's
    buffers. (Pinning needs CUDA: a clone stands in for it here.)"""
    import multiprocessing

    from sd3_lora_celeba.data import cached

    monkeypatch.setattr(cached, "_pool", [])
    monkeypatch.setattr(cached, "_pool_owner", None)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # collate as in a worker
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())
    dataset = CachedLatentsDataset(world["train"], world["empty"])
    first = cached.collate_packed([dataset[(0, 1)], dataset[(1, 2)]])
    assert int(cached._state(first.buffer)) == cached._IN_USE
    pinned = torch.utils.data._utils.pin_memory.pin_memory(first)
    assert isinstance(pinned, cached.PackedBatch) and not pinned.shared
    assert int(cached._state(first.buffer)) == cached._FREE
    second = cached.collate_packed([dataset[(2, 3)], dataset[(3, 4)]])
    assert second.buffer.data_ptr() == first.buffer.data_ptr()  # reused
    _assert_same_batch(cached.unpack(pinned), collate([dataset[(0, 1)], dataset[(1, 2)]]))
    _assert_same_batch(cached.unpack(second), collate([dataset[(2, 3)], dataset[(3, 4)]]))

    cached._state(first.buffer).fill_(cached._FREE)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_ptr = pool.apply(_fresh_slot_pointer)
    assert child_ptr != first.buffer.data_ptr()


def test_unpacking_without_pinning_keeps_the_worker_buffer_until_the_batch_is_dropped(world, monkeypatch):
    """The CPU path: unpack gives views of the worker's buffer (no copy), and the buffer goes back to the worker
    only when nothing references the batch any more: not while the batch, one of its tensors, a view of one or
    what to_device made of it on the CPU is alive."""
    from sd3_lora_celeba.data import cached
    from sd3_lora_celeba.train.recipe import to_device

    monkeypatch.setattr(cached, "_pool", [])
    monkeypatch.setattr(cached, "_pool_owner", None)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # collate as in a worker
    dataset = CachedLatentsDataset(world["train"], world["empty"])
    want = collate([dataset[(0, 1)], dataset[(1, 2)]])
    first = cached.collate_packed([dataset[(0, 1)], dataset[(1, 2)]])
    buffer = first.buffer

    def state() -> int:
        return int(cached._state(buffer))

    batch = cached.unpack(first)
    _assert_same_batch(batch, want)
    start = batch["latents"].data_ptr() - buffer.data_ptr()
    assert 0 < start < buffer.numel()  # a view into the worker's buffer, not a copy
    again = cached.unpack(first)
    assert again["latents"].data_ptr() == batch["latents"].data_ptr()
    on_device = to_device(batch, torch.device("cpu"), torch.float32)
    latents_row = on_device["latents"][1]
    del batch, again, on_device
    assert state() == cached._IN_USE
    busy = cached.collate_packed([dataset[(2, 3)], dataset[(3, 4)]])
    assert busy.buffer.data_ptr() != buffer.data_ptr()  # not refilled while a row of the batch is referenced
    assert torch.equal(latents_row, want["latents"][1])
    del latents_row
    assert state() == cached._IN_USE  # the batch itself is still referenced
    del first
    assert state() == cached._FREE
    third = cached.collate_packed([dataset[(4, 5)], dataset[(0, 6)]])
    assert third.buffer.data_ptr() == buffer.data_ptr()  # reused
    _assert_same_batch(cached.unpack(third), collate([dataset[(4, 5)], dataset[(0, 6)]]))
    _assert_same_batch(cached.unpack(busy), collate([dataset[(2, 3)], dataset[(3, 4)]]))


def _fresh_slot_pointer() -> int:
    from sd3_lora_celeba.data import cached

    return cached._take_slot(16).buffer.data_ptr()
