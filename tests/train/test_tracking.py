"""Training metrics: a resumed run's TensorBoard log shows each step once (purge_step)."""

from __future__ import annotations

import time

from sd3_lora_celeba import layout
from sd3_lora_celeba.train.tracking import Tracker, read_metrics, truncate_metrics


def _log(tracker: Tracker, steps, loss: float) -> None:
    for step in steps:
        tracker.log({"step": step, "loss": loss, "sigma_hist": [1, 0]})
    tracker.close()


def test_resumed_steps_are_not_duplicated(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(Tracker(tmp_path, "tensorboard", {}, enabled=True), [1, 2, 3, 4], 1.0)  # killed after step 4
    time.sleep(1.1)  # a new event file name (they are named by the second)
    truncate_metrics(tmp_path, 2)  # resumed from checkpoint-000002
    _log(Tracker(tmp_path, "tensorboard", {}, enabled=True, purge_step=3), [3, 4], 2.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
        (4, 2.0),
    ]
    events = EventAccumulator(str(tmp_path / layout.TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
        (4, 2.0),
    ]
