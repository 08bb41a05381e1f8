"""FID sweeps: ``fid-vs-step`` (every checkpoint of a run, plus the base model) and ``fid-vs-guidance``.

Both generate into one subfolder per point with :func:`sample.generate.generate_into` (same per-image seeds, so
points differ only by the model or the guidance scale), compare with the same ground-truth copy, and write a CSV
plus the README's figure after every point. Layout (``layout.py``)::

    SWEEP/                           fid-vs-step: RUN/fid-vs-step by default; fid-vs-guidance: --output-dir
    ├── sweep.json                   settings; a re-run with other settings is refused unless --overwrite
    ├── ground-truth/<id>.jpg        (+ fid_stats.npz)
    ├── step-000000/<id>.png         base model (fid-vs-step) | guidance-3/<id>.png (fid-vs-guidance)
    ├── fid_vs_step.csv              step,fid        | fid_vs_guidance.csv  guidance_scale,fid
    └── fid_vs_step.png                              | fid_vs_guidance.png  (best point marked)

Resumable at two levels: points already in the CSV are skipped, and a point's generation skips finished images.
Run single-process (the FID of a point needs all its images).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import argument, check_bounds, config_to_dict, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.evaluate import fid as F
from sd3_lora_celeba.evaluate.copy_images import copy_example_images
from sd3_lora_celeba.evaluate.plots import plot_fid_vs_guidance, plot_fid_vs_step
from sd3_lora_celeba.io import atomic_write_json, atomic_write_text
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, Precision, resolve_device
from sd3_lora_celeba.sample import generate as G

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class _SweepOptions(G.SkipLayerGuidance):
    """Options shared by both sweeps (generation + FID)."""

    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 diffusers model id or folder.", env=SD3_MODEL_ENV)
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    empty_prompt_dir: Path | None = option(None, "Cached empty prompt folder; default DATASET/empty-prompt.")
    prompt_variant: G.PromptVariant = option("blip2", "Which cached caption to use as the prompt.")
    num_inference_steps: int = option(28, "Denoising steps.", min=1, max=10_000)
    seed: int = option(0, "Base seed of the per-image noise.")
    num_images: int | None = option(None, "Only the first N examples by id (cheap subset); default all.")
    height: int | None = option(None, "Image height in px; default the model's native size.")
    width: int | None = option(None, "Image width in px; default the model's native size.")
    batch_size: int = option(4, "Images per pipeline call.", min=1)
    precision: Precision = option("auto", "Model dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    device: str | None = option(None, "Torch device; default cuda if available.")
    inception_weights: Path | None = option(None, "FID Inception weights file; default pytorch-fid's own.")
    dims: int = option(2048, "Inception feature size: 64, 192, 768 or 2048.")
    fid_batch_size: int | None = option(
        None, "Images per Inception forward pass; default 50 on a CPU, 200 on CUDA.", min=1
    )
    num_workers: int = option(0, "DataLoader workers for the FID features.", min=0)
    compile: bool = option(False, "torch.compile the transformer blocks (see generate-images --compile).")
    overwrite: bool = option(False, "Recompute every point and regenerate every image.")

    def _check(self) -> None:
        check_bounds(self)
        self._check_skip_layers()
        if self.num_images is not None and self.num_images < 2:
            raise ValueError("--num-images must be at least 2 (FID needs two images)")
        if self.dims not in F.DIMS:
            raise ValueError(f"--dims {self.dims}: use one of {', '.join(map(str, F.DIMS))}")


# Options that do not change any number of a sweep (so a resume may change them).
_NOT_SETTINGS = {
    "output_dir",
    "overwrite",
    "batch_size",
    "device",
    "fid_batch_size",
    "num_workers",
    "compile",
}


@dataclass(kw_only=True)
class FidVsStepConfig(_SweepOptions):
    run_dir: Path = argument("Fine-tune run folder holding checkpoint-<step>/ folders.")
    split_dir: Path = argument("Split whose prompts and ground truth are used (e.g. /path/to/dataset/val).")
    output_dir: Path | None = option(None, "Sweep folder; default RUN_DIR/fid-vs-step.")
    guidance_scale: float = option(7.0, "Classifier-free guidance scale.", min=0)
    include_base: bool = option(True, "Also evaluate step 0 = the base model without LoRA.")

    def __post_init__(self) -> None:
        self._check()


@dataclass(kw_only=True)
class FidVsGuidanceConfig(_SweepOptions):
    split_dir: Path = argument("Split whose prompts and ground truth are used (e.g. /path/to/dataset/val).")
    lora_weight_dir: Path | None = option(None, "LoRA checkpoint folder; default the base model.")
    guidance_scales: str = option("1,2,3,4,5,6,7", "Comma-separated guidance scales to try.")
    output_dir: Path = option(Path("fid-vs-guidance"), "Sweep folder.")

    def __post_init__(self) -> None:
        self._check()
        self.scales()

    def scales(self) -> list[float]:
        try:
            values = [float(v) for v in self.guidance_scales.split(",") if v.strip()]
        except ValueError:
            raise ValueError(
                f"--guidance-scales {self.guidance_scales!r}: give numbers like 1,2.5,3"
            ) from None
        if (
            not values
            or any(not math.isfinite(v) or v < 0 for v in values)
            or len(set(values)) != len(values)
        ):
            raise ValueError(
                f"--guidance-scales {self.guidance_scales!r}: give distinct non-negative numbers"
            )
        return values


# --- shared machinery ----------------------------------------------------------------------------------------


def read_csv(path: Path, key: str) -> dict[float, float]:
    """Finished points of a sweep CSV: key value -> FID."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                rows[float(row[key])] = float(row["fid"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{path}:{lineno}: bad row; delete the file or pass --overwrite") from None
    return rows


def write_csv(path: Path, key: str, rows: dict[float, float], as_int: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key, "fid"])
    for k in sorted(rows):
        writer.writerow([int(k) if as_int else k, repr(rows[k])])
    atomic_write_text(path, buf.getvalue())


def _check_inputs(config: _SweepOptions, split_dir: Path, lora_weight_dir: Path | None = None) -> None:
    """Fail on a bad device, split, empty prompt or LoRA file before the sweep writes anything."""
    resolve_device(config.device)
    # Local folders first: a missing split is named before the model is looked up.
    empty = G.find_empty_prompt_dir(split_dir, config.empty_prompt_dir)
    G.select_examples(split_dir, empty, config.num_images)
    limits = G.ModelLimits.of_model(config.model_name, config.model_revision)
    G.check_model_limits(limits, config.height, config.width, config.skip_guidance_layers)
    if lora_weight_dir is not None:
        G.check_lora_file(lora_weight_dir)


def _check_sweep_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    path = out / layout.SWEEP_SETTINGS
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise InputError(
                f"{path}: sweep was run with other settings ({', '.join(changed)}); "
                f"use another output folder or pass --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)


_SLG_KEYS = (
    "skip_guidance_layers",
    "skip_layer_guidance_scale",
    "skip_layer_guidance_start",
    "skip_layer_guidance_stop",
)


class _Sweep:
    """Everything one sweep needs once: examples, ground-truth statistics, Inception, the base pipeline."""

    def __init__(
        self, config: _SweepOptions, split_dir: Path, out: Path, lora_weight_dir: Path | None = None
    ):
        self.config = config
        self.out = out
        self.empty_prompt_dir = G.find_empty_prompt_dir(split_dir, config.empty_prompt_dir)
        self.examples = G.select_examples(split_dir, self.empty_prompt_dir, config.num_images)
        if len(self.examples) < 2:
            raise InputError(f"{split_dir}: {len(self.examples)} example(s); FID needs at least 2")
        self.device = resolve_device(config.device)
        self.dtype = G.resolve_precision(config.precision, self.device)
        gt_dir = out / layout.GROUND_TRUTH_DIR
        copy_example_images(self.examples, gt_dir, overwrite=config.overwrite)
        self.inception = F.load_inception(config.dims, config.inception_weights, self.device)
        self.gt_stats = self.statistics(gt_dir)
        F.warn_if_few_images({"each point": len(self.examples)}, config.dims)
        self.pipe = G.load_generation_pipeline(
            config.model_name,
            revision=config.model_revision,
            lora_weight_dir=lora_weight_dir,
            dtype=self.dtype,
            device=self.device,
            compile=config.compile,
            fuse_qkv=True,  # LoRA changes go through G.swap_lora
        )
        G.check_model_limits(self.pipe, config.height, config.width, config.skip_guidance_layers)

    def statistics(self, folder: Path) -> F.FidStats:
        c = self.config
        return F.folder_statistics(
            folder, self.inception, batch_size=c.fid_batch_size, num_workers=c.num_workers
        )

    def point(self, images_dir: Path, guidance_scale: float, lora: dict | None, desc: str) -> float:
        """Generate ``images_dir`` (resumable, all-or-nothing per setting) and return its FID."""
        c = self.config
        # Skip-layer guidance acts only with classifier-free guidance (scale > 1): record it only there.
        slg = c.slg_settings() if guidance_scale > 1 else {}
        settings = G.generation_settings(
            model_name=c.model_name,
            revision=c.model_revision,
            lora=lora,
            prompt_variant=c.prompt_variant,
            empty_prompt_dir=self.empty_prompt_dir,
            num_inference_steps=c.num_inference_steps,
            guidance_scale=guidance_scale,
            seed=c.seed,
            height=c.height,
            width=c.width,
            dtype=self.dtype,
            skip_layer_guidance=slg,
        )
        with G.folder_lock(images_dir, desc):
            G.claim_output_folder(images_dir, settings, c.overwrite)
            G.generate_into(
                self.pipe,
                self.examples,
                images_dir,
                empty_prompt_dir=self.empty_prompt_dir,
                prompt_variant=c.prompt_variant,
                num_inference_steps=c.num_inference_steps,
                guidance_scale=guidance_scale,
                seed=c.seed,
                height=c.height,
                width=c.width,
                batch_size=c.batch_size,
                desc=desc,
                skip_layer_guidance=slg,
            )
        value = F.frechet_distance(self.gt_stats, self.statistics(images_dir))
        log.info("%s: FID %.4f", desc, value)
        return value


def _settings(config: Any) -> dict[str, Any]:
    settings = {k: v for k, v in config_to_dict(config).items() if k not in _NOT_SETTINGS}
    if not settings.get("skip_guidance_layers"):  # off: the keys of sweeps made before skip-layer guidance
        for key in _SLG_KEYS:
            settings.pop(key, None)
    return settings


# --- commands ------------------------------------------------------------------------------------------------


def fid_vs_step(config: FidVsStepConfig) -> dict[int, float]:
    """FID of the base model (step 0) and of every checkpoint of a run; CSV and plot. Returns step -> FID."""
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found; pass the --output-dir of sd3 fine-tune")
    checkpoints = layout.list_checkpoints(run_dir)
    if not checkpoints:
        raise InputError(f"{run_dir}: no {layout.CHECKPOINT_PREFIX}<step>/ folder with {layout.LORA_WEIGHTS}")
    out = Path(config.output_dir) if config.output_dir is not None else run_dir / layout.FID_VS_STEP_DIR
    _check_inputs(config, Path(config.split_dir))
    with parallel.stage_lock(out, "fid-vs-step", "fid-vs-step"):
        return _fid_vs_step(config, out, checkpoints)


def _fid_vs_step(config: FidVsStepConfig, out: Path, checkpoints: list[Path]) -> dict[int, float]:
    _check_sweep_settings(out, _settings(config), config.overwrite)
    csv_path = out / layout.FID_VS_STEP_CSV
    rows = {} if config.overwrite else read_csv(csv_path, "step")
    points: list[tuple[int, Path | None]] = [(0, None)] if config.include_base else []
    points += [(layout.checkpoint_step(c) or 0, c) for c in checkpoints]
    todo = [(s, c) for s, c in points if float(s) not in rows]
    log.info("fid-vs-step: %d point(s), %d already in %s", len(points), len(points) - len(todo), csv_path)
    if todo:
        sweep = _Sweep(config, Path(config.split_dir), out)
        for step, ckpt in todo:
            G.swap_lora(sweep.pipe, ckpt)  # unfuses the previous checkpoint's LoRA first
            rows[float(step)] = sweep.point(
                layout.step_images_dir(out, step),
                config.guidance_scale,
                G.lora_fingerprint(ckpt),
                f"step {step}",
            )
            write_csv(csv_path, "step", rows, as_int=True)
    steps = sorted(rows)
    plot_fid_vs_step([int(s) for s in steps], [rows[s] for s in steps], out / layout.FID_VS_STEP_PLOT)
    return {int(s): rows[s] for s in steps}


def fid_vs_guidance(config: FidVsGuidanceConfig) -> dict[float, float]:
    """FID over guidance scales for one model; CSV and plot with the best scale marked. Returns scale -> FID."""
    out = Path(config.output_dir)
    _check_inputs(config, Path(config.split_dir), config.lora_weight_dir)
    with parallel.stage_lock(out, "fid-vs-guidance", "fid-vs-guidance"):
        return _fid_vs_guidance(config, out)


def _fid_vs_guidance(config: FidVsGuidanceConfig, out: Path) -> dict[float, float]:
    _check_sweep_settings(out, _settings(config), config.overwrite)
    csv_path = out / layout.FID_VS_GUIDANCE_CSV
    rows = {} if config.overwrite else read_csv(csv_path, "guidance_scale")
    todo = [s for s in config.scales() if s not in rows]
    if todo:
        sweep = _Sweep(config, Path(config.split_dir), out, lora_weight_dir=config.lora_weight_dir)
        lora = G.lora_fingerprint(config.lora_weight_dir)
        for scale in todo:
            rows[scale] = sweep.point(
                layout.guidance_images_dir(out, scale), scale, lora, f"guidance {scale:g}"
            )
            write_csv(csv_path, "guidance_scale", rows)
    scales = sorted(rows)
    plot_fid_vs_guidance(scales, [rows[s] for s in scales], out / layout.FID_VS_GUIDANCE_PLOT)
    best = min(rows, key=rows.get)
    log.info("fid-vs-guidance: best FID %.4f at guidance scale %g", rows[best], best)
    return rows
