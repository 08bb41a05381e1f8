"""Training checkpoints: save atomically, find the newest, check compatibility, restore exactly.

A checkpoint folder (names in :mod:`sd3_lora_celeba.layout`)::

    RUN/checkpoint-000500/
    ├── pytorch_lora_weights.safetensors   diffusers LoRA, loads with stock load_lora_weights   (LORA_WEIGHTS)
    ├── adapter_config.json                peft config (rank, alpha, targets)                    (ADAPTER_CONFIG)
    ├── training_state.pt                  optimizer, lr scheduler, GradScaler, RNG states,     (TRAINING_STATE)
    │                                      data position (consumed samples), step, loss state;
    │                                      tensors and plain values only: loaded with weights_only=True
    └── config.json                        resolved config of the run that wrote it             (RUN_CONFIG)

The whole folder is written under ``.tmp-checkpoint-000500`` and renamed when complete, so a kill at any moment
leaves either no checkpoint or a complete one; ``--checkpoints-total-limit`` prunes old ones only afterwards.
Resuming checks that the run would continue the same training (options, data stream, precision); rewinding to
an older checkpoint moves the newer ones aside into ``RUN/branches/`` with the old metrics.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
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
# Fields that shape neither the data stream nor the maths: they may differ on resume without a word.
OPERATIONAL = (
    "train_dir",  # the examples themselves are checked through the sampler state (count) instead
    "output_dir",
    "resume",
    "allow_changed",
    "dataloader_num_workers",
    "report_to",
    "wandb_project",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "max_nan_steps",
    "validation_fid_every",
    "validation_dir",
    "validation_num_images",
    "validation_guidance_scale",
    "validation_batch_size",
    "inception_weights",
    "compile",
    "gradient_checkpointing",
    "batch_size",  # per process; the global micro-batch is checked through the sampler state
)
# Schedules whose learning rate does not depend on --num-training-steps.
_STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")
BRANCHES_DIR = "branches"
REQUIRED_STATE = ("step", "consumed", "nan_streak", "optimizer", "lr_scheduler", "rng", "sampler")


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if present) CUDA RNG states of this process, as tensors and plain values
    (so the training state loads with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": (
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ),  # fmt: skip
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
    """Delete ``.tmp-checkpoint-*`` and ``.tmp-old-checkpoint-*`` folders left by a run killed while saving."""
    if Path(run_dir).is_dir():
        for pattern in (TMP_PREFIX + layout.CHECKPOINT_PREFIX + "*", TMP_PREFIX + "old-*"):
            for p in Path(run_dir).glob(pattern):
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


def previous_checkpoint(checkpoint: Path) -> Path | None:
    """The complete checkpoint before ``checkpoint`` in its run folder, if any."""
    step = layout.checkpoint_step(Path(checkpoint))
    older = [
        p
        for p in complete_checkpoints(Path(checkpoint).parent)
        if (layout.checkpoint_step(p) or 0) < (step or 0)
    ]
    return older[-1] if older else None


def _corrupt(path: Path, checkpoint: Path, what: str) -> InputError:
    before = previous_checkpoint(checkpoint)
    fix = (
        f"resume from the previous one with --resume {before}"
        if before is not None
        else "start over in another --output-dir (or delete this checkpoint)"
    )
    return InputError(f"{path}: {what}; {fix}")


def check_compatible(
    checkpoint: Path, config: dict[str, Any], allow_changed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The checkpoint's saved config; InputError when this run's options differ from it.

    Another model or LoRA shape is always refused. Any other option that shapes the data stream or the maths
    (everything but :data:`OPERATIONAL`) is refused unless named in ``allow_changed`` (flag names without ``--``).
    """
    path = Path(checkpoint) / layout.RUN_CONFIG
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise _corrupt(path, checkpoint, "missing or unreadable checkpoint config") from None
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
    allowed = {a.replace("-", "_") for a in allow_changed}
    ignore = set(OPERATIONAL) | set(INCOMPATIBLE_IF_CHANGED) | allowed
    if config.get("lr_scheduler") in _STEP_FREE_SCHEDULES and saved.get("lr_scheduler") == config.get(
        "lr_scheduler"
    ):
        ignore.add("num_training_steps")
    # Options one side does not know (a checkpoint of an older version, an option since removed) are not compared.
    changed = sorted(k for k in set(saved) & set(config) if k not in ignore and saved[k] != config[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        names = ",".join(k.replace("_", "-") for k in changed)
        raise InputError(
            f"{checkpoint}: resuming with changed options ({flags}); use the checkpoint's values, "
            f"or add --allow-changed {names} if the change is intended"
        )
    return saved


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The training state of a checkpoint, loaded with ``weights_only=True`` (no code runs from the file).

    A truncated, foreign or incomplete file is an InputError naming it and offering the previous checkpoint.
    """
    path = Path(checkpoint) / layout.TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, or a pickle that wants to run code
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise _corrupt(path, checkpoint, f"unreadable training state ({reason})") from None
    if not isinstance(state, dict):
        raise _corrupt(path, checkpoint, "not a training state")
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise _corrupt(path, checkpoint, f"training state lacks {', '.join(missing)}")
    return state


def check_lora_file(checkpoint: Path) -> None:
    """InputError naming the file when a checkpoint's LoRA weights cannot be read."""
    from safetensors import safe_open

    path = Path(checkpoint) / layout.LORA_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as exc:  # noqa: BLE001 - truncated or garbage
        raise _corrupt(path, checkpoint, f"unreadable LoRA weights ({str(exc)[:120]})") from None


def load_lora_weights(transformer: torch.nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's LoRA weights into an adapter already attached with the same config."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from sd3_lora_celeba.models.lora import ADAPTER_NAME

    check_lora_file(checkpoint)
    path = Path(checkpoint) / layout.LORA_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, checkpoint, f"unreadable LoRA weights ({str(exc)[:120]})") from None
    prefix = "transformer."
    state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise InputError(
            f"{checkpoint}: LoRA keys do not fit the model ({unexpected[0]}); use a matching checkpoint"
        )


# --- the training state: what a checkpoint holds besides the LoRA ---------------------------------------------


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, samples consumed (global), consecutive skipped steps."""

    step: int = 0
    consumed: int = 0
    nan_streak: int = 0


def build_training_state(
    progress: Progress, *, optimizer, lr_scheduler, scaler, sampler: dict[str, Any], resolved: dict[str, Any]
) -> dict[str, Any]:
    """The dict written to ``training_state.pt``: tensors and plain values only (loads with weights_only)."""
    return {
        "step": progress.step,
        "consumed": progress.consumed,
        "nan_streak": progress.nan_streak,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states(),
        "sampler": dict(sampler),
        "resolved": dict(resolved),
    }


def check_stream(checkpoint: Path, state: dict[str, Any], sampler: dict[str, Any], resolved: dict[str, Any]):
    """InputError when the data stream or the resolved precision would differ from the checkpoint's."""
    saved = state["sampler"]
    if saved.get("consumed") != state["consumed"]:
        raise _corrupt(Path(checkpoint) / layout.TRAINING_STATE, checkpoint, "inconsistent data position")
    flags = {"num_examples": "TRAIN_DIR (number of examples)", "global_batch_size": "--batch-size x processes",
             "seed": "--seed", "balanced": "--balance-attributes", "scheme": "the seed scheme (another version)"}  # fmt: skip
    changed = [
        f"{flags.get(k, k)} {saved.get(k)!r} -> {v!r}"
        for k, v in sampler.items()
        if k in saved and saved[k] != v
    ]
    changed += [
        f"{k} {state['resolved'].get(k)!r} -> {v!r} (--precision / --amp / --mixed-precision)"
        for k, v in resolved.items()
        if "resolved" in state and k in state["resolved"] and state["resolved"][k] != v
    ]
    if changed:
        raise InputError(
            f"{checkpoint}: the resumed run would not continue the same training ({'; '.join(changed)}); "
            "use the checkpoint's settings or another --output-dir"
        )


def restore_training_state(state: dict[str, Any], *, optimizer, lr_scheduler, scaler) -> Progress:
    """Load optimizer, schedule, GradScaler and RNG states; returns the run's progress."""
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return Progress(step=state["step"], consumed=state["consumed"], nan_streak=state["nan_streak"])


def branch_newer_checkpoints(run_dir: Path, step: int) -> Path | None:
    """Rewinding to ``step``: move the run's newer checkpoints (and a copy of the full metrics and TensorBoard
    history) into ``RUN/branches/<UTC time>-from-step-<step>/``; returns that folder, or None if none is newer.
    """
    run_dir = Path(run_dir)
    newer = [p for p in layout.list_checkpoints(run_dir) if (layout.checkpoint_step(p) or 0) > step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    branch = run_dir / BRANCHES_DIR / f"{stamp}-from-step-{step:06d}"
    n = 1
    while branch.exists():
        n += 1
        branch = branch.with_name(f"{stamp}-{n}-from-step-{step:06d}")
    branch.mkdir(parents=True)
    for name in (layout.METRICS, layout.RUN_CONFIG):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, branch / name)
    if (run_dir / layout.TENSORBOARD_DIR).is_dir():
        shutil.copytree(run_dir / layout.TENSORBOARD_DIR, branch / layout.TENSORBOARD_DIR)
    for p in newer:
        os.replace(p, branch / p.name)
    log.warning(
        "rewinding to step %d: moved %d newer checkpoint(s) and the old history to %s",
        step,
        len(newer),
        branch,
    )
    return branch
