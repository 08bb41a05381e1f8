"""``sd3 demo OUT``: every stage of the README, in order, on the bundled tiny world.

The commands are the README's, run through the real ``sd3`` entry point with the default models redirected to
the tiny offline world (see :mod:`sd3_lora_celeba.testing.world`). Only the fine-tune is shortened. Every stage
is resumable, so running the demo again redoes nothing and finishes in seconds::

    OUT/
    ├── world/                   synthetic releases + tiny models (testing.world)
    ├── dataset/                 prepare-* output, captions, caches; dataset/empty-prompt/
    ├── runs/fine-tune/          fine-tune run: metrics.jsonl, tensorboard/, checkpoint-*/
    ├── fid/ground-truth|pretrained|fine-tuned/   images + stats.npz (pytorch-fid)
    ├── fid-vs-step/             CSV + plot
    ├── experiment.yaml          the tiny experiment: two runs (m = -0.5, 0.5), one caption variant
    └── experiment/              its runs, scores, results.md / .csv, fid_vs_step / fid_vs_guidance figures
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import yaml

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = argument("Folder for everything the demo makes (reused on a re-run).")
    inception_weights: Path | None = option(
        None,
        "FID Inception weights file; default: random weights built for the demo (FID values meaningless).",
    )
    fine_tune_steps: int = option(12, "Optimizer steps of the demo's short fine-tune.")
    num_hq_images: int = option(60, "Images in the synthetic CelebAMask-HQ release.")
    model_family: Literal["sd3-medium", "sd3.5-medium", "sd3.5-large"] = option(
        "sd3-medium",
        "Shape of the tiny SD3 model: sd3-medium, sd3.5-medium (MMDiT-X blocks with attn2) or sd3.5-large "
        "(38 blocks). Use a separate OUT per family.",
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.fine_tune_steps < 2:
            raise ValueError("--fine-tune-steps must be at least 2 (the demo plots FID at two checkpoints)")
        if self.num_hq_images < 20:
            raise ValueError("--num-hq-images must be at least 20 so that every split gets images")


def _sd3(args: list[str]) -> Any:
    """Run one ``sd3`` command in this process, exactly as typed on a shell; returns what the stage returns."""
    from sd3_lora_celeba.cli import cli

    log.info("$ sd3 %s", " ".join(args))
    # Each stage runs the group callback again: hand it the demo's own --quiet / --verbose / --logging-style.
    root = logging.getLogger()
    group_options = ["--quiet"] if root.getEffectiveLevel() > logging.INFO else []
    if os.environ.get("DIFFUSERS_VERBOSITY") == "warning":  # what `sd3 --verbose` sets
        group_options.append("--verbose")
    if root.handlers and type(root.handlers[0]).__name__ != "RichHandler":
        group_options += ["--logging-style", "plain"]
    try:
        return cli.main(args=[*group_options, *args], prog_name="sd3", standalone_mode=False)
    except click.ClickException as exc:
        raise InputError(f"demo stage 'sd3 {args[0]}' failed: {exc.format_message()}") from None


def _pytorch_fid(args: list[str], cwd: Path) -> str:
    """Run the ``pytorch-fid`` command (as the README does) and return what it printed."""
    exe = shutil.which("pytorch-fid")
    cmd = [exe] if exe else [sys.executable, "-m", "pytorch_fid"]
    log.info("$ (cd %s && pytorch-fid %s)", cwd, " ".join(args))
    result = subprocess.run(
        cmd + ["--device", "cpu", "--num-workers", "0"] + args, cwd=cwd, capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"demo stage 'pytorch-fid {' '.join(args)}' failed: {tail}")
    return result.stdout.strip()


def demo(config: DemoConfig) -> dict[str, Path]:
    """Every README stage on a tiny offline world, in README order; a re-run redoes nothing finished."""
    start = time.perf_counter()
    out = config.out.resolve()
    world, weights = _tiny_world(config, out)
    dataset, run_dir, fid = out / "dataset", out / "runs" / "fine-tune", out / "fid"
    _prepare_caption_encode(world, dataset)
    checkpoint = _fine_tune(dataset, run_dir, config.fine_tune_steps)
    scores = _fid_stages(dataset / "test", fid, run_dir, checkpoint, weights, out)
    # Reproducing the results: the experiment command on a tiny grid.
    experiment_file = out / "experiment.yaml"
    atomic_write_text(experiment_file, yaml.safe_dump(_tiny_experiment(dataset, out / "experiment", weights)))
    results = _sd3(["experiment", str(experiment_file)])

    outputs = {
        "dataset (splits, captions, caches)": dataset,
        "LoRA run (metrics.jsonl, tensorboard, checkpoints)": run_dir,
        "last LoRA checkpoint": checkpoint,
        "FID image folders": fid,
        "FID vs step (CSV + plot)": out / "fid-vs-step",
        "experiment (results.md, figures, manifest)": out / "experiment",
        "tiny models and synthetic releases": world.root,
    }
    _print_summary(outputs, scores, results["table"], time.perf_counter() - start)
    return outputs


def _tiny_world(config: DemoConfig, out: Path) -> tuple[Any, Path]:
    """The tiny models and synthetic releases (built once), this process pointed at them; the Inception weights."""
    from sd3_lora_celeba.testing.world import build_tiny_world

    try:
        world = build_tiny_world(
            out / "world", num_hq_images=config.num_hq_images, model_family=config.model_family
        )
    except ValueError as exc:  # a world of another model family
        raise InputError(f"OUT {config.out}: {exc}") from None
    os.environ.update(world.env())
    if config.inception_weights is not None:
        from sd3_lora_celeba.testing.inception import install_inception_weights

        install_inception_weights(config.inception_weights, world.torch_home)
    return world, config.inception_weights or world.inception_weights


def _prepare_caption_encode(world: Any, dataset: Path) -> None:
    """Prepare the datasets, caption the images, cache latents and prompt embeddings (README sections 1-3)."""
    _sd3(["prepare-celeba-hq", str(world.celeba_hq), str(dataset)])
    _sd3(["prepare-celeba", str(world.celeba), str(world.celeba_hq), str(dataset)])
    _sd3(["caption-blip2", str(dataset)])
    _sd3(["caption-llama3", str(dataset)])
    _sd3(["compute-latent-dist", str(dataset)])
    for encoder in ("1", "2", "3"):
        _sd3(["compute-prompt-embeds", encoder, str(dataset)])
    # The empty prompt, made as the README makes it.
    empty = dataset / layout.EMPTY_PROMPT_DIR
    empty.mkdir(exist_ok=True)
    (empty / layout.prompt_file("empty")).touch()
    for encoder in ("1", "2", "3"):
        _sd3(["compute-prompt-embeds", encoder, str(empty)])


def _fine_tune(dataset: Path, run_dir: Path, steps: int) -> Path:
    """The README's fine-tune hyperparameters, shortened to ``steps``; returns the last checkpoint."""
    _sd3(
        [
            "fine-tune", str(dataset / "train"), str(dataset / layout.EMPTY_PROMPT_DIR),
            "--amp",
            "--lora-blocks", "4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22",
            "--lora-rank", "64",
            "--learning-rate", "1e-4",
            "--adam-weight-decay", "1e-4",
            "--num-training-steps", str(steps),
            "--gradient-accumulation-steps", "2",
            "--batch-size", "3",
            "--lr-scheduler", "cosine",
            "--lr-warmup-steps", str(max(1, steps // 6)),
            "--weighting-scheme", "logit_normal",
            "--logit-mean", "-0.5",
            "--output-dir", str(run_dir),
            "--checkpointing-steps", str(max(1, steps // 2)),
        ]
    )  # fmt: skip
    return layout.list_checkpoints(run_dir)[-1]


def _fid_stages(test: Path, fid: Path, run_dir: Path, checkpoint: Path, weights: Path, out: Path) -> dict:
    """The README's FID commands (pytorch-fid on the image folders), ``sd3 fid`` and the sweep over steps;
    returns what pytorch-fid printed for the pretrained and fine-tuned folders."""
    _sd3(["copy-images", str(test), str(fid / "ground-truth")])
    _sd3(["generate-images", str(test), str(fid / "pretrained")])
    _sd3(["generate-images", str(test), str(fid / "fine-tuned"), "--lora-weight-dir", str(checkpoint)])
    for name in ("ground-truth", "pretrained", "fine-tuned"):
        # The folders are complete once their stage returned, so statistics from an earlier run still hold.
        if not (fid / name / "stats.npz").is_file():
            _pytorch_fid(["--save-stats", ".", "stats.npz"], cwd=fid / name)
    scores = {
        name: _pytorch_fid([str(fid / "ground-truth" / "stats.npz"), str(fid / name / "stats.npz")], cwd=fid)
        for name in ("pretrained", "fine-tuned")
    }
    _sd3(["fid", str(fid / "ground-truth"), str(fid / "fine-tuned"), "--inception-weights", str(weights)])
    _sd3(
        ["fid-vs-step", str(run_dir), str(test), "--output-dir", str(out / "fid-vs-step"),
         "--inception-weights", str(weights), "--num-inference-steps", "8"]
    )  # fmt: skip
    return scores


def _print_summary(outputs: dict[str, Path], scores: dict[str, str], table_md: str, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, width=max(120, shutil.get_terminal_size().columns))
    table = Table(title=f"sd3 demo finished in {seconds:.0f} s")
    table.add_column("output")
    table.add_column("where", overflow="fold")
    for what, where in outputs.items():
        table.add_row(what, str(where))
    for name, line in scores.items():
        table.add_row(f"pytorch-fid, {name} (random weights: meaningless)", line)
    console.print(table)
    click.echo("Results of the tiny experiment (random weights: meaningless):\n" + table_md)


def _tiny_experiment(dataset: Path, output_dir: Path, inception_weights: Path) -> dict[str, Any]:
    """The README's experiment file, shrunk: two runs, one caption variant, two checkpoints, four images."""
    return {
        "output_dir": str(output_dir),
        "run_label": "Fine-Tuned with $m = {logit_mean}$",
        "fine_tune": {
            "train_dir": str(dataset / "train"),
            "empty_prompt_dir": str(dataset / layout.EMPTY_PROMPT_DIR),
            "logit_mean": [-0.5, 0.5],
            "lora_blocks": [4, 5, 6, 7],
            "lora_rank": 8,
            "learning_rate": 1e-3,
            "num_training_steps": 2,
            "checkpointing_steps": 1,
            "batch_size": 3,
            "lr_warmup_steps": 0,
            "dataloader_num_workers": 0,
            "report_to": "none",
        },
        "evaluation": {
            "split_dir": str(dataset / "test"),
            "caption_variants": ["blip2"],
            "guidance_scale": 7.0,
            "guidance_scales": [3.0, 7.0],
            "num_images": 4,
            "num_inference_steps": 4,
            "dims": 64,  # a 64 x 64 covariance: each score takes a second, not a minute, on a CPU
            "inception_weights": str(inception_weights),
            "bootstrap_samples": 50,
            "kid_subsets": 10,
        },
    }
