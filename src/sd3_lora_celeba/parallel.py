"""Per-example work shared across processes: the resumable, sharded loop used by every caching stage.

Under ``accelerate launch --num_processes N`` each process takes every N-th *pending* example of the same
sorted list, so the processes cover each example exactly once. Outputs are keyed by example folder (the
example id), never by loop position, so the shard assignment may change between runs without harm.

:func:`stage_lock` keeps two runs of one stage off one dataset: the main process of a run holds
``DATASET/.sd3-locks/<stage>/.sd3.lock`` (``io.output_lock``) for the whole run, and tells the other processes
of its ``accelerate launch`` whether it got it, so a refused run stops every process with the same one line.
Different stages (the three text encoders, say) may run side by side.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from sd3_lora_celeba.io import LockedError, output_lock, remove_stale_temp_files
from sd3_lora_celeba.layout import DATASET_INFO

T = TypeVar("T")
log = logging.getLogger(__name__)
LOCKS_DIR = ".sd3-locks"


def process_state():
    """accelerate's PartialState: process index/count and device, for single runs and ``accelerate launch``."""
    import os

    import torch
    from accelerate import PartialState

    # accelerate sets up CPU multi-processing (gloo) only when asked for the CPU; without CUDA (or under
    # ``accelerate launch --cpu``) ask for it, so that torchrun-style launches on CPU shard the work too.
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of process ``index`` out of ``count``: every ``count``-th item starting at ``index``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad shard {index} of {count}")
    return list(items[index::count])


def batched(items: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def pending_for_this_process(
    example_dirs: Sequence[Path], is_done: Callable[[Path], bool], *, overwrite: bool, what: str
) -> list[Path]:
    """Pending examples of this process: not finished yet (unless ``overwrite``), then sharded.

    The main process first deletes temporary files that a killed run left in the example folders; the barrier
    below keeps the other processes from writing before that is done.
    """
    state = process_state()
    if state.is_main_process:
        stale = sum(remove_stale_temp_files(d, recursive=False) for d in example_dirs)
        if stale:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", what, stale)
    todo = list(example_dirs) if overwrite else [d for d in example_dirs if not is_done(d)]
    skipped = len(example_dirs) - len(todo)
    mine = shard(todo, state.process_index, state.num_processes)
    # Every process must list what is pending before any of them writes an output, or a fast process
    # could shrink a slow one's list and the shards would no longer line up.
    state.wait_for_everyone()
    if state.is_main_process:
        log.info(
            "%s: %d example(s), %d already done, %d to do on %d process(es)",
            what,
            len(example_dirs),
            skipped,
            len(todo),
            state.num_processes,
        )
    return mine


def progress(total: int, desc: str, unit: str = "ex"):
    """A tqdm bar shown by the main process only."""
    state = process_state()
    return tqdm(total=total, desc=desc, unit=unit, disable=None if state.is_local_main_process else True)


def lock_folder(target: Path, stage: str) -> Path:
    """Lock folder of ``stage`` for ``target``: below the dataset root holding it (any split or example
    folder of one dataset shares the root's lock), or below ``target`` itself outside a dataset."""
    target = Path(target).absolute()
    for folder in (target, *target.parents):
        if (folder / DATASET_INFO).is_file():
            return folder / LOCKS_DIR / stage
    return target / LOCKS_DIR / stage


@contextlib.contextmanager
def stage_lock(target: Path, stage: str, what: str, *, processes: bool = False) -> Iterator[None]:
    """Hold the lock of ``stage`` on the dataset of ``target`` for the block (one line if another run has it).

    With ``processes`` (the stages run under ``accelerate launch``) only the main process takes the lock; its
    outcome is broadcast so that every process either proceeds or raises the same :class:`LockedError`, and
    the lock is released only after every process has finished the block.
    """
    state = process_state() if processes else None
    with contextlib.ExitStack() as stack:
        error: str | None = None
        if state is None or state.is_main_process:
            try:
                stack.enter_context(output_lock(lock_folder(target, stage), what))
            except LockedError as exc:
                error = exc.message
        if state is not None and state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise LockedError(error)
        yield
        if state is not None:
            state.wait_for_everyone()  # the main process must not release while others still write
