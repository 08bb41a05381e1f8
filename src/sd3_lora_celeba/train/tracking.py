"""Training metrics: ``metrics.jsonl`` always, TensorBoard by default, W&B on request; never a login prompt.

Each optimizer step logs one JSON line::

    {"step": 12, "loss": 0.41, "lr": 2.4e-06, "grad_norm": 0.8, "sigma_hist": [0, 1, ...], "step_time_s": 1.9,
     "images_per_s": 31.5, "peak_memory_mb": 20480.0, "shift": 3.0, "epoch": 0.02, "skipped": false}

``loss`` is the mean over the accumulation window and all processes; a step whose loss was not finite has
``"loss": null, "skipped": true``. On resume, lines after the resumed step (written before the kill, after the
last checkpoint) are dropped so the file reads as one uninterrupted run (they are redone with the same values);
TensorBoard gets ``purge_step`` for the same reason. Rewinding to an older checkpoint keeps the whole old file
in the branch folder (see :func:`sd3_lora_celeba.train.checkpoint.branch_newer_checkpoints`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from sd3_lora_celeba import layout
from sd3_lora_celeba.io import atomic_write_text

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All complete lines of a run's ``metrics.jsonl`` (a torn last line from a kill is ignored)."""
    path = Path(run_dir) / layout.METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Keep only the lines of steps <= ``last_step`` (the step a resumed run restarts after)."""
    path = Path(run_dir) / layout.METRICS
    if path.is_file():
        kept = [row for row in read_metrics(run_dir) if row.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


class Tracker:
    """Writes metrics of the main process to metrics.jsonl and the chosen backend (``none|tensorboard|wandb``)."""

    def __init__(
        self,
        run_dir: Path,
        report_to: str,
        config: dict[str, Any],
        *,
        enabled: bool,
        project: str = "sd3-lora",
        purge_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / layout.METRICS
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run redoes the steps after its checkpoint: purge_step drops the points the killed run
            # had logged for them, so TensorBoard shows each step once.
            self.tensorboard = SummaryWriter(
                str(Path(run_dir) / layout.TENSORBOARD_DIR), purge_step=purge_step
            )
        elif report_to == "wandb":
            self.wandb = _start_wandb(run_dir, project, config)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = row["step"]
        scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            import numpy as np

            for key, value in scalars.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, step)
            hist = row.get("sigma_hist")
            if hist and sum(hist):
                # Rebuild the histogram from bin centres: TensorBoard wants raw values.
                centres = np.repeat((np.arange(len(hist)) + 0.5) / len(hist), hist)
                self.tensorboard.add_histogram(
                    "train/sigmas", centres, step, bins=np.linspace(0, 1, len(hist) + 1)
                )
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, project: str, config: dict[str, Any]):
    try:
        import wandb
    except ModuleNotFoundError:
        from sd3_lora_celeba.errors import InputError

        raise InputError(
            "--report-to wandb: the wandb package is not installed; pip install 'sd3-lora-celeba[wandb]' "
            "or use --report-to tensorboard"
        ) from None
    # Never prompt: without stored credentials wandb runs offline (sync later with `wandb sync`).
    api = getattr(wandb, "api", None)
    has_key = bool(os.environ.get("WANDB_API_KEY") or getattr(api, "api_key", None))
    mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    if mode == "offline":
        log.warning("--report-to wandb: no W&B credentials found; logging offline under %s", run_dir)
    wandb.init(project=project, dir=str(run_dir), config=config, mode=mode)
    return wandb
