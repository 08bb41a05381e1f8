"""Failures at the edges of every command, through ``sd3 <command>``: exit code and one line, no traceback.

Models that are not there (folders and hub ids), Ctrl-C and SIGTERM, a full or read-only disk, CUDA out of
memory, NaN / infinite / out-of-range numbers, and library noise (quiet unless ``--verbose``).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd3_lora_celeba.models.loading import SD3_MODEL_ENV


def one_line(result, *needles: str) -> str:
    """The single line a failed command printed, checked for ``needles``."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def dataset(tmp_path, write_example) -> Path:
    """Two examples: BLIP-2 captions only, so every model stage (captioning and encoding) has work to do."""
    root = tmp_path / "dataset"
    for i in range(2):
        write_example(root / "train", f"ex-{i:03d}", seed=i, captions=("blip2",))
    return root


def _model_commands(dataset: Path) -> dict[str, list[str]]:
    return {
        "compute-latent-dist": ["compute-latent-dist", str(dataset)],
        "compute-prompt-embeds": ["compute-prompt-embeds", "3", str(dataset)],
        "caption-llama3": ["caption-llama3", str(dataset)],
    }


# --- models that are not there ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["compute-latent-dist", "compute-prompt-embeds", "caption-llama3"])
def test_model_folders_that_are_not_the_model(run_cli, dataset, tmp_path, tiny_sd3, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = _model_commands(dataset)[command]
    for folder, needle in (
        (tmp_path / "missing", "the folder does not exist"),
        (empty, "the folder is empty"),
        # A transformers model folder where a diffusers pipeline (or a chat model) is expected.
        (tiny_sd3 / "text_encoder" if command != "caption-llama3" else tiny_sd3, "not"),
    ):
        result = run_cli(*args, "--model-name", folder)
        assert result.exit_code == 2, result.output
        one_line(result, str(folder), needle, "--model-name")


def test_caption_blip2_with_a_missing_model(run_cli, tmp_path, write_example):
    root = tmp_path / "uncaptioned"
    write_example(root / "train", "ex-000", captions=())
    result = run_cli("caption-blip2", root, "--model-name", tmp_path / "no-blip2")
    assert result.exit_code == 2
    one_line(result, "no-blip2", "the folder does not exist")


@pytest.mark.parametrize("command", ["compute-latent-dist", "compute-prompt-embeds", "caption-llama3"])
def test_default_hub_model_not_downloaded_while_offline(run_cli, dataset, monkeypatch, tmp_path, command):
    from huggingface_hub import constants

    for env in (SD3_MODEL_ENV, "SD3_LLAMA3_MODEL_NAME"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli(*_model_commands(dataset)[command], env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2, result.output
    one_line(result, "not in the local hub cache", "hf download ", "HF_HUB_OFFLINE", "--model-name DIR")


@pytest.mark.parametrize("command", ["compute-latent-dist", "caption-llama3"])
def test_gated_model_without_login(run_cli, dataset, fake_hub, command):
    fake_hub(401, "GatedRepo")
    result = run_cli(*_model_commands(dataset)[command], "--model-name", "gated-org/gated-model")
    assert result.exit_code == 2, result.output
    one_line(result, "gated-org/gated-model", "accept its licence", "hf auth login")


# --- interruptions, disks, memory ---------------------------------------------------------------------------


@pytest.fixture
def copy_args(tmp_path, write_example) -> list[str]:
    split = tmp_path / "test"
    write_example(split, "ex-000", captions=())
    return ["copy-images", str(split), str(tmp_path / "out")]


def _stage_raising(monkeypatch, module: str, function: str, error: BaseException | None = None, action=None):
    import importlib

    def stage(config):
        if action is not None:
            action()
        raise error

    monkeypatch.setattr(importlib.import_module(module), function, stage)


def test_ctrl_c_is_one_line_and_exit_130(run_cli, monkeypatch, copy_args):
    _stage_raising(monkeypatch, "sd3_lora_celeba.evaluate.copy_images", "copy_images", KeyboardInterrupt())
    result = run_cli(*copy_args)
    assert result.exit_code == 130
    one_line(result, "interrupted; re-run the same command to resume")


def test_sigterm_is_one_line_and_exit_143(run_cli, monkeypatch, copy_args):
    def wait_for_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this at once

    before = signal.getsignal(signal.SIGTERM)
    _stage_raising(
        monkeypatch,
        "sd3_lora_celeba.evaluate.copy_images",
        "copy_images",
        RuntimeError("not reached"),
        wait_for_sigterm,
    )
    started = time.monotonic()
    result = run_cli(*copy_args)
    assert time.monotonic() - started < 8
    assert result.exit_code == 143
    one_line(result, "interrupted; re-run the same command to resume")
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is removed afterwards


def test_ctrl_c_in_a_real_process(tmp_path, write_example):
    split = tmp_path / "test"
    write_example(split, "ex-000", captions=())
    code = (
        "import os, signal, time\n"
        "import sd3_lora_celeba.evaluate.copy_images as m\n"
        "from sd3_lora_celeba.cli import main\n"
        "def stage(config):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(10)\n"
        "m.copy_images = stage\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "copy-images", str(split), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "interrupted; re-run the same command to resume"
    assert "Traceback" not in result.stderr and "Aborted" not in result.stderr


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.ENOSPC, "no space left"),
        (errno.EDQUOT, "quota"),
        (errno.EROFS, "read-only file system; choose a writable output folder"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_disk_errors_are_one_line(run_cli, monkeypatch, copy_args, code, fix):
    target = str(Path(copy_args[2]) / "ex-000.jpg")
    _stage_raising(
        monkeypatch,
        "sd3_lora_celeba.evaluate.copy_images",
        "copy_images",
        OSError(code, os.strerror(code), target),
    )
    result = run_cli(*copy_args)
    assert result.exit_code == 2
    one_line(result, target, fix)


def test_other_os_errors_are_not_hidden(run_cli, monkeypatch, copy_args):
    _stage_raising(
        monkeypatch,
        "sd3_lora_celeba.evaluate.copy_images",
        "copy_images",
        OSError(errno.EIO, "I/O error", "x"),
    )
    result = run_cli(*copy_args)
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO


@pytest.mark.parametrize(
    "module, function, args, lower",
    [
        (
            "sd3_lora_celeba.encode.latents",
            "compute_latent_dist",
            ["compute-latent-dist", "{d}"],
            "--batch-size",
        ),
        (
            "sd3_lora_celeba.train.recipe",
            "fine_tune",
            ["fine-tune", "{d}/train", "{d}"],
            "--gradient-checkpointing",
        ),
    ],
)
def test_cuda_out_of_memory_names_the_option(run_cli, monkeypatch, dataset, module, function, args, lower):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    _stage_raising(monkeypatch, module, function, oom)
    result = run_cli(*[a.format(d=dataset) for a in args])
    assert result.exit_code == 2, result.output
    one_line(result, args[0], "out of GPU memory", "lower --batch-size", lower)


# --- numbers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["fine-tune", "{d}/train", "{d}", "--learning-rate", "nan"],
            "--learning-rate nan: not a finite number",
        ),
        (
            ["fine-tune", "{d}/train", "{d}", "--learning-rate", "inf"],
            "--learning-rate inf: not a finite number",
        ),
        (["fine-tune", "{d}/train", "{d}", "--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        (
            ["generate-images", "{d}/train", "{d}/out", "--seed", "4294967296"],
            "--seed 4294967296: must be between",
        ),
        (
            ["generate-images", "{d}/train", "{d}/out", "--guidance-scale", "-inf"],
            "--guidance-scale -inf: not a finite",
        ),
        (["caption-llama3", "{d}", "--seed", "99999999999"], "--seed 99999999999: must be between"),
        (["fid", "{d}/a", "{d}/b", "--seed", "x"], "--seed x: not an integer"),
    ],
)
def test_numbers_are_range_checked(run_cli, dataset, args, needle):
    result = run_cli(*[a.format(d=dataset) for a in args])
    assert result.exit_code == 2, result.output
    one_line(result, needle)


def test_nan_in_a_config_file(run_cli, dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: .nan\n")
    result = run_cli("fine-tune", dataset / "train", dataset, "--config", config)
    assert result.exit_code == 2
    one_line(result, str(config), "learning_rate", "finite")


# --- quiet by default ---------------------------------------------------------------------------------------

NOISY_STAGE = """
import logging, sys, warnings
import diffusers, transformers  # their loggers as configured on import
import sd3_lora_celeba.evaluate.copy_images as m
from sd3_lora_celeba.cli import main

def stage(config):
    warnings.warn_explicit(
        "`torch_dtype` is deprecated! Use `dtype` instead!", FutureWarning, "diffusers/modeling_utils.py", 1,
        module="diffusers.models.modeling_utils",
    )
    warnings.warn("Already found a `peft_config` attribute in the model. This will lead to multiple adapters")
    logging.getLogger("diffusers.loaders.peft").warning("No LoRA keys associated to NoneType found")
    logging.getLogger("transformers.tokenization_utils_base").warning(
        "Token indices sequence length is longer than the specified maximum sequence length"
    )
    print("stage ran")

m.copy_images = stage
main()
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_noise_only_with_verbose(tmp_path, write_example, verbose):
    split = tmp_path / "test"
    write_example(split, "ex-000", captions=())
    group = ["--verbose"] if verbose else []
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    result = subprocess.run(
        [sys.executable, "-c", NOISY_STAGE, *group, "copy-images", str(split), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "stage ran" in result.stdout
    noise = ("torch_dtype", "peft_config", "No LoRA keys", "Token indices sequence length")
    shown = [n for n in noise if n in result.stderr]
    assert shown == (list(noise) if verbose else []), result.stderr


def test_plain_logs_have_no_library_progress_bars(monkeypatch, tiny_sd3, tmp_path, capsys):
    import diffusers.utils.logging as diffusers_logging
    from click.testing import CliRunner
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from sd3_lora_celeba.cli import cli
    from sd3_lora_celeba.models.loading import load_pipeline_without_text_encoders

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    enable_progress_bars()
    diffusers_logging.enable_progress_bar()
    result = CliRunner().invoke(cli, ["--logging-style", "plain", "doctor", "--model-name", str(tiny_sd3)])
    assert "Versions:" in result.output
    assert are_progress_bars_disabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    capsys.readouterr()
    load_pipeline_without_text_encoders(str(tiny_sd3))
    assert not diffusers_logging.is_progress_bar_enabled()
    assert "Loading pipeline components" not in capsys.readouterr().err


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_is_one_line(run_cli, monkeypatch, dataset):
    def stage(config):
        torch.empty(2**50, dtype=torch.uint8, device="cuda")  # 1 PiB: more than any GPU has

    import sd3_lora_celeba.encode.latents as latents

    monkeypatch.setattr(latents, "compute_latent_dist", stage)
    result = run_cli("compute-latent-dist", dataset)
    assert result.exit_code == 2, result.output
    one_line(result, "compute-latent-dist: out of GPU memory; lower --batch-size")
