"""The resumable, multi-process captioning loop shared by ``caption-blip2`` and ``caption-llama3``.

Contract of the loop:

* an example is done once its caption file exists; a re-run skips it unless ``--overwrite``;
* each process of ``accelerate launch`` takes its share of the pending examples (:mod:`parallel`);
* captions are written atomically right after their batch, so a kill loses at most one batch;
* an empty caption (after cleaning) is *not* written: it is logged as a warning and the example stays
  pending, so the next run retries it (with sampling, possibly with another outcome);
* files are keyed by example folder (the example id), never by loop position.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_write_text

log = logging.getLogger(__name__)

# A generator turns a batch of example folders into one caption per folder, in the same order.
GenerateBatch = Callable[[list[Path]], list[str]]


@dataclass
class LoopStats:
    """What one process did: examples it was given, captions written, empty captions skipped, degenerate ones."""

    assigned: int = 0
    written: int = 0
    empty: int = 0
    degenerate: int = 0


MAX_DEGENERATE_WARNINGS = 5


def model_name_option(default: str, env: str, help: str):
    """A ``--model-name`` field whose default is ``$env`` when set, else ``default`` (``option(env=...)``)."""
    return option(default, help, env=env)


def examples_with_files(dataset: Path, required: Sequence[str], what: str) -> list[Path]:
    """Example folders at or below ``dataset`` that hold every file in ``required``, sorted by path.

    Raises :class:`InputError` when ``dataset`` is not a folder or holds no such example.
    """
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise InputError(
            f"{dataset}: dataset folder not found; pass the dataset root, a split or an example folder"
        )
    found = layout.find_example_dirs(dataset)
    ready = [d for d in found if all((d / name).is_file() for name in required)]
    ready_set = set(ready)
    lacking = [d for d in found if d not in ready_set and (d / layout.EXAMPLE_RECORD).is_file()]
    if lacking:
        missing = ", ".join(name for name in required if not (lacking[0] / name).is_file())
        log.warning(
            "%s: %d example folder(s) lack %s (e.g. %s); they are skipped",
            what,
            len(lacking),
            missing,
            lacking[0],
        )
    if not ready:
        raise InputError(
            f"{dataset}: no example folder with {' and '.join(required)} at or below it; "
            "check the path or run the earlier stages first"
        )
    return ready


def run_caption_loop(
    example_dirs: Sequence[Path],
    *,
    output_name: str,
    load_generator: Callable[[], GenerateBatch],
    batch_size: int,
    overwrite: bool,
    what: str,
    max_words: int | None = None,
) -> LoopStats:
    """Caption this process's pending examples batch by batch, writing ``output_name`` in each folder.

    ``load_generator`` is called only if something is pending, so a finished dataset loads no model.
    When ``max_words`` is given, degenerate captions (see :func:`cleaning.degenerate_reason`) are warned about.
    """
    from sd3_lora_celeba.captioning.cleaning import degenerate_reason

    state = parallel.process_state()
    pending = parallel.pending_for_this_process(
        example_dirs, lambda d: (d / output_name).is_file(), overwrite=overwrite, what=what
    )
    # Every process must list the finished examples before any process writes a new one; otherwise a fast
    # process would shrink a slow one's pending list and the shards would no longer line up.
    state.wait_for_everyone()
    stats = LoopStats(assigned=len(pending))
    if pending:
        generate = load_generator()
        with parallel.progress(len(pending), desc=what) as bar:
            for batch in parallel.batched(pending, batch_size):
                captions = generate(batch)
                if len(captions) != len(batch):
                    raise RuntimeError(f"{what}: got {len(captions)} captions for {len(batch)} examples")
                for example_dir, caption in zip(batch, captions, strict=True):
                    caption = " ".join(caption.split())
                    if not caption:
                        stats.empty += 1
                        log.warning(
                            "%s: empty caption for %s; nothing written, a re-run retries it",
                            what,
                            example_dir,
                        )
                        continue
                    if max_words is not None and (reason := degenerate_reason(caption, max_words)):
                        stats.degenerate += 1
                        # A broken model makes every caption degenerate: name a few, count the rest.
                        if stats.degenerate <= MAX_DEGENERATE_WARNINGS:
                            shown = caption if len(caption) <= 80 else caption[:77] + "..."
                            log.warning(
                                "%s: degenerate caption for %s (%s): %r", what, example_dir, reason, shown
                            )
                    atomic_write_text(example_dir / output_name, caption)
                    stats.written += 1
                bar.update(len(batch))
    if stats.degenerate > MAX_DEGENERATE_WARNINGS:
        log.warning(
            "%s: %d degenerate caption(s) in all (written; check the captioning model and settings)",
            what,
            stats.degenerate,
        )
    # One line per process, so a multi-process run shows who wrote what.
    log.info(
        "%s: process %d of %d wrote %d caption(s) of %d assigned (%d empty, not written)",
        what,
        state.process_index,
        state.num_processes,
        stats.written,
        stats.assigned,
        stats.empty,
    )
    return stats
