"""Training checkpoints: save atomically, find the newest, check compatibility, restore exactly.

A checkpoint folder (names in :mod:`sd3_lora_celeba.layout`)::

    RUN/checkpoint-000500/
    ├── pytorch_lora_weights.safetensors   diffusers LoRA, loads with stock load_lora_weights   (LORA_WEIGHTS)
    ├── adapter_config.json                peft config (rank, alpha, targets)                    (ADAPTER_CONFIG)
    ├── training_state.pt                  optimizer, lr scheduler, GradScaler, RNG states,     (TRAINING_STATE)
    │                                      data position (consumed samples), step, loss state
    └── config.json                        resolved config of the run that wrote it             (RUN_CONFIG)

The whole folder is written under ``.tmp-checkpoint-000500`` and renamed when complete, so a kill at any moment
leaves either no checkpoint or a complete one; ``--checkpoints-total-limit`` prunes old ones only afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import save_config
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import TMP_PREFIX
from sd3_lora_celeba.models.lora import lora_state_dict, save_lora

log = logging.getLogger(__name__)

# Config fields that fix the shape or meaning of the saved LoRA: resuming with other values cannot work.
INCOMPATIBLE_IF_CHANGED = (
    "model_name",
    "model_revision",
    "lora_blocks",
    "lora_layers",
    "lora_rank",
    "lora_alpha",
)


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) CUDA RNG states of this process."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def lora_is_finite(transformer: torch.nn.Module) -> bool:
    """True when every LoRA parameter is finite (a NaN adapter must never reach a checkpoint)."""
    return all(bool(torch.isfinite(v).all()) for v in lora_state_dict(transformer).values())


def save_checkpoint(
    run_dir: Path, step: int, *, transformer: torch.nn.Module, training_state: dict[str, Any], config: Any
) -> Path:
    """Write ``checkpoint-<step>`` atomically and return its path. Refuses non-finite LoRA weights."""
    if not lora_is_finite(transformer):
        raise RuntimeError(f"step {step}: LoRA weights are not finite; refusing to write a checkpoint")
    final = layout.checkpoint_dir(run_dir, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_lora(transformer, tmp)
    torch.save(training_state, tmp / layout.TRAINING_STATE)
    save_config(config, tmp / layout.RUN_CONFIG)
    if final.exists():  # the same step saved again (e.g. the final step equals a checkpointing step)
        old = final.with_name(TMP_PREFIX + "old-" + final.name)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run that hold both the LoRA and the training state, oldest first."""
    return [p for p in layout.list_checkpoints(run_dir) if (p / layout.TRAINING_STATE).is_file()]


def prune_checkpoints(run_dir: Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``limit``; returns the deleted folders."""
    if limit is None:
        return []
    found = complete_checkpoints(run_dir)
    doomed = found[: max(0, len(found) - limit)]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete ``.tmp-checkpoint-*`` folders left by a run killed while saving."""
    if Path(run_dir).is_dir():
        for p in Path(run_dir).glob(TMP_PREFIX + layout.CHECKPOINT_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Checkpoint to resume from for ``--resume`` = ``auto`` | ``latest`` | ``never`` | a checkpoint folder.

    ``auto`` resumes the newest checkpoint of ``run_dir`` if there is one and starts fresh otherwise; ``latest``
    requires one; ``never`` starts fresh and refuses a ``run_dir`` that already holds checkpoints (it would mix
    two runs).
    """
    found = complete_checkpoints(run_dir)
    if resume == "auto":
        return found[-1] if found else None
    if resume == "latest":
        if not found:
            raise InputError(
                f"{run_dir}: --resume latest: no complete checkpoint in this folder; "
                "check --output-dir or start a new run with --resume auto"
            )
        return found[-1]
    if resume == "never":
        if found:
            raise InputError(
                f"{run_dir}: --resume never: this folder already holds checkpoints; "
                "pass another --output-dir or resume it with --resume latest"
            )
        return None
    path = Path(resume)
    if not (path / layout.TRAINING_STATE).is_file() or not (path / layout.LORA_WEIGHTS).is_file():
        raise InputError(
            f"{path}: --resume: not a complete checkpoint folder (needs {layout.LORA_WEIGHTS} and "
            f"{layout.TRAINING_STATE}); pass a checkpoint-<step> folder, latest or auto"
        )
    return path


def check_compatible(checkpoint: Path, config: dict[str, Any]) -> None:
    """InputError when ``checkpoint`` was written by a run with another model or LoRA shape."""
    path = Path(checkpoint) / layout.RUN_CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(
            f"{path}: missing or unreadable checkpoint config; resume from another checkpoint"
        ) from None
    diffs = [
        f"{k} {saved.get(k)!r} -> {config.get(k)!r}"
        for k in INCOMPATIBLE_IF_CHANGED
        if saved.get(k) != config.get(k)
    ]
    if diffs:
        raise InputError(
            f"{checkpoint}: checkpoint of an incompatible run ({'; '.join(diffs)}); "
            "use the same options, another --output-dir, or --resume never"
        )


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The training state of a checkpoint (our own file, so full unpickling is allowed)."""
    return torch.load(Path(checkpoint) / layout.TRAINING_STATE, map_location="cpu", weights_only=False)


def load_lora_weights(transformer: torch.nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's LoRA weights into an adapter already attached with the same config."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sd3_lora_celeba.models.lora import ADAPTER_NAME

    state = load_file(str(Path(checkpoint) / layout.LORA_WEIGHTS))
    prefix = "transformer."
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise InputError(
            f"{checkpoint}: LoRA keys do not fit the model ({unexpected[0]}); use a matching checkpoint"
        )
