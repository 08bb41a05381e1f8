"""Integrity of fine-tune runs: no code runs from a checkpoint, one process per run folder, resume refuses
changed settings, rewinding keeps the old branch, corrupt checkpoints are named, signals stop cleanly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import golden_command, invoke, losses, subprocess_env

from sd3_lora_celeba import layout
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import LOCK_NAME
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.train import checkpoint as ckpt
from sd3_lora_celeba.train.tracking import read_metrics

HERE = Path(__file__).parent


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def run_copy(golden_run, tmp_path) -> Path:
    """A writable copy of the finished golden run (checkpoints at steps 2 and 4)."""
    return Path(shutil.copytree(golden_run, tmp_path / "run"))


class _WritesMarker:
    """Unpickling this object would create ``path`` (what a malicious training_state.pt could do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_crafted_training_state_runs_no_code(run_copy, tiny_world, tmp_path, run_cli, sd3_env):
    marker = tmp_path / "pwned"
    checkpoint = run_copy / "checkpoint-000004"
    torch.save({"step": 4, "payload": _WritesMarker(marker)}, checkpoint / layout.TRAINING_STATE)
    with pytest.raises(InputError, match="training_state.pt: unreadable training state"):
        ckpt.load_training_state(checkpoint)
    result = run_cli(*golden_command(tiny_world, run_copy), env=sd3_env)
    one_line_error(result, str(checkpoint / layout.TRAINING_STATE), "--resume", "checkpoint-000002")
    assert not marker.exists()
    # The file really is dangerous: full unpickling would have run it (so the test above can fail).
    torch.load(checkpoint / layout.TRAINING_STATE, weights_only=False)
    assert marker.exists()


def test_training_state_holds_plain_values_only(golden_run):
    state = torch.load(golden_run / "checkpoint-000002" / layout.TRAINING_STATE, weights_only=True)
    assert state["step"] == 2 and state["sampler"]["consumed"] == state["consumed"] == 8
    assert state["sampler"]["num_examples"] == 6 and state["sampler"]["global_batch_size"] == 2
    assert state["resolved"] == {"storage_dtype": "float32", "mixed_precision": "no", "shift": 3.0}
    ckpt.set_rng_states(state["rng"])  # restores from the plain form


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_world, tmp_path, run_cli, sd3_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "what": "sd3 fine-tune"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    result = run_cli(*golden_command(tiny_world, run_dir), env=sd3_env)
    one_line_error(result, "in use by sd3 fine-tune", f"pid {os.getppid()}")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing written


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--seed", "1"], ["--seed 0 -> 1", "--allow-changed seed"]),
        (["--learning-rate", "0.002"], ["--learning-rate 0.001 -> 0.002"]),
        (["--gradient-accumulation-steps", "1"], ["--gradient-accumulation-steps 2 -> 1"]),
        (["--weighting-scheme", "cosmap"], ["--weighting-scheme"]),
        (["--caption-dropout", "0.5"], ["--caption-dropout 0.2 -> 0.5"]),
        (["--amp"], ["--amp None -> True"]),
        (["--num-training-steps", "6"], ["--num-training-steps 4 -> 6"]),  # cosine: the schedule changes
        (["--batch-size", "1"], ["--batch-size x processes 2 -> 1"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and v[0].startswith("--") else "",
)
def test_resume_refuses_changed_settings(golden_run, tiny_world, tmp_path, extra, needles, run_cli, sd3_env):
    args = golden_command(tiny_world, tmp_path / "run", "--resume", golden_run / "checkpoint-000002")
    for flag, value in zip(extra[::2], extra[1::2], strict=False):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if extra == ["--amp"]:
        args.append("--amp")
    one_line_error(run_cli(*args, env=sd3_env), "checkpoint-000002", *needles)
    assert not (tmp_path / "run" / layout.RUN_CONFIG).exists()


def test_resume_accepts_allowed_and_operational_changes(golden_run, tiny_world, tiny_sd3, tmp_path):
    run_dir = tmp_path / "run"
    args = golden_command(tiny_world, run_dir, "--resume", golden_run / "checkpoint-000002")
    args[args.index("--learning-rate") + 1] = "2e-3"
    args[args.index("--checkpointing-steps") + 1] = "1"
    args += ["--allow-changed", "learning-rate", "--dataloader-num-workers", "1"]
    invoke(args, {SD3_MODEL_ENV: str(tiny_sd3)})
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["checkpoint-000003", "checkpoint-000004"]
    # Step 3's loss comes before its update: the same; step 4's follows an update at the new learning rate.
    assert losses(run_dir)[0] == pytest.approx(losses(golden_run)[2], rel=1e-6)
    assert losses(run_dir)[1] != pytest.approx(losses(golden_run)[3], rel=1e-4)
    config = json.loads((run_dir / layout.RUN_CONFIG).read_text())
    assert config["learning_rate"] == 2e-3 and config["dataloader_num_workers"] == 1


def test_resume_checks_the_sampler_state(run_copy, tiny_world, run_cli, sd3_env):
    path = run_copy / "checkpoint-000004" / layout.TRAINING_STATE
    state = torch.load(path, weights_only=True)
    state["sampler"]["num_examples"] = 5
    torch.save(state, path)
    args = golden_command(
        tiny_world, run_copy, "--num-training-steps", "6", "--allow-changed", "num-training-steps"
    )
    one_line_error(run_cli(*args, env=sd3_env), "TRAIN_DIR (number of examples) 5 -> 6")
    state["sampler"]["num_examples"], state["sampler"]["consumed"] = 6, 3
    torch.save(state, path)
    one_line_error(run_cli(*args, env=sd3_env), "inconsistent data position", "checkpoint-000002")


def test_rewinding_keeps_the_old_branch_and_its_metrics(run_copy, golden_run, tiny_world, tiny_sd3):
    old_lora = (run_copy / "checkpoint-000004" / layout.LORA_WEIGHTS).read_bytes()
    (run_copy / ".tmp-old-checkpoint-000004").mkdir()  # left by a kill while re-saving a step
    invoke(
        golden_command(tiny_world, run_copy, "--resume", run_copy / "checkpoint-000002"),
        {SD3_MODEL_ENV: str(tiny_sd3)},
    )
    (branch,) = (run_copy / ckpt.BRANCHES_DIR).iterdir()
    assert branch.name.endswith("-from-step-000002")
    assert (branch / "checkpoint-000004" / layout.LORA_WEIGHTS).read_bytes() == old_lora
    assert [r["step"] for r in read_metrics(branch)] == [1, 2, 3, 4]  # the old history, whole
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4]  # the new one, no duplicates
    assert losses(run_copy) == pytest.approx(losses(golden_run), rel=1e-6, abs=1e-7)
    assert [p.name for p in layout.list_checkpoints(run_copy)] == ["checkpoint-000002", "checkpoint-000004"]
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".tmp-")]
    # An interrupted re-run now auto-resumes the new branch, not the old one.
    assert ckpt.resolve_resume("auto", run_copy) == run_copy / "checkpoint-000004"


def test_the_dataset_root_is_refused_as_train_dir(tiny_world, tmp_path, run_cli, sd3_env):
    root = tmp_path / "dataset"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    args = golden_command(tiny_world, tmp_path / "run")
    args[1] = str(root)
    one_line_error(run_cli(*args, env=sd3_env), "TRAIN_DIR holds the val split", str(root / "train"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("damage", ["truncated-state", "garbage-state", "no-optimizer", "garbage-lora"])
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_offered(
    run_copy, tiny_world, damage, run_cli, sd3_env
):
    newest = run_copy / "checkpoint-000004"
    state_path, lora_path = newest / layout.TRAINING_STATE, newest / layout.LORA_WEIGHTS
    if damage == "truncated-state":
        state_path.write_bytes(state_path.read_bytes()[:100])
    elif damage == "garbage-state":
        state_path.write_bytes(os.urandom(2000))
    elif damage == "no-optimizer":
        state = torch.load(state_path, weights_only=True)
        del state["optimizer"]
        torch.save(state, state_path)
    else:
        lora_path.write_bytes(os.urandom(3000))
    bad = lora_path if damage == "garbage-lora" else state_path
    args = golden_command(
        tiny_world, run_copy, "--num-training-steps", "6", "--allow-changed", "num-training-steps"
    )
    result = run_cli(*args, env=sd3_env)
    one_line_error(result, str(bad), f"--resume {run_copy / 'checkpoint-000002'}")
    if damage == "no-optimizer":
        assert "lacks optimizer" in result.output
    # Taking the advice works.
    args += ["--resume", str(run_copy / "checkpoint-000002")]
    assert run_cli(*args, env=sd3_env).exit_code == 0


def _signalled_run(tiny_world, tiny_sd3, run_dir: Path, signal_name: str, times: str, at: int = 5):
    return subprocess.run(
        [sys.executable, str(HERE / "signal_mid_step.py"), str(at), signal_name, times,
         *golden_command(tiny_world, run_dir)],
        env=subprocess_env(tiny_sd3), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("signal_name, code", [("TERM", 143), ("INT", 130)])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_exactly(
    golden_run, tiny_world, tiny_sd3, tmp_path, signal_name, code
):
    run_dir = tmp_path / "run"
    # Forward call 5 is the first micro-batch of step 3: the run finishes step 3, saves it and stops.
    proc = _signalled_run(tiny_world, tiny_sd3, run_dir, signal_name, "once")
    assert proc.returncode == code, proc.stderr[-3000:]
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["checkpoint-000002", "checkpoint-000003"]
    said = [line for line in proc.stderr.splitlines() if "resume with the same command" in line]
    assert len(said) == 1 and "stopped at step 3" in said[0]
    assert "Traceback" not in proc.stderr
    invoke(golden_command(tiny_world, run_dir), {SD3_MODEL_ENV: str(tiny_sd3)})
    assert losses(run_dir) == pytest.approx(losses(golden_run), rel=1e-6, abs=1e-7)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_a_second_signal_stops_at_once(tiny_world, tiny_sd3, tmp_path):
    run_dir = tmp_path / "run"
    proc = _signalled_run(tiny_world, tiny_sd3, run_dir, "TERM", "twice")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["checkpoint-000002"]
    assert "Traceback" not in proc.stderr and "second SIGTERM" in proc.stderr


_LOADER_HELD_AT_EXIT = """
import os, signal, torch
from pathlib import Path
from sd3_lora_celeba.data.cached import unpack
from sd3_lora_celeba.train.recipe import FineTuneConfig, build_loader

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"id": str(i), "variant": "v", "latents": torch.full((2,), float(i))}

config = FineTuneConfig(train_dir=Path("."), empty_prompt_dir=Path("."), model_name="m", dataloader_num_workers=2)
batches = iter(build_loader(config, Items(), [[0], [1]] * 50, torch.device("cpu")))
unpack(next(batches)), unpack(next(batches))  # one from each worker: both have set their signal handling
for worker in batches._workers:  # what a job scheduler does: signal every process of the job
    os.kill(worker.pid, signal.SIGTERM)
print([int(unpack(next(batches))["latents"][0, 0]) for _ in range(6)], flush=True)
# the script ends with the loader and its workers still referenced
"""


def test_loader_workers_ignore_sigterm_yet_never_hold_up_the_exit(tmp_path):
    """Workers leave SIGTERM to the main process (it finishes the step); multiprocessing's exit handler ends them
    with SIGTERM as well, and before the fix a loader still referenced at exit hung the process for good."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LOADER_HELD_AT_EXIT], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit while its loader workers were alive")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["[0,", "1,", "0,", "1,", "0,", "1]"]  # both workers kept serving batches
