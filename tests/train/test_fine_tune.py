"""The fine-tune loop: golden losses, exact resume after SIGKILL, DDP, the seed command, NaN handling, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    GOLDEN_FILE,
    GOLDEN_FILE_ARGS,
    GOLDEN_STEPS,
    golden_command,
    invoke,
    losses,
    subprocess_env,
)

from sd3_lora_celeba import layout
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.train import checkpoint as ckpt
from sd3_lora_celeba.train import flow
from sd3_lora_celeba.train.tracking import read_metrics

HERE = Path(__file__).parent


def test_golden_losses(tiny_world, tiny_sd3, tmp_path):
    """Regenerate with ``python tests/train/make_golden.py`` (and say why in the commit)."""
    invoke(golden_command(tiny_world, tmp_path / "run", *GOLDEN_FILE_ARGS), {SD3_MODEL_ENV: str(tiny_sd3)})
    expected = json.loads(GOLDEN_FILE.read_text())["losses"]
    got = losses(tmp_path / "run")
    assert len(got) == GOLDEN_STEPS
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_run_folder_and_metrics(golden_run):
    assert [p.name for p in layout.list_checkpoints(golden_run)] == ["checkpoint-000002", "checkpoint-000004"]
    for c in layout.list_checkpoints(golden_run):
        assert {p.name for p in c.iterdir()} == {
            layout.LORA_WEIGHTS,
            layout.ADAPTER_CONFIG,
            layout.TRAINING_STATE,
            layout.RUN_CONFIG,
        }
    rows = read_metrics(golden_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert sum(row["sigma_hist"]) == 4  # 2 micro-batches of 2
        assert row["shift"] == 3.0 and row["grad_norm"] > 0 and row["images_per_s"] > 0 and not row["skipped"]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)  # one warmup step, then cosine
    assert rows[3]["lr"] < rows[2]["lr"] < rows[1]["lr"]
    state = ckpt.load_training_state(golden_run / "checkpoint-000002")
    assert state["step"] == 2 and state["consumed"] == 8
    assert set(state) >= {"optimizer", "lr_scheduler", "scaler", "rng", "sampler", "nan_streak"}
    assert json.loads((golden_run / layout.RUN_CONFIG).read_text())["lora_alpha"] == 8.0


KILL_AFTER_WRITES = HERE.parent / "reliability" / "kill_after_writes.py"


@pytest.mark.parametrize(
    "killer, point, checkpoints_left",
    [
        # 2 micro-batches per step: forward call 6 is the 2nd micro-batch of step 3, after checkpoint-000002.
        (HERE / "kill_mid_step.py", "6", ["checkpoint-000002"]),
        # Forward call 3: inside step 2, before any checkpoint exists: the resume starts from scratch.
        (HERE / "kill_mid_step.py", "3", []),
        # While publishing checkpoint-000004: its folder is complete under a temporary name, not yet renamed.
        (KILL_AFTER_WRITES, "name=checkpoint-000004", ["checkpoint-000002"]),
    ],
    ids=["mid-step-3", "mid-step-2-no-checkpoint", "publishing-checkpoint-4"],
)
def test_sigkill_then_resume_gives_the_same_losses(
    golden_run, tiny_world, tiny_sd3, tmp_path, killer, point, checkpoints_left
):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(killer), point, *golden_command(tiny_world, run_dir)],
        env=subprocess_env(tiny_sd3),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in layout.list_checkpoints(run_dir)] == checkpoints_left
    invoke(golden_command(tiny_world, run_dir, "--resume", "auto"), {SD3_MODEL_ENV: str(tiny_sd3)})
    assert losses(run_dir) == pytest.approx(losses(golden_run), rel=1e-6, abs=1e-7)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    torch.testing.assert_close(
        _lora(run_dir / "checkpoint-000004"), _lora(golden_run / "checkpoint-000004"), rtol=1e-6, atol=1e-7
    )
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]


def _lora(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / layout.LORA_WEIGHTS))


def _free_port() -> int:
    """A free TCP port: the default 29500 may be taken by another DDP run on the machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_cpu_processes_match_one_process(
    golden_run, tiny_world, tiny_sd3, tmp_path, two_process_launch
):
    """2 processes x batch 1 see the same global batches as 1 process x batch 2: same losses (DDP over gloo).

    ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher); real CPU DDP
    is ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath).
    """
    run_dir = tmp_path / "ddp"
    command = golden_command(tiny_world, run_dir)
    command[command.index("--batch-size") + 1] = "1"
    proc = subprocess.run(
        [*two_process_launch, "--main_process_port", str(_free_port()),
         "-m", "sd3_lora_celeba.cli", "--quiet", *command],
        env={**subprocess_env(tiny_sd3), "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["checkpoint-000002", "checkpoint-000004"]
    assert losses(run_dir) == pytest.approx(losses(golden_run), rel=1e-4)
    torch.testing.assert_close(
        _lora(run_dir / "checkpoint-000004"), _lora(golden_run / "checkpoint-000004"), rtol=1e-3, atol=1e-6
    )


SEED_FLAGS = [
    "--amp",
    "--lora-blocks", "4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22",
    "--lora-rank", "64",
    "--learning-rate", "1e-4",
    "--adam-weight-decay", "1e-4",
    "--num-training-steps", "1",  # 20 micro-batches of 3 at bf16 on a CPU: one step keeps the test short
    "--gradient-accumulation-steps", "20",
    "--batch-size", "3",
    "--lr-scheduler", "cosine",
    "--lr-warmup-steps", "500",
    "--weighting-scheme", "logit_normal",
    "--logit-mean", "-0.5",
]  # fmt: skip


def test_seed_readme_command_runs_and_a_rerun_does_not_clobber(
    tiny_world, tmp_path, monkeypatch, run_cli, sd3_env
):
    monkeypatch.chdir(tmp_path)
    args = ["fine-tune", tiny_world / "train", tiny_world / layout.EMPTY_PROMPT_DIR, *SEED_FLAGS]
    result = run_cli(*args, env=sd3_env)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "fine-tune"  # the documented default --output-dir
    assert [p.name for p in layout.list_checkpoints(run_dir)] == ["checkpoint-000001"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] > 0
    assert sum(rows[0]["sigma_hist"]) == 60
    config = json.loads((run_dir / layout.RUN_CONFIG).read_text())
    assert config["amp"] and config["lora_rank"] == 64 and config["logit_mean"] == -0.5
    before = (run_dir / "checkpoint-000001" / layout.LORA_WEIGHTS).read_bytes()
    # Running the same command again finds the finished run and leaves it alone.
    again = run_cli(*args, env=sd3_env)
    assert again.exit_code == 0, again.output
    assert (run_dir / "checkpoint-000001" / layout.LORA_WEIGHTS).read_bytes() == before
    assert len(read_metrics(run_dir)) == 1


def test_nan_loss_is_reported_skipped_and_never_saved(tiny_world, tmp_path, monkeypatch, run_cli, sd3_env):
    real = flow.weighted_mse
    calls = {"n": 0}

    def poisoned(model_pred, target, weighting):
        calls["n"] += 1
        loss = real(model_pred, target, weighting)
        return loss * float("inf") if calls["n"] >= 3 else loss  # from step 2 on (2 micro-batches per step)

    monkeypatch.setattr(flow, "weighted_mse", poisoned)
    run_dir = tmp_path / "run"
    args = golden_command(tiny_world, run_dir, "--max-nan-steps", "2", "--checkpointing-steps", "1")
    result = run_cli(*args, env=sd3_env)
    assert result.exit_code != 0
    assert "2 consecutive non-finite steps" in str(result.exception)
    assert "step 2: non-finite loss" in result.output
    rows = read_metrics(run_dir)
    assert [r["skipped"] for r in rows] == [False, True, True]
    assert rows[1]["loss"] is None
    # Only the healthy step and the skipped (unchanged, finite) step 2 could be saved; nothing non-finite.
    for c in layout.list_checkpoints(run_dir):
        assert all(bool(torch.isfinite(v).all()) for v in _lora(c).values())
    torch.testing.assert_close(_lora(run_dir / "checkpoint-000002"), _lora(run_dir / "checkpoint-000001"))


def test_checkpoint_refuses_non_finite_lora(tmp_path):
    from diffusers import SD3Transformer2DModel

    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    model = SD3Transformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=8, out_channels=16, pos_embed_max_size=16,
    )  # fmt: skip
    add_lora(model, lora_config(lora_target_modules(model, [0]), rank=2))
    next(p for n, p in model.named_parameters() if "lora_B" in n).data.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        ckpt.save_checkpoint(tmp_path, 1, transformer=model, training_state={}, config=_Cfg())
    assert not any(tmp_path.iterdir()) or layout.list_checkpoints(tmp_path) == []


class _Cfg:
    pass


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-blocks", "4,30"], "block 30 does not exist"),
        (["--lora-layers", "to_x"], "no linear layer 'to_x'"),
        (["--lora-rank", "0"], "--lora-rank 0: must be at least 1"),
        (["--learning-rate", "nan"], "--learning-rate"),
        (["--learning-rate", "inf"], "--learning-rate"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
        (["--adam-beta1", "1.5"], "--adam-beta1 1.5: must be between"),
        (["--caption-dropout", "1.5"], "--caption-dropout 1.5: must be between 0 and 1"),
        (["--seed", "-1"], "--seed -1"),
        (["--seed", str(2**32)], "--seed 4294967296"),
        (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be at least 0"),
        (["--logit-std", "nan"], "--logit-std"),
        (["--shift", "0"], "--shift must be positive"),
        (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit 0: must be at least 1"),
        (["--validation-num-images", "0"], "--validation-num-images 0: must be at least 1"),
        (["--validation-batch-size", "0"], "--validation-batch-size 0: must be at least 1"),
        (["--allow-changed", "no-such-flag"], "--allow-changed no-such-flag: not an option"),
        (["--mixed-precision", "bf16"], "only applies with --amp"),
        (["--resume", "latest"], "no complete checkpoint"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_world, tmp_path, extra, message, run_cli, sd3_env):
    result = run_cli(*golden_command(tiny_world, tmp_path / "run", *extra), env=sd3_env)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_caches_are_one_line_errors(tiny_world, tmp_path, run_cli, sd3_env):
    from train_helpers import make_examples

    make_examples(tmp_path / "raw", 2)
    result = run_cli(*(golden_command(tiny_world, tmp_path / "run")[:1] + [tmp_path / "raw"]
                     + golden_command(tiny_world, tmp_path / "run")[2:]), env=sd3_env)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "compute-latent-dist" in result.output and len(result.output.strip().splitlines()) == 1


def test_resuming_a_checkpoint_of_another_config_is_refused(
    golden_run, tiny_world, tmp_path, run_cli, sd3_env
):
    args = golden_command(tiny_world, tmp_path / "run", "--resume", str(golden_run / "checkpoint-000002"))
    args[args.index("--lora-rank") + 1] = "8"
    result = run_cli(*args, env=sd3_env)
    assert result.exit_code == 2, result.output
    assert "incompatible run" in result.output and "lora_rank 4 -> 8" in result.output
    # --resume never refuses a folder that already holds checkpoints.
    never = run_cli(*golden_command(tiny_world, golden_run, "--resume", "never"), env=sd3_env)
    assert never.exit_code == 2 and "already holds checkpoints" in never.output


def test_validation_fid_call_site(tiny_world, tmp_path, monkeypatch, run_cli, sd3_env):
    """--validation-fid-every N calls the evaluate stage's validation_fid every N steps, logged to metrics.jsonl."""
    import sd3_lora_celeba.evaluate.validation as validation

    calls = []

    def fake_validation_fid(transformer, **kwargs):
        calls.append(kwargs)
        return 12.5

    monkeypatch.setattr(validation, "validation_fid", fake_validation_fid)
    args = golden_command(
        tiny_world, tmp_path / "run", "--validation-fid-every", "2", "--num-training-steps", "2"
    )
    missing = run_cli(*args, env=sd3_env)
    assert missing.exit_code == 2 and "validation split not found" in missing.output
    result = run_cli(
        *args, "--validation-dir", tiny_world / "train", "--validation-num-images", "3",
        "--validation-batch-size", "2", env=sd3_env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and calls[0]["num_images"] == 3 and calls[0]["split_dir"] == tiny_world / "train"
    assert calls[0]["batch_size"] == 2
    assert [r["validation_fid"] for r in read_metrics(tmp_path / "run") if "validation_fid" in r] == [12.5]
