"""``sd3 experiment CONFIG.yaml``: a grid of fine-tunes, scored against one ground truth, as a table and figures.

The file (YAML or TOML) holds the ``fine_tune`` options shared by every run, where any option given as a list
is a grid axis, and the ``evaluation``::

    output_dir: experiments/logit-mean          # optional; default: next to the file, named after it
    run_label: "Fine-Tuned with $m = {logit_mean}$"   # optional; {option} = the run's value
    fine_tune:                                  # the options of sd3 fine-tune
      train_dir: /path/to/dataset/train
      empty_prompt_dir: /path/to/dataset/empty-prompt
      logit_mean: [-0.5, 0.0, 0.5]              # three runs
      lora_blocks: [4, 5, 6]                    # a list option: one value (a list of lists is an axis)
    evaluation:                                 # the fields of EvaluationSpec below
      split_dir: /path/to/dataset/val
      caption_variants: [blip2, llama3]

Every run is trained (``fine_tune``, resumable), then the pretrained model and every run are scored: the table
(last checkpoint, every caption variant, ``guidance_scale``), FID vs step (``checkpoints``, first variant) and
FID vs guidance (``guidance_scales`` for ``guidance_runs``). A score is FID, a bootstrap band over the generated
images (:mod:`.bootstrap`) and KID. Folder::

    EXPERIMENT/
    ├── experiment.json                   resolved runs and evaluation (layout.EXPERIMENT_RECORD)
    ├── manifest.json                     versions, git revision, config hash, cache fingerprints, device
    ├── runs/<run>/                       one fine-tune run folder per grid point
    ├── ground-truth/<id>.jpg             (+ fid_stats.npz)
    ├── images/<model>/step-<step>/<variant>-g<guidance>/<id>.png   (+ generation.json, fid_stats.npz)
    ├── scores/<model>/step-<step>/<variant>-g<guidance>.json       one finished score each
    ├── results.md, results.csv, scores.csv
    └── fid_vs_step.{png,svg}, fid_vs_guidance.{png,svg}

``<model>`` is ``pretrained`` or the run name. Resumable at every level: finished runs are not retrained,
finished images not regenerated, finished scores (small JSON files written atomically) not recomputed; a re-run
that would change a number already on disk is refused. Under ``accelerate launch`` the processes train one run
at a time together (DDP) and split the scores between them. ``sd3 report EXPERIMENT`` redraws the table and
figures from the files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

import click

from sd3_lora_celeba import layout, parallel
from sd3_lora_celeba.config import (
    _resolved_hints,
    _unwrap_optional,
    argument,
    check_bounds,
    config_from_dict,
    config_to_dict,
    option,
)
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.evaluate import fid as F
from sd3_lora_celeba.io import atomic_write_json, output_lock, remove_stale_temp_files
from sd3_lora_celeba.models.loading import Precision, resolve_dtype
from sd3_lora_celeba.sample import generate as G
from sd3_lora_celeba.train.recipe import FineTuneConfig, fine_tune

log = logging.getLogger(__name__)

PRETRAINED = "pretrained"
_TOP_KEYS = ("output_dir", "run_label", "fine_tune", "evaluation")
# Set by the experiment for each run, or one per experiment (the pretrained row is one base model).
_NOT_IN_GRID = {"output_dir": "set by the experiment", "resume": "set by the experiment"}
_ONE_BASE_MODEL = ("model_name", "model_revision")
# Fine-tune options that change no number of a run (a resume may change them).
_RUN_NOT_SETTINGS = {"output_dir", "resume", "dataloader_num_workers", "report_to", "wandb_project"}
# Evaluation options that only choose what is scored or how fast (adding a variant is not a change).
_EVAL_NOT_SETTINGS = {
    "caption_variants",
    "guidance_scales",
    "guidance_runs",
    "checkpoints",
    "batch_size",
    "fid_batch_size",
}


@dataclass
class ExperimentConfig:
    config_file: Path = argument(
        "Experiment file (YAML or TOML): fine_tune options (lists = grid), evaluation."
    )
    output_dir: Path | None = option(
        None, "Experiment folder; default: output_dir in the file, else FILE's folder/FILE's stem."
    )
    dry_run: bool = option(False, "Print the runs and the number of scores, write nothing.")

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(kw_only=True)
class EvaluationSpec:
    """The ``evaluation`` section of an experiment file."""

    split_dir: Path | None = option(None, "Split whose prompts and ground truth are used (required).")
    empty_prompt_dir: Path | None = option(None, "Cached empty prompt; default DATASET/empty-prompt.")
    caption_variants: tuple[str, ...] = option(("blip2",), "Caption variants: the table's columns.")
    guidance_scale: float = option(7.0, "Guidance scale of the table and of FID vs step.")
    guidance_scales: tuple[float, ...] = option((1, 2, 3, 4, 5, 6, 7), "FID vs guidance scales; [] = none.")
    guidance_runs: str = option("best", "FID vs guidance for: best (lowest table FID), all, or run names.")
    checkpoints: str = option("all", "FID vs step checkpoints: all, last, or a list of steps.")
    num_images: int | None = option(None, "Images per score: the first N examples by id; default all.")
    seed: int = option(0, "Seed of the per-image noise, the bootstrap and KID.")
    num_inference_steps: int = option(28, "Denoising steps.")
    height: int | None = option(None, "Image height in px; default the model's native size.")
    width: int | None = option(None, "Image width in px; default the model's native size.")
    batch_size: int = option(4, "Images per pipeline call.")
    precision: Precision = option("auto", "Generation dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    dims: int = option(2048, "Inception feature size: 64, 192, 768 or 2048.")
    inception_weights: Path | None = option(None, "FID Inception weights file; default pytorch-fid's own.")
    fid_batch_size: int = option(50, "Images per Inception forward pass.")
    bootstrap_samples: int = option(200, "Bootstrap resamples of the generated images per score.")
    kid_subsets: int = option(100, "KID: random subsets.")
    kid_subset_size: int = option(1000, "KID: images per subset (capped at the number of images).")

    def __post_init__(self) -> None:
        if self.split_dir is None:
            raise ValueError("evaluation: split_dir is required, e.g. /path/to/dataset/val")
        if not self.caption_variants or len(set(self.caption_variants)) != len(self.caption_variants):
            raise ValueError("evaluation: caption_variants must list distinct variants, e.g. [blip2, llama3]")
        if len(set(self.guidance_scales)) != len(self.guidance_scales) or any(
            g < 0 for g in self.guidance_scales
        ):
            raise ValueError("evaluation: guidance_scales must be distinct non-negative numbers")
        if self.num_images is not None and self.num_images < 2:
            raise ValueError("evaluation: num_images must be at least 2 (FID needs two images)")
        if self.dims not in F.DIMS:
            raise ValueError(f"evaluation: dims {self.dims}: use one of {', '.join(map(str, F.DIMS))}")
        for name in ("num_inference_steps", "batch_size", "fid_batch_size", "kid_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluation: {name} must be at least 1")
        if self.bootstrap_samples < 2 or self.kid_subset_size < 2:
            raise ValueError("evaluation: bootstrap_samples and kid_subset_size must be at least 2")


@dataclass(frozen=True)
class Run:
    name: str  # folder name, from what varies: "logit_mean=-0.5"
    label: str  # table row and legend
    varying: dict[str, Any]
    config: FineTuneConfig
    steps: tuple[int, ...]  # checkpoints scored for FID vs step (the last one included)

    @property
    def final_step(self) -> int:
        return self.config.num_training_steps


@dataclass(frozen=True)
class Point:
    """One score: a model (``pretrained`` or a run) at a step, with a caption variant and a guidance scale."""

    model: str
    step: int
    variant: str
    guidance_scale: float

    @property
    def relpath(self) -> str:
        return f"{self.model}/step-{self.step:06d}/{self.variant}-g{self.guidance_scale:g}"

    def images_dir(self, out: Path) -> Path:
        return out / layout.EXPERIMENT_IMAGES_DIR / self.relpath

    def score_path(self, out: Path) -> Path:
        return out / layout.EXPERIMENT_SCORES_DIR / f"{self.relpath}.json"


@dataclass
class Plan:
    out: Path
    source: str
    spec: dict[str, Any]
    runs: list[Run]
    evaluation: EvaluationSpec

    @property
    def base(self) -> FineTuneConfig:
        return self.runs[0].config


# --- reading the experiment file -----------------------------------------------------------------------------


def _is_axis(hint: Any, value: Any) -> bool:
    """A list is a grid axis, except for a list-typed option, whose axis is a list of lists."""
    if not isinstance(value, list):
        return False
    if get_origin(_unwrap_optional(hint)[0]) is tuple:
        return bool(value) and all(isinstance(v, list) for v in value)
    return True


def expand_grid(fine_tune: dict[str, Any], source: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(all options, the varying ones) per grid point, in the file's axis order; keys checked first."""
    hints = _resolved_hints(FineTuneConfig)
    names = {f.name for f in dataclasses.fields(FineTuneConfig)}
    options = {str(k).replace("-", "_"): v for k, v in fine_tune.items()}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(
            f"{source}: fine_tune: unknown option(s) {', '.join(unknown)}; see sd3 fine-tune --help"
        )
    for key, why in _NOT_IN_GRID.items():
        if key in options:
            raise InputError(f"{source}: fine_tune: remove '{key}' ({why})")
    axes = {k: v for k, v in options.items() if _is_axis(hints[k], v)}
    for key, values in axes.items():
        if not values:
            raise InputError(f"{source}: fine_tune: '{key}' is an empty list; give at least one value")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise InputError(f"{source}: fine_tune: '{key}' lists a value twice")
        if key in _ONE_BASE_MODEL and len(values) > 1:
            raise InputError(
                f"{source}: fine_tune: '{key}' cannot vary (one pretrained model per experiment)"
            )
    shared = {k: v for k, v in options.items() if k not in axes}
    for f in dataclasses.fields(FineTuneConfig):  # the option's environment default, as on the command line
        env = f.metadata.get("env")
        if env and f.name not in options and os.environ.get(env):
            shared[f.name] = os.environ[env]
    grid = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo, strict=True))
        varying = {k: v for k, v in point.items() if len(axes[k]) > 1}
        grid.append(({**shared, **point}, varying))
    return grid


def _value_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run_name(varying: dict[str, Any]) -> str:
    """Folder name of a run from what varies, e.g. ``logit_mean=-0.5``; ``run`` when nothing varies."""
    if not varying:
        return "run"
    name = "-".join(f"{k}={_value_text(v)}" for k, v in varying.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return name


def run_label(template: str | None, varying: dict[str, Any], source: str) -> str:
    if template is None:
        what = ", ".join(f"{k} = {_value_text(v)}" for k, v in varying.items())
        return f"Fine-Tuned with {what}" if what else "Fine-Tuned"
    try:
        return template.format(**{k: _value_text(v) for k, v in varying.items()})
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{source}: run_label {template!r}: {exc!r} is not a varying option; use {{option}} of the grid"
        ) from None


def checkpoint_steps(config: FineTuneConfig) -> list[int]:
    """The checkpoints a finished run keeps: every checkpointing_steps and the last step, newest N if limited."""
    n, every = config.num_training_steps, config.checkpointing_steps
    steps = sorted({*range(every, n + 1, every), n})
    if config.checkpoints_total_limit is not None:
        steps = steps[-config.checkpoints_total_limit :]
    return steps


def _selected_steps(choice: str, config: FineTuneConfig, source: str) -> tuple[int, ...]:
    available = checkpoint_steps(config)
    if choice == "all":
        return tuple(available)
    if choice == "last":
        return (config.num_training_steps,)
    try:
        wanted = sorted({int(v) for v in choice.split(",") if v.strip()})
    except ValueError:
        raise InputError(
            f"{source}: evaluation: checkpoints {choice!r}: use all, last or a list of steps"
        ) from None
    missing = [s for s in wanted if s not in available]
    if missing:
        raise InputError(
            f"{source}: evaluation: checkpoints {missing} will not exist; the runs keep steps {available}"
        )
    return tuple(sorted({*wanted, config.num_training_steps}))


def _as_text_list(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _read_spec(path: Path) -> dict[str, Any]:
    from sd3_lora_celeba.config import load_config_file

    spec = load_config_file(path)
    unknown = sorted(set(spec) - set(_TOP_KEYS))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; use {', '.join(_TOP_KEYS)}")
    for section in ("fine_tune", "evaluation"):
        if not isinstance(spec.get(section), dict):
            raise InputError(f"{path}: needs a '{section}:' mapping (see sd3 experiment --help)")
    return spec


def _resolve_paths(config_dict: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (str(Path(v).resolve()) if k in keys and v is not None else v) for k, v in config_dict.items()}


def load_plan(config: ExperimentConfig) -> Plan:
    """Read and check the experiment file: every run's options and the evaluation, before anything is written."""
    path = Path(config.config_file)
    spec = _read_spec(path)
    source = str(path)
    evaluation_values = {k.replace("-", "_"): v for k, v in spec["evaluation"].items()}
    for key in ("checkpoints", "guidance_runs"):
        if key in evaluation_values:
            evaluation_values[key] = _as_text_list(evaluation_values[key])
    try:
        evaluation = config_from_dict(EvaluationSpec, evaluation_values, source=f"{source}: evaluation")
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    out = Path(config.output_dir or spec.get("output_dir") or path.parent / path.stem)
    template = spec.get("run_label")
    runs: list[Run] = []
    for values, varying in expand_grid(spec["fine_tune"], source):
        name = run_name(varying)
        values = {**values, "output_dir": str(out / layout.EXPERIMENT_RUNS_DIR / name)}
        where = f"{source}: fine_tune (run {name})"
        try:
            run_config = config_from_dict(FineTuneConfig, values, source=where)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None
        except TypeError:
            raise InputError(f"{where}: needs train_dir and empty_prompt_dir") from None
        steps = _selected_steps(evaluation.checkpoints, run_config, source)
        runs.append(Run(name, run_label(template, varying, source), varying, run_config, steps))
    plan = Plan(out, source, spec, runs, evaluation)
    _check_guidance_runs(plan)
    return plan


def _check_guidance_runs(plan: Plan) -> None:
    choice = plan.evaluation.guidance_runs
    if choice in ("best", "all"):
        return
    names = {r.name for r in plan.runs} | {PRETRAINED}
    unknown = [n for n in choice.split(",") if n.strip() and n.strip() not in names]
    if unknown:
        raise InputError(
            f"{plan.source}: evaluation: guidance_runs {unknown} unknown; use best, all or of {sorted(names)}"
        )


def check_inputs(plan: Plan) -> list[Path]:
    """Fail on a bad split, empty prompt, training folder or weights file; returns the evaluation examples."""
    ev = plan.evaluation
    empty = G.find_empty_prompt_dir(ev.split_dir, ev.empty_prompt_dir)
    examples = G.select_examples(ev.split_dir, empty, ev.num_images)
    if len(examples) < 2:
        raise InputError(f"{ev.split_dir}: {len(examples)} example(s); FID needs at least 2")
    for run in plan.runs:
        for p, what in (
            (run.config.train_dir, "train_dir"),
            (run.config.empty_prompt_dir, "empty_prompt_dir"),
        ):
            if not Path(p).is_dir():
                raise InputError(f"{plan.source}: fine_tune: {what} {p} not found")
    if ev.inception_weights is not None and not Path(ev.inception_weights).is_file():
        raise InputError(f"{plan.source}: evaluation: inception_weights {ev.inception_weights} not found")
    return examples


# --- the record on disk --------------------------------------------------------------------------------------


def config_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def plan_record(plan: Plan) -> dict[str, Any]:
    """What ``sd3 report`` needs (and what a re-run must agree with), as JSON."""
    ev = _resolve_paths(
        config_to_dict(plan.evaluation), ("split_dir", "empty_prompt_dir", "inception_weights")
    )
    return {
        "config_file": plan.source,
        "config_sha256": config_hash(plan.spec),
        "spec": json.loads(json.dumps(plan.spec, default=str)),
        "pretrained": {"model_name": plan.base.model_name, "model_revision": plan.base.model_revision},
        "evaluation": ev,
        "runs": [
            {
                "name": r.name,
                "label": r.label,
                "varying": json.loads(json.dumps(r.varying, default=str)),
                "final_step": r.final_step,
                "steps": list(r.steps),
                "config": _resolve_paths(config_to_dict(r.config), ("train_dir", "empty_prompt_dir")),
            }
            for r in plan.runs
        ],
    }


def check_record(out: Path, record: dict[str, Any]) -> None:
    """Refuse a re-run whose numbers would differ from those already on disk (other settings, same names)."""
    path = out / layout.EXPERIMENT_RECORD
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise InputError(f"{path}: unreadable; delete it to start the experiment over") from None
    changed = [
        f"evaluation.{k}"
        for k in sorted(set(old.get("evaluation", {})) | set(record["evaluation"]))
        if k not in _EVAL_NOT_SETTINGS and old.get("evaluation", {}).get(k) != record["evaluation"].get(k)
    ]
    if old.get("pretrained") != record["pretrained"]:
        changed.append("model_name")
    old_runs = {r["name"]: r["config"] for r in old.get("runs", [])}
    for run in record["runs"]:
        before = old_runs.get(run["name"])
        if before is not None:
            changed += [
                f"{run['name']}.{k}"
                for k in sorted(set(before) | set(run["config"]))
                if k not in _RUN_NOT_SETTINGS and before.get(k) != run["config"].get(k)
            ]
    if changed:
        raise InputError(
            f"{path}: experiment was run with other settings ({', '.join(changed[:5])}); "
            f"use another output_dir (or put those settings back)"
        )


# --- training ------------------------------------------------------------------------------------------------


def run_finished(run: Run) -> bool:
    return any(
        layout.checkpoint_step(c) == run.final_step for c in layout.list_checkpoints(run.config.output_dir)
    )


def train_runs(plan: Plan) -> None:
    """Train each unfinished run, one at a time, on every process (DDP under ``accelerate launch``)."""
    for i, run in enumerate(plan.runs, start=1):
        if run_finished(run):
            log.info("run %d/%d %s: finished (step %d), skipped", i, len(plan.runs), run.name, run.final_step)
            continue
        log.info("run %d/%d %s: fine-tune to step %d", i, len(plan.runs), run.name, run.final_step)
        fine_tune(run.config, end_process_group=False)  # the next run trains on the same process group


# --- scoring -------------------------------------------------------------------------------------------------


def table_points(plan: Plan) -> list[Point]:
    ev = plan.evaluation
    models = [(PRETRAINED, 0)] + [(r.name, r.final_step) for r in plan.runs]
    return [Point(m, s, v, ev.guidance_scale) for m, s in models for v in ev.caption_variants]


def step_points(plan: Plan) -> list[Point]:
    ev = plan.evaluation
    variant = ev.caption_variants[0]
    return [Point(r.name, s, variant, ev.guidance_scale) for r in plan.runs for s in r.steps]


def guidance_points(plan: Plan, models: list[str]) -> list[Point]:
    ev = plan.evaluation
    final = {r.name: r.final_step for r in plan.runs} | {PRETRAINED: 0}
    return [Point(m, final[m], ev.caption_variants[0], g) for m in models for g in ev.guidance_scales]


def read_score(plan_out: Path, point: Point) -> dict[str, Any] | None:
    path = point.score_path(plan_out)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # cannot happen with atomic writes; recompute rather than fail


def _check_scores_match_checkpoints(plan: Plan, done: list[Point]) -> None:
    """A finished score of a checkpoint that has since changed (a run retrained) is an error, not reused."""
    runs = {r.name: r for r in plan.runs}
    for point in done:
        if point.model == PRETRAINED:
            continue
        ckpt = layout.checkpoint_dir(runs[point.model].config.output_dir, point.step)
        lora = G.lora_fingerprint(ckpt)  # sha256 memoised per file version
        score = read_score(plan.out, point) or {}
        if score.get("lora_sha256") != lora["sha256"]:
            folder = Path(layout.EXPERIMENT_SCORES_DIR) / point.model
            raise InputError(
                f"{point.score_path(plan.out)}: scored with another {ckpt.name} of {point.model} than the one on "
                f"disk; delete {plan.out / folder} and {plan.out / layout.EXPERIMENT_IMAGES_DIR / point.model}"
            )


class Scorer:
    """What every score of this process shares: examples, ground truth, Inception, and (lazily) the pipeline."""

    def __init__(self, plan: Plan, examples: list[Path], device) -> None:
        from sd3_lora_celeba.evaluate.bootstrap import sqrtm_psd

        ev = plan.evaluation
        self.plan, self.examples, self.device = plan, examples, device
        self.empty_prompt_dir = G.find_empty_prompt_dir(ev.split_dir, ev.empty_prompt_dir)
        self.inception = F.load_inception(ev.dims, ev.inception_weights, device)
        self.gt = F.folder_statistics(
            plan.out / layout.GROUND_TRUTH_DIR, self.inception, batch_size=ev.fid_batch_size
        )
        self.sqrt_sigma_gt = sqrtm_psd(self.gt.sigma)
        self.dtype = resolve_dtype(ev.precision, device)
        state = parallel.process_state()
        self.process_index, self.num_processes = state.process_index, state.num_processes
        self.pipe = None
        self.loaded: tuple[str, int] | None = None  # (run, step) of the LoRA in the pipeline

    def lora_dir(self, point: Point) -> Path | None:
        if point.model == PRETRAINED:
            return None
        run = next(r for r in self.plan.runs if r.name == point.model)
        return layout.checkpoint_dir(run.config.output_dir, point.step)

    def _pipeline_for(self, point: Point):
        from sd3_lora_celeba.models.lora import load_lora_into_pipeline

        if self.pipe is None:
            base = self.plan.base
            self.pipe = G.load_generation_pipeline(
                base.model_name, revision=base.model_revision, dtype=self.dtype, device=self.device
            )
        wanted = None if point.model == PRETRAINED else (point.model, point.step)
        if wanted != self.loaded:
            if self.loaded is not None:
                self.pipe.unload_lora_weights()  # back to the base weights
            if wanted is not None:
                load_lora_into_pipeline(self.pipe, self.lora_dir(point))
            self.loaded = wanted
        return self.pipe

    def generate(self, point: Point) -> Path:
        """The point's images (resumable: existing images are kept)."""
        ev = self.plan.evaluation
        images = point.images_dir(self.plan.out)
        settings = G.generation_settings(
            model_name=self.plan.base.model_name,
            revision=self.plan.base.model_revision,
            lora=G.lora_fingerprint(self.lora_dir(point)),
            prompt_variant=point.variant,
            empty_prompt_dir=self.empty_prompt_dir,
            num_inference_steps=ev.num_inference_steps,
            guidance_scale=point.guidance_scale,
            seed=ev.seed,
            height=ev.height,
            width=ev.width,
            dtype=self.dtype,
        )
        _check_generation_settings(images, settings)
        remove_stale_temp_files(images, recursive=False)  # this process alone writes this folder
        if any(not G.output_path(images, d).is_file() for d in self.examples):
            G.generate_into(
                self._pipeline_for(point),
                self.examples,
                images,
                empty_prompt_dir=self.empty_prompt_dir,
                prompt_variant=point.variant,
                num_inference_steps=ev.num_inference_steps,
                guidance_scale=point.guidance_scale,
                seed=ev.seed,
                height=ev.height,
                width=ev.width,
                batch_size=ev.batch_size,
                desc=point.relpath,
                shard=False,  # the points, not the images, are split between processes
            )
        return images

    def score(self, point: Point) -> dict[str, Any]:
        """Generate (if needed) and score one point; write its JSON atomically and return it."""
        from sd3_lora_celeba.evaluate.bootstrap import bootstrap_fid

        ev = self.plan.evaluation
        images = self.generate(point)
        stats = F.folder_statistics(images, self.inception, batch_size=ev.fid_batch_size)
        seed = G.derive_seed(ev.seed, point.relpath)
        fid = F.frechet_distance(self.gt, stats)
        boot = bootstrap_fid(
            self.gt.mu,
            self.gt.sigma,
            stats.features,
            num_samples=ev.bootstrap_samples,
            seed=seed,
            sqrt_sigma_r=self.sqrt_sigma_gt,
        )
        kid, kid_std = F.kernel_inception_distance(
            self.gt.features,
            stats.features,
            num_subsets=ev.kid_subsets,
            subset_size=ev.kid_subset_size,
            seed=seed,
        )
        lora = G.lora_fingerprint(self.lora_dir(point))
        score = {
            **dataclasses.asdict(point),
            "num_images": len(stats.features),
            "fid": fid,
            "fid_low": fid - 1.96 * boot.std,  # normal bootstrap interval (see evaluate/bootstrap.py)
            "fid_high": fid + 1.96 * boot.std,
            "fid_bootstrap_std": boot.std,
            "fid_bootstrap_p2_5": boot.low,
            "fid_bootstrap_p97_5": boot.high,
            "bootstrap_samples": boot.num_samples,
            "kid": kid,
            "kid_std": kid_std,
            "lora_sha256": lora["sha256"] if lora else None,
            "process": [self.process_index, self.num_processes],  # which process scored it, of how many
        }
        atomic_write_json(point.score_path(self.plan.out), score)
        return score


def _check_generation_settings(images: Path, settings: dict[str, Any]) -> None:
    path = images / layout.GENERATION_SETTINGS
    if path.is_file():
        _, changed = G.changed_settings(path, settings, fix=f"delete {images} to regenerate its images")
        if changed:
            raise InputError(
                f"{path}: images were made with other settings ({', '.join(changed)}); delete {images} "
                f"to regenerate them"
            )
        return
    atomic_write_json(path, settings)


def score_points(plan: Plan, points: list[Point], scorer_factory) -> None:
    """Score the unfinished points, split between the processes (each process owns whole points)."""
    state = parallel.process_state()
    unique = list(dict.fromkeys(points))
    pending = [p for p in unique if read_score(plan.out, p) is None]
    _check_scores_match_checkpoints(plan, [p for p in unique if p not in pending])
    # Every process lists what is pending before any writes a score, so the shards line up.
    state.wait_for_everyone()
    mine = sorted(parallel.shard(pending, state.process_index, state.num_processes), key=lambda p: p.relpath)
    if state.is_main_process:
        log.info(
            "experiment: %d score(s), %d already done, %d to do on %d process(es)",
            len(unique),
            len(unique) - len(pending),
            len(pending),
            state.num_processes,
        )
    for i, point in enumerate(mine, start=1):
        score = scorer_factory().score(point)
        log.info(
            "score %d/%d %s: FID %.4g, KID %.4g", i, len(mine), point.relpath, score["fid"], score["kid"]
        )
    state.wait_for_everyone()


# --- the command ---------------------------------------------------------------------------------------------


def experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Train the grid, score everything, write the table, figures and manifest; returns the table (markdown)."""
    from sd3_lora_celeba.evaluate import report as R
    from sd3_lora_celeba.evaluate.copy_images import copy_example_images

    plan = load_plan(config)
    examples = check_inputs(plan)
    record = plan_record(plan)
    out = plan.out
    if config.dry_run:
        n = len(set(table_points(plan) + step_points(plan)))
        for run in plan.runs:
            click.echo(f"{run.name}: {run.label}; checkpoints {list(run.steps)}")
        click.echo(f"{len(plan.runs)} run(s), {n} score(s) before the guidance sweep, into {out}")
        return {"runs": [r.name for r in plan.runs], "output_dir": str(out)}
    state = parallel.process_state()
    with contextlib.ExitStack() as stack:
        error = None
        if state.is_main_process:
            try:
                stack.enter_context(output_lock(out, "sd3 experiment"))
                check_record(out, record)
                atomic_write_json(out / layout.EXPERIMENT_RECORD, record)
            except InputError as exc:
                error = str(exc)
        error = _broadcast(error)
        if error:
            raise InputError(error)
        train_runs(plan)
        if state.is_main_process:
            copy_example_images(examples, out / layout.GROUND_TRUTH_DIR)
            remove_stale_temp_files(out / layout.EXPERIMENT_SCORES_DIR)
        state.wait_for_everyone()  # the ground truth is complete before any process reads it
        scorer: list[Scorer] = []

        def scorer_factory() -> Scorer:
            if not scorer:
                scorer.append(Scorer(plan, examples, state.device))
            return scorer[0]

        score_points(plan, table_points(plan) + step_points(plan), scorer_factory)
        models = R.guidance_models(record, R.load_scores(out))
        score_points(plan, guidance_points(plan, models), scorer_factory)
        if not state.is_main_process:
            return {"output_dir": str(out)}
        table = R.write_report(out)
        R.write_manifest(out, record, examples)
    click.echo(table)
    return {"output_dir": str(out), "table": table}


def _broadcast(error: str | None) -> str | None:
    """The main process's error (or None) on every process, so all stop together."""
    state = parallel.process_state()
    if state.num_processes == 1:
        return error
    from accelerate.utils import broadcast_object_list

    box = [error]
    broadcast_object_list(box, from_process=0)
    return box[0]
