"""``sd3 fine-tune``: LoRA fine-tuning of the SD3 transformer on cached latents and prompt embeddings.

Read :func:`fine_tune` top to bottom: setup helpers build the pieces, :func:`train_step` is one optimizer step
(forward, loss and backward of each micro-batch of the accumulation window: :func:`loss_step`), and the loop
logs, checkpoints and validates. The maths lives in :mod:`sd3_lora_celeba.train.flow`, the data order in
:mod:`~sd3_lora_celeba.train.sampler`, the saving and the training state in
:mod:`~sd3_lora_celeba.train.checkpoint` and the logging in :mod:`~sd3_lora_celeba.train.tracking`.

Run folder: ``--output-dir`` (default ``runs/fine-tune`` in the current folder, as the seed's ``checkpoints``),
locked while a run uses it. Re-running a command resumes the newest checkpoint there (``--resume auto``); a run
that already reached ``--num-training-steps`` does nothing; a checkpoint of another model or LoRA shape is
refused, and so is any other change of an option that shapes the data or the maths, unless named in
``--allow-changed``. ``--resume PATH`` to an older checkpoint moves the newer ones aside into
``RUN/branches/<time>-from-step-N/`` with the old metrics.

Precision: ``--precision auto`` stores the frozen transformer in bfloat16 on CUDA (float16 where the GPU has no
bfloat16) and float32 on CPU; ``--amp`` defaults to on with CUDA (autocast to ``--mixed-precision``: auto = bf16,
else fp16 with a GradScaler) and off on CPU, so CPU runs are float32 throughout unless ``--amp`` is given (then
bf16 CPU autocast, the seed's command). LoRA weights and the optimizer state are always float32; TF32 matmuls
are on with CUDA.

Ctrl-C or SIGTERM: the current optimizer step is finished, a checkpoint written, one line says how to resume,
and the exit code is 130 / 143; a second signal stops at once.

Multi-GPU: ``accelerate launch [--multi_gpu] -m sd3_lora_celeba.cli fine-tune ...`` runs DDP; each process
takes its slice of every global micro-batch (``--batch-size`` per process), so N processes give the same results
as one process with N times the batch size. On CPUs, note that ``accelerate launch --cpu --num_processes 2``
starts a single process (accelerate's simple launcher); ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2 ...`` runs real DDP over gloo (what the tests do).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import argument, check_bounds, config_to_dict, option, save_config
from sd3_lora_celeba.errors import InputError, Terminated
from sd3_lora_celeba.io import output_lock
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, Precision, resolve_dtype
from sd3_lora_celeba.models.lora import JOINT_ATTENTION_LINEARS
from sd3_lora_celeba.train import checkpoint as ckpt
from sd3_lora_celeba.train import flow
from sd3_lora_celeba.train.sampler import SEED_SCHEME, ResumableBatchSampler, balanced_weights
from sd3_lora_celeba.train.tracking import Tracker, truncate_metrics

log = logging.getLogger(__name__)

LR_SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
MODEL, LORA, OPTIM, FLOW = "Model and precision", "LoRA", "Optimisation", "Flow matching"
DATA, CKPT, VALID = "Data", "Checkpoints and tracking", "Validation"


@dataclass
class FineTuneConfig:
    """Options of ``sd3 fine-tune`` (the seed README's flags plus the rest)."""

    train_dir: Path = argument("Training split: example folders with cached latents and prompt embeddings.")
    empty_prompt_dir: Path = argument(
        "Folder with the cached embeddings of the empty prompt (caption dropout)."
    )
    # --- model and precision ---
    model_name: str = option(
        DEFAULT_SD3_MODEL, "SD3 diffusers model id or folder.", env=SD3_MODEL_ENV, group=MODEL
    )
    model_revision: str | None = option(
        None, "Hub revision (branch, tag or commit) of --model-name.", group=MODEL
    )
    precision: Precision = option(
        "auto",
        "Storage dtype of the frozen transformer weights; auto = bfloat16 on CUDA, float32 on CPU "
        "(LoRA weights and optimizer state are always float32).",
        group=MODEL,
    )
    amp: bool | None = option(
        None,
        "Autocast the forward pass to --mixed-precision (default: on with CUDA, off on CPU).",
        group=MODEL,
    )
    mixed_precision: Literal["auto", "bf16", "fp16"] = option(
        "auto",
        "Autocast dtype when --amp is on; auto = bf16 where supported (CPU included), else fp16 + GradScaler.",
        group=MODEL,
    )
    compile: bool = option(False, "torch.compile each transformer block (regional compilation).", group=MODEL)
    gradient_checkpointing: bool | None = option(
        None,
        "Recompute block activations in the backward pass (less memory). Default: on on CUDA for models too "
        "large for a 24 GB GPU without it (SD3.5-large), off otherwise.",
        group=MODEL,
    )
    quantize_base: bool = option(
        False,
        "Store the frozen transformer linears as int8 (torchao weight-only; pip install "
        "'sd3-lora-celeba[quant]'); the LoRA stays fp32.",
        group=MODEL,
    )
    seed: int = option(
        0, "Seed of the LoRA init, the data order and every per-sample random draw.", group=MODEL
    )
    # --- LoRA ---
    lora_blocks: tuple[int, ...] = option(
        (), "Transformer blocks to adapt, e.g. 4,5,6 (default: all).", group=LORA, min=0
    )
    lora_layers: str | None = option(
        None,
        f"Comma-separated attention linears to adapt (default: {','.join(JOINT_ATTENTION_LINEARS)}, plus "
        "attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0 in SD3.5-medium's dual-attention blocks).",
        group=LORA,
    )
    lora_rank: int = option(64, "LoRA rank.", group=LORA, min=1)
    lora_alpha: float | None = option(
        None, "LoRA alpha (scale = alpha / rank); default: the rank.", group=LORA
    )
    # --- optimisation ---
    learning_rate: float = option(1e-4, "AdamW learning rate (peak, after warmup).", group=OPTIM)
    adam_beta1: float = option(0.9, "AdamW beta1.", group=OPTIM, min=0, max=0.999999)
    adam_beta2: float = option(0.999, "AdamW beta2.", group=OPTIM, min=0, max=0.999999)
    adam_weight_decay: float = option(1e-4, "AdamW weight decay.", group=OPTIM, min=0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", group=OPTIM, min=0)
    max_grad_norm: float = option(
        1.0, "Clip the LoRA gradient norm to this value (0 = no clipping).", group=OPTIM, min=0
    )
    num_training_steps: int = option(
        1000, "Optimizer steps to train for (in total, across resumes).", group=OPTIM, min=1
    )
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", group=OPTIM, min=1)
    batch_size: int = option(1, "Micro-batch size per process.", group=OPTIM, min=1)
    lr_scheduler: LR_SCHEDULERS = option("constant", "diffusers learning-rate schedule.", group=OPTIM)
    lr_warmup_steps: int = option(500, "Linear warmup steps of the learning rate.", group=OPTIM, min=0)
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.", group=OPTIM, min=1)
    lr_power: float = option(1.0, "Power of the polynomial schedule.", group=OPTIM, min=0)
    max_nan_steps: int = option(
        5, "Stop after this many consecutive steps with a non-finite loss.", group=OPTIM, min=1
    )
    # --- flow matching ---
    weighting_scheme: flow.WeightingScheme = option(
        "logit_normal",
        "Timestep density (logit_normal, mode) or loss weight (sigma_sqrt, cosmap); none = uniform.",
        group=FLOW,
    )
    logit_mean: float = option(
        0.0,
        "Mean of logit_normal. With --density-convention diffusers, negative = more high-noise samples.",
        group=FLOW,
    )
    logit_std: float = option(1.0, "Standard deviation of logit_normal.", group=FLOW)
    mode_scale: float = option(
        1.29, "Scale of the mode density (paper Eq. 20).", group=FLOW, min=-1, max=2 / (math.pi - 2)
    )
    density_convention: flow.DensityConvention = option(
        "diffusers",
        "How a density sample u becomes a noise level: diffusers = 1 - u (diffusers' SD3 script, the "
        "original project); paper = u (Esser et al.).",
        group=FLOW,
    )
    shift: float | None = option(
        None, "Timestep shift (paper Eq. 23); default: the model scheduler's (3.0).", group=FLOW
    )
    precondition_outputs: bool = option(
        True,
        "Train the x0 estimate x_t - sigma * v against x0 (the original project); "
        "--no-precondition-outputs: velocity.",
        group=FLOW,
    )
    # --- data ---
    caption_variants: str | None = option(
        None, "Comma-separated caption variants to draw from (default: all cached).", group=DATA
    )
    caption_dropout: float = option(
        0.2, "Probability of training on the empty prompt instead of the caption.", group=DATA, min=0, max=1
    )
    random_flip: bool = option(
        True, "Use the cached horizontally flipped latents half of the time.", group=DATA
    )
    balance_attributes: bool = option(
        False, "Reweight examples so each CelebA attribute moves toward 50%.", group=DATA
    )
    balance_max_weight: float = option(
        5.0, "Bound of --balance-attributes weights (relative to the mean).", group=DATA, min=1
    )
    dataloader_num_workers: int = option(2, "DataLoader worker processes.", group=DATA, min=0)
    # --- checkpoints and tracking ---
    output_dir: Path = option(
        Path("runs/fine-tune"), "Run folder: checkpoints, metrics.jsonl, TensorBoard logs.", group=CKPT
    )
    resume: str = option(
        "auto",
        "auto (newest checkpoint of --output-dir if any), latest (must exist), never (refuse a used folder), "
        "or a checkpoint folder (an older one of this run moves the newer ones to RUN/branches/).",
        group=CKPT,
    )
    allow_changed: str | None = option(
        None,
        "Comma-separated options that may differ from the resumed checkpoint's, e.g. "
        "num-training-steps,learning-rate (other changes are refused).",
        group=CKPT,
    )
    checkpointing_steps: int = option(
        500, "Save a checkpoint every N optimizer steps (and at the last step).", group=CKPT, min=1
    )
    checkpoints_total_limit: int | None = option(
        None, "Keep only the newest N checkpoints.", group=CKPT, min=1
    )
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "tensorboard",
        "Metrics backend besides metrics.jsonl (wandb needs the wandb package; never prompts).",
        group=CKPT,
    )
    wandb_project: str = option("sd3-lora", "W&B project with --report-to wandb.", group=CKPT)
    # --- validation ---
    validation_fid_every: int = option(0, "Validation FID every N steps (0 = off).", group=VALID, min=0)
    validation_dir: Path | None = option(
        None, "Split for validation FID (default: the 'val' folder next to TRAIN_DIR).", group=VALID
    )
    validation_num_images: int = option(100, "Images generated for each validation FID.", group=VALID, min=1)
    validation_guidance_scale: float = option(
        3.0, "Guidance scale of the validation images.", group=VALID, min=0
    )
    validation_batch_size: int = option(
        4, "Validation images per pipeline call (lower it to save GPU memory).", group=VALID, min=1
    )
    inception_weights: Path | None = option(
        None, "Local pytorch-fid Inception weights for validation FID (offline).", group=VALID
    )

    def __post_init__(self) -> None:
        check_bounds(self)  # NaN, infinity and the min / max of every numeric option
        for name in ("learning_rate", "logit_std", "adam_epsilon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("shift", "lora_alpha"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if len(set(self.lora_blocks)) != len(self.lora_blocks):
            raise ValueError(f"--lora-blocks must list distinct block indices, got {self.lora_blocks}")
        if self.lora_layers is not None and not self.lora_layer_names:
            raise ValueError("--lora-layers is empty; name at least one layer, e.g. to_q,to_k")
        if self.amp is False and self.mixed_precision != "auto":
            raise ValueError("--mixed-precision only applies with --amp; add --amp or drop --mixed-precision")
        known = {f.replace("_", "-") for f in config_to_dict(self)}
        unknown = [a for a in self.allowed_changes if a not in known]
        if unknown:
            raise ValueError(
                f"--allow-changed {unknown[0]}: not an option of fine-tune; name options like seed"
            )

    @property
    def lora_layer_names(self) -> tuple[str, ...]:
        if self.lora_layers is None:
            return JOINT_ATTENTION_LINEARS
        return tuple(v.strip() for v in self.lora_layers.split(",") if v.strip())

    @property
    def caption_variant_names(self) -> tuple[str, ...] | None:
        if self.caption_variants is None:
            return None
        return tuple(v.strip() for v in self.caption_variants.split(",") if v.strip())

    @property
    def allowed_changes(self) -> tuple[str, ...]:
        return tuple(v.strip().removeprefix("--") for v in (self.allow_changed or "").split(",") if v.strip())


# --- setup helpers ----------------------------------------------------------------------------------------------


def resolve_precision(config: FineTuneConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """(storage dtype of the frozen weights, accelerate mixed precision ``no|bf16|fp16``) on ``device``."""
    storage = resolve_dtype(config.precision, device)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    if not amp:
        if config.mixed_precision != "auto":
            raise InputError("--mixed-precision only applies with --amp; add --amp or drop --mixed-precision")
        return storage, "no"
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    if mixed == "fp16" and device.type != "cuda":
        raise InputError(
            "--mixed-precision fp16 needs a CUDA device; use --mixed-precision bf16 (or auto) on CPU"
        )
    return storage, mixed


def make_accelerator(config: FineTuneConfig):
    """accelerate's Accelerator (device, DDP, autocast, fp16 GradScaler) and the frozen weights' dtype."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import parse_flag_from_env

    from sd3_lora_celeba.models.loading import enable_tf32

    # AcceleratorState is a process-wide singleton: forget the previous run's mixed precision so fine_tune can be
    # called twice in one Python process (notebooks, tests). The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # The device type decides "auto", before the Accelerator exists (creating accelerate's PartialState first
    # would set it up without the launcher's process group).
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    storage, mixed = resolve_precision(config, torch.device("cpu" if on_cpu else "cuda"))
    enable_tf32()
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed
    )
    return accelerator, storage


def check_train_dir(config: FineTuneConfig) -> None:
    for path, flag in ((config.train_dir, "TRAIN_DIR"), (config.empty_prompt_dir, "EMPTY_PROMPT_DIR")):
        if not Path(path).is_dir():
            raise InputError(
                f"{path}: {flag} folder not found; pass the training split and the empty-prompt folder"
            )
    splits = [s for s in layout.SPLITS[1:] if (Path(config.train_dir) / s).is_dir()]
    if splits:
        raise InputError(
            f"{config.train_dir}: TRAIN_DIR holds the {' and '.join(splits)} split(s) (it is the dataset root); "
            f"pass {Path(config.train_dir) / layout.SPLITS[0]}"
        )
    if config.validation_fid_every and not validation_split(config).is_dir():
        raise InputError(f"{validation_split(config)}: validation split not found; pass --validation-dir")


def validation_split(config: FineTuneConfig) -> Path:
    return config.validation_dir or Path(config.train_dir).parent / "val"


def default_shift(config: FineTuneConfig) -> float:
    """``--shift`` or the model scheduler's shift (3.0 for SD3-medium)."""
    if config.shift is not None:
        return config.shift
    from sd3_lora_celeba.models.loading import load_scheduler

    return float(load_scheduler(config.model_name, config.model_revision).config.shift)


def build_dataset(config: FineTuneConfig, shift: float):
    """The cached training set; each sample carries its diffusion noise and noise level (drawn in the workers)."""
    from sd3_lora_celeba.data.cached import CachedLatentsDataset

    noise_draw = flow.NoiseDraw(
        config.weighting_scheme,
        shift,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        density_convention=config.density_convention,
    )
    return CachedLatentsDataset(
        config.train_dir,
        config.empty_prompt_dir,
        variants=config.caption_variant_names,
        caption_dropout=config.caption_dropout,
        random_flip=config.random_flip,
        model_name=config.model_name,
        noise_draw=noise_draw,
    )


def build_transformer(config: FineTuneConfig, dtype: torch.dtype = torch.float32):
    """Frozen SD3 transformer (stored in ``dtype``) with a Gaussian-initialised, fp32 LoRA on the chosen blocks'
    attention linears."""
    from sd3_lora_celeba.models.loading import load_transformer
    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    transformer = load_transformer(config.model_name, config.model_revision, dtype)
    if config.quantize_base:  # before the LoRA: only the frozen linears become int8
        from sd3_lora_celeba.models.quantize import quantize_frozen_base

        quantize_frozen_base(transformer)
    blocks = config.lora_blocks or tuple(range(len(transformer.transformer_blocks)))
    layers = config.lora_layer_names if config.lora_layers is not None else None  # None: the model's default
    try:
        targets = lora_target_modules(transformer, blocks, layers)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    add_lora(transformer, lora_config(targets, config.lora_rank, config.lora_alpha, init="gaussian"))
    if use_gradient_checkpointing(config):
        transformer.enable_gradient_checkpointing()
    return transformer


def use_gradient_checkpointing(config: FineTuneConfig) -> bool:
    """``--gradient-checkpointing`` when given; else on for CUDA runs of models that need it to fit 24 GB."""
    if config.gradient_checkpointing is not None:
        return config.gradient_checkpointing
    if not torch.cuda.is_available():
        return False
    from sd3_lora_celeba.models.families import model_defaults

    return model_defaults(config.model_name, config.model_revision).gradient_checkpointing


def choose_kernels(transformer, config: FineTuneConfig) -> None:
    """``--compile``: regional ``torch.compile``. Otherwise the float32 linears of a CPU run go through oneDNN
    where it is faster than the BLAS, and each LoRA linear runs as one autograd function
    (:mod:`~sd3_lora_celeba.models.cpu_linear`, :mod:`~sd3_lora_celeba.models.lora_linear`; same products)."""
    from sd3_lora_celeba.models.cpu_linear import use_fast_cpu_linears
    from sd3_lora_celeba.models.lora_linear import use_lora_linear_function

    if config.compile:
        compile_blocks(transformer)
    elif not config.quantize_base:
        use_fast_cpu_linears(transformer, training=True)
        use_lora_linear_function(transformer)


def compile_blocks(transformer, backend: str = "inductor") -> None:
    """Regional compilation: each transformer block on its own (identical blocks share compiled code, so
    compiling takes a few blocks' time, not the whole model's)."""
    for block in transformer.transformer_blocks:
        block.compile(backend=backend)


def build_optimizer(config: FineTuneConfig, params: list[torch.nn.Parameter], device: torch.device):
    return torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=device.type == "cuda",
    )


def build_lr_scheduler(config: FineTuneConfig, optimizer):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.num_training_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


def apply_optimizer_options(config: FineTuneConfig, optimizer, lr_scheduler) -> None:
    """After loading a checkpoint's optimizer and schedule: this run's AdamW options and peak learning rate
    (equal to the saved ones unless changed with --allow-changed), effective from the next step on."""
    for group in optimizer.param_groups:
        group.update(
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
    if lr_scheduler.base_lrs != [config.learning_rate] * len(lr_scheduler.base_lrs):
        lr_scheduler.base_lrs = [config.learning_rate] * len(lr_scheduler.base_lrs)
        for group in optimizer.param_groups:
            group["initial_lr"] = config.learning_rate
            group["lr"] = config.learning_rate * lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch)


def _ignore_stop_signals(exiting, _worker_id: int) -> None:
    """Loader workers leave SIGINT / SIGTERM to the main process, which finishes the step and checkpoints; once
    the main process is exiting (``exiting`` set), SIGTERM ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_exit_if_main_exits, exiting))


def _exit_if_main_exits(exiting, _signum, _frame) -> None:
    if exiting.value:
        os._exit(0)  # a worker only reads caches: nothing to clean up


@functools.cache
def _main_exiting():
    """A flag shared with the loader workers, set at interpreter exit before multiprocessing's own exit handler
    runs. That handler sends SIGTERM to daemonic children and then waits for them: without the flag the workers
    would ignore it, and a loader still referenced at exit would hang the process for good."""
    import multiprocessing
    import multiprocessing.util

    exiting = multiprocessing.RawValue("b", 0)
    multiprocessing.util.Finalize(None, setattr, (exiting, "value", 1), exitpriority=0)
    return exiting


def build_loader(config: FineTuneConfig, dataset, sampler: ResumableBatchSampler, device: torch.device):
    """Endless micro-batches of this process's slice of the seeded ``(index, sample_seed)`` stream."""
    from sd3_lora_celeba.data.cached import CachedLatentsDataset, PackedInWorkers, collate_packed

    if isinstance(dataset, CachedLatentsDataset):
        dataset = PackedInWorkers(dataset)  # a worker writes each batch straight into its shared buffer
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_packed,  # one shared buffer per batch from a worker; to_device unpacks it
        num_workers=config.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=(
            functools.partial(_ignore_stop_signals, _main_exiting())
            if config.dataloader_num_workers
            else None
        ),
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StopSignals:
    """SIGINT / SIGTERM set a flag the loop reads after each optimizer step; a second signal stops at once."""

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.EXIT_CODES}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if (
            self.signum is not None
        ):  # the second signal: stop at once (the CLI prints one line, exits 130/143)
            log.warning("second %s: stopping now, without a checkpoint", name)
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signum = signum
        log.warning("%s: finishing this optimizer step, then saving a checkpoint (again: stop at once)", name)

    def requested(self, accelerator) -> bool:
        """True when any process got a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max"))

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signum, 143)


# --- one training step ------------------------------------------------------------------------------------------


EMBEDDINGS = ("prompt_embeds", "pooled_prompt_embeds")


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The batch's tensors on ``device`` (non-blocking from pinned memory): the embeddings cast from their
    storage dtype to ``dtype`` (the model's input dtype) there, latents, noise and noise levels in float32."""
    from sd3_lora_celeba.data.cached import unpack

    out = {}
    for key, value in unpack(batch).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True).to(dtype if key in EMBEDDINGS else torch.float32)
        out[key] = value
    return out


def loss_step(transformer, batch: dict, config: FineTuneConfig) -> torch.Tensor:
    """Forward and loss of one micro-batch on the device: ``latents`` (B, 16, H/8, W/8), ``noise`` (same),
    ``sigmas`` (B,), ``prompt_embeds`` (B, 77 + L, D), ``pooled_prompt_embeds`` (B, P). Returns the scalar loss
    (float32; the flow maths stays float32, only the transformer's input takes the embeddings' dtype)."""
    latents, noise, sigmas = batch["latents"], batch["noise"], batch["sigmas"]
    noisy_latents = flow.add_noise(latents, noise, sigmas)
    model_pred = transformer(
        hidden_states=noisy_latents.to(batch["prompt_embeds"].dtype),
        timestep=flow.sigmas_to_timesteps(sigmas),
        encoder_hidden_states=batch["prompt_embeds"],
        pooled_projections=batch["pooled_prompt_embeds"],
        return_dict=False,
    )[0]  # (B, 16, H/8, W/8), the predicted velocity
    if config.precondition_outputs:
        model_pred = flow.precondition_outputs(model_pred.float(), noisy_latents, sigmas)
        target = latents
    else:
        target = flow.velocity_target(latents, noise)
    return flow.weighted_mse(model_pred, target, flow.loss_weighting(config.weighting_scheme, sigmas))


@dataclass
class StepResult:
    loss: float  # mean over the accumulation window and all processes
    grad_norm: float
    skipped: bool
    sigmas: torch.Tensor  # every noise level of the step, all processes


def train_step(
    transformer, optimizer, params, batches: Iterator[dict], config: FineTuneConfig, accelerator, dtype
) -> StepResult:
    """One optimizer step: forward, loss and backward of each micro-batch of the accumulation window, then clip
    and step, unless the loss or the gradient is not finite. One host sync, at the end."""
    device = accelerator.device
    window_loss = torch.zeros((), device=device)
    window_sigmas = []
    for _ in range(config.gradient_accumulation_steps):
        batch = to_device(next(batches), device, dtype)
        with accelerator.accumulate(transformer):  # no DDP all-reduce until the window's last micro-batch
            loss = loss_step(transformer, batch, config)
            accelerator.backward(loss)  # divides by the accumulation steps; scales for fp16
        window_loss += loss.detach()
        window_sigmas.append(batch["sigmas"])
    mean_loss = accelerator.reduce(window_loss, "mean") / config.gradient_accumulation_steps
    grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
    loss_value, norm_value = torch.stack([mean_loss.float(), torch.as_tensor(grad_norm).float()]).tolist()
    if accelerator.scaler is not None:
        # fp16: the GradScaler skips a step whose gradients overflowed and lowers its scale (routine while the
        # scale settles, so not counted as a non-finite step); only a non-finite loss is.
        optimizer.step()
        skipped = not math.isfinite(loss_value)
    else:
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, skipped, accelerator.gather(torch.cat(window_sigmas)))


# --- the run ----------------------------------------------------------------------------------------------------


def fine_tune(config: FineTuneConfig, *, end_process_group: bool = True) -> Path:
    """Train the LoRA; returns the final checkpoint folder. Resumable; see the module docstring.

    ``end_process_group=False`` leaves a DDP process group alive for a caller that trains several runs in one
    launch (``sd3 experiment``); the CLI ends it with the run."""
    check_train_dir(config)
    accelerator, storage_dtype = make_accelerator(config)
    run_dir = Path(config.output_dir)
    new_folder = not run_dir.exists()
    lock = output_lock(run_dir, "sd3 fine-tune") if accelerator.is_main_process else contextlib.nullcontext()
    try:
        with lock, StopSignals() as stop:
            final = _run(config, accelerator, storage_dtype, run_dir, stop)
        if end_process_group:
            accelerator.end_training()
        return final
    finally:
        if new_folder and accelerator.is_main_process and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # refused before anything was written: leave no empty run folder behind


def _prepare_resume(config: FineTuneConfig, run_dir: Path, is_main: bool):
    """(checkpoint to resume from or None, its training state or None), checked before anything is written."""
    if is_main:
        ckpt.remove_partial_checkpoints(run_dir)
    resume_from = ckpt.resolve_resume(config.resume, run_dir)
    if resume_from is None:
        return None, None
    ckpt.check_compatible(resume_from, config_to_dict(config), config.allowed_changes)
    state = ckpt.load_training_state(resume_from)
    ckpt.check_lora_file(resume_from)
    return resume_from, state


@dataclass
class Parts:
    """What the setup built for the loop (plain fields, no behaviour)."""

    transformer: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    dataset: Any
    weights: torch.Tensor | None
    stream: dict  # what fixes the data stream (checked on resume)
    resolved: dict  # storage dtype, mixed precision, shift (checked on resume)
    progress: ckpt.Progress
    resume_from: Path | None


def setup(config: FineTuneConfig, accelerator, storage_dtype: torch.dtype, resume_from, state) -> Parts:
    """Data, model, optimizer and schedule, restored from ``state`` when resuming."""
    from accelerate.utils import set_seed

    set_seed(config.seed)  # first: makes the Gaussian LoRA init reproducible
    shift = default_shift(config)
    dataset = build_dataset(config, shift)
    weights = None
    if config.balance_attributes:
        weights = balanced_weights(dataset.attributes, max_weight=config.balance_max_weight)
    stream = {
        "seed": config.seed,
        "balanced": weights is not None,
        "num_examples": len(dataset),
        "global_batch_size": config.batch_size * accelerator.num_processes,
        "scheme": SEED_SCHEME,
    }
    resolved = {
        "storage_dtype": str(storage_dtype).removeprefix("torch."),
        "mixed_precision": accelerator.mixed_precision,
        "shift": shift,
    }
    if state is not None:
        ckpt.check_stream(resume_from, state, stream, resolved)
    transformer = build_transformer(config, storage_dtype).to(accelerator.device)
    choose_kernels(transformer, config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params, accelerator.device)
    lr_scheduler = build_lr_scheduler(config, optimizer)
    # The lr scheduler stays unprepared: accelerate would step it once per process.
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    progress = ckpt.Progress()
    if state is not None:
        ckpt.load_lora_weights(accelerator.unwrap_model(transformer), resume_from)
        progress = ckpt.restore_training_state(
            state, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=accelerator.scaler
        )
        apply_optimizer_options(config, optimizer, lr_scheduler)
        log.info("resumed from %s at step %d", resume_from, progress.step)
    (log.info if accelerator.is_main_process else log.debug)(
        "LoRA rank %d (%.2fM trainable parameters); shift %.3g; weights %s, mixed precision %s; %d process(es)",
        config.lora_rank,
        sum(p.numel() for p in params) / 1e6,
        shift,
        resolved["storage_dtype"],
        accelerator.mixed_precision,
        accelerator.num_processes,
    )
    return Parts(
        transformer,
        optimizer,
        lr_scheduler,
        params,
        dataset,
        weights,
        stream,
        resolved,
        progress,
        resume_from,
    )


def _run(config: FineTuneConfig, accelerator, storage_dtype: torch.dtype, run_dir: Path, stop) -> Path:
    resume_from, state = _prepare_resume(config, run_dir, accelerator.is_main_process)
    parts = setup(config, accelerator, storage_dtype, resume_from, state)
    if parts.progress.step >= config.num_training_steps:
        log.info(
            "%s: already trained to step %d; raise --num-training-steps to go on (add --allow-changed "
            "num-training-steps when --lr-scheduler depends on it)",
            run_dir,
            parts.progress.step,
        )
        return resume_from
    if accelerator.is_main_process:
        ckpt.branch_newer_checkpoints(run_dir, parts.progress.step)
        truncate_metrics(run_dir, parts.progress.step)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / layout.RUN_CONFIG)
    return train_loop(config, accelerator, parts, run_dir, stop)


def train_loop(config: FineTuneConfig, accelerator, parts: Parts, run_dir: Path, stop: StopSignals) -> Path:
    """Optimizer steps until ``--num-training-steps``: log, checkpoint, validate; stop cleanly on a signal."""
    from tqdm.auto import tqdm

    from sd3_lora_celeba.data.cached import release_exited_worker_buffers

    device, progress = accelerator.device, parts.progress
    sampler = ResumableBatchSampler(
        len(parts.dataset),
        config.batch_size,
        seed=config.seed,
        weights=parts.weights,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        start=progress.consumed,
    )
    batches = iter(build_loader(config, parts.dataset, sampler, device))
    input_dtype = (
        torch.float32
        if accelerator.mixed_precision != "no"
        else resolve_dtype(parts.resolved["storage_dtype"], device)
    )
    images_per_step = sampler.global_batch_size * config.gradient_accumulation_steps
    tracker = Tracker(
        run_dir,
        config.report_to,
        config_to_dict(config),
        enabled=accelerator.is_main_process,
        project=config.wandb_project,
        purge_step=progress.step + 1 if progress.step else None,
    )
    bar = tqdm(
        total=config.num_training_steps,
        initial=progress.step,
        desc="fine-tune",
        unit="step",
        disable=None if accelerator.is_main_process else True,
    )
    parts.transformer.train()
    final_checkpoint = parts.resume_from
    while progress.step < config.num_training_steps:
        start = time.perf_counter()
        result = train_step(
            parts.transformer, parts.optimizer, parts.params, batches, config, accelerator, input_dtype
        )
        lr = parts.lr_scheduler.get_last_lr()[0]
        parts.lr_scheduler.step()
        progress.step += 1
        progress.consumed += images_per_step
        progress.nan_streak = progress.nan_streak + 1 if result.skipped else 0
        if result.skipped:
            log.error(
                "step %d: non-finite loss %s or grad norm %s; update skipped",
                progress.step,
                result.loss,
                result.grad_norm,
            )
        seconds = time.perf_counter() - start
        tracker.log(
            {
                "step": progress.step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "sigma_hist": flow.sigma_histogram(result.sigmas),
                "step_time_s": seconds,
                "images_per_s": images_per_step / seconds,
                "peak_memory_mb": peak_memory_mb(device),
                "shift": parts.resolved["shift"],
                "epoch": sampler.epoch_of(progress.consumed),
                "skipped": result.skipped,
            }
        )
        bar.update()
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        if progress.nan_streak >= config.max_nan_steps:
            tracker.close()
            raise RuntimeError(
                f"step {progress.step}: {progress.nan_streak} consecutive non-finite steps; lower "
                "--learning-rate, try --mixed-precision bf16, or resume from an earlier checkpoint with --resume PATH"
            )
        stopping = stop.requested(accelerator)
        step = progress.step
        if stopping or step % config.checkpointing_steps == 0 or step == config.num_training_steps:
            final_checkpoint = save(config, accelerator, parts, run_dir)
        if stopping:
            bar.close()
            tracker.close()
            log.warning("stopped at step %d; saved %s; resume with the same command", step, final_checkpoint)
            raise SystemExit(stop.exit_code)
        if config.validation_fid_every and step % config.validation_fid_every == 0:
            run_validation(config, accelerator, parts.transformer, run_dir, tracker, step)

    bar.close()
    tracker.close()
    del batches  # the loader's workers exit; their shared batch buffers can go (an experiment trains on)
    release_exited_worker_buffers()
    return layout.checkpoint_dir(run_dir, progress.step) if final_checkpoint is None else final_checkpoint


def save(config: FineTuneConfig, accelerator, parts: Parts, run_dir: Path) -> Path:
    """Write ``checkpoint-<step>`` (main process) and prune old ones; every process waits for it."""
    accelerator.wait_for_everyone()
    step = parts.progress.step
    path = layout.checkpoint_dir(run_dir, step)
    if accelerator.is_main_process:
        state = ckpt.build_training_state(
            parts.progress,
            optimizer=parts.optimizer,
            lr_scheduler=parts.lr_scheduler,
            scaler=accelerator.scaler,
            sampler={**parts.stream, "consumed": parts.progress.consumed},
            resolved=parts.resolved,
        )
        transformer = accelerator.unwrap_model(parts.transformer)
        path = ckpt.save_checkpoint(
            run_dir, step, transformer=transformer, training_state=state, config=config
        )
        ckpt.prune_checkpoints(run_dir, config.checkpoints_total_limit)
        log.info("step %d: saved %s", step, path)
    accelerator.wait_for_everyone()
    return path


def run_validation(
    config: FineTuneConfig, accelerator, transformer, run_dir: Path, tracker, step: int
) -> None:
    """Validation FID of the current LoRA on the main process, logged to metrics.jsonl."""
    from sd3_lora_celeba.evaluate.validation import validation_fid

    if accelerator.is_main_process:
        fid = validation_fid(
            accelerator.unwrap_model(transformer),
            model_name=config.model_name,
            revision=config.model_revision,
            split_dir=validation_split(config),
            empty_prompt_dir=config.empty_prompt_dir,
            num_images=config.validation_num_images,
            guidance_scale=config.validation_guidance_scale,
            batch_size=config.validation_batch_size,
            seed=config.seed,
            inception_weights=config.inception_weights,
            work_dir=run_dir / layout.VALIDATION_WORK_DIR,
        )
        tracker.log({"step": step, "validation_fid": fid})
        log.info("step %d: validation FID %.2f", step, fid)
    accelerator.wait_for_everyone()
