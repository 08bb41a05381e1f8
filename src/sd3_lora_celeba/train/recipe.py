"""``sd3 fine-tune``: LoRA fine-tuning of the SD3 transformer on cached latents and prompt embeddings.

The whole training loop is :func:`fine_tune`, top to bottom; the helpers above it only build things. The maths
lives in :mod:`sd3_lora_celeba.train.flow`, the data order in :mod:`~sd3_lora_celeba.train.sampler`, the saving
in :mod:`~sd3_lora_celeba.train.checkpoint` and the logging in :mod:`~sd3_lora_celeba.train.tracking`.

Run folder: ``--output-dir`` (default ``runs/fine-tune`` in the current folder, as the seed's ``checkpoints``).
Re-running a command resumes the newest checkpoint there (``--resume auto``); a run that already reached
``--num-training-steps`` does nothing; a checkpoint of another model or LoRA shape is refused.

``--amp`` autocasts to ``--mixed-precision`` (``auto``: bf16 where the device supports it, else fp16 with a
GradScaler). On a CPU-only machine ``auto`` means bf16 CPU autocast, so the seed's command runs unchanged (slowly).

Multi-GPU: ``accelerate launch [--multi_gpu] -m sd3_lora_celeba.cli fine-tune ...`` runs DDP; each process
takes its slice of every global micro-batch (``--batch-size`` per process), so N processes give the same results
as one process with N times the batch size. On CPUs, note that ``accelerate launch --cpu --num_processes 2``
starts a single process (accelerate's simple launcher); ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2 ...`` runs real DDP over gloo (what the tests do).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.config import argument, config_to_dict, option, save_config
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, torch_dtype
from sd3_lora_celeba.models.lora import JOINT_ATTENTION_LINEARS
from sd3_lora_celeba.train import checkpoint as ckpt
from sd3_lora_celeba.train import flow
from sd3_lora_celeba.train.sampler import ResumableBatchSampler, balanced_weights, derive_seed
from sd3_lora_celeba.train.tracking import Tracker, truncate_metrics

log = logging.getLogger(__name__)

LR_SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]


@dataclass
class FineTuneConfig:
    """Options of ``sd3 fine-tune`` (the seed README's flags plus the rest)."""

    train_dir: Path = argument("Training split: example folders with cached latents and prompt embeddings.")
    empty_prompt_dir: Path = argument(
        "Folder with the cached embeddings of the empty prompt (caption dropout)."
    )
    output_dir: Path = option(
        Path("runs/fine-tune"), "Run folder: checkpoints, metrics.jsonl, TensorBoard logs."
    )
    resume: str = option(
        "auto",
        "auto (newest checkpoint of --output-dir if any), latest (must exist), never (refuse a used folder), "
        "or a checkpoint folder.",
    )
    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 diffusers model id or folder.", env=SD3_MODEL_ENV)
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    precision: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "Storage dtype of the frozen transformer weights (LoRA weights are always fp32)."
    )
    amp: bool = option(False, "Automatic mixed precision (autocast) in the forward pass.")
    mixed_precision: Literal["auto", "bf16", "fp16"] = option(
        "auto",
        "Autocast dtype with --amp; auto = bf16 where supported (CPU included), else fp16 + GradScaler.",
    )
    seed: int = option(0, "Seed of the LoRA init, the data order and every per-sample random draw.")
    # --- LoRA ---
    lora_blocks: tuple[int, ...] = option((), "Transformer blocks to adapt, e.g. 4,5,6 (default: all).")
    lora_layers: str | None = option(
        None,
        f"Comma-separated attention linears to adapt (default: {','.join(JOINT_ATTENTION_LINEARS)}, plus "
        "attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0 in SD3.5-medium's dual-attention blocks).",
    )
    lora_rank: int = option(64, "LoRA rank.")
    lora_alpha: float | None = option(None, "LoRA alpha (scale = alpha / rank); default: the rank.")
    # --- optimisation ---
    learning_rate: float = option(1e-4, "AdamW learning rate (peak, after warmup).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(1.0, "Clip the LoRA gradient norm to this value (0 = no clipping).")
    num_training_steps: int = option(1000, "Optimizer steps to train for (in total, across resumes).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.")
    batch_size: int = option(1, "Micro-batch size per process.")
    lr_scheduler: LR_SCHEDULERS = option("constant", "diffusers learning-rate schedule.")
    lr_warmup_steps: int = option(500, "Linear warmup steps of the learning rate.")
    lr_num_cycles: int = option(1, "Cycles of cosine_with_restarts.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    gradient_checkpointing: bool = option(
        False, "Recompute block activations in the backward pass (less memory)."
    )
    quantize_base: bool = option(
        False,
        "Store the frozen transformer linears as int8 (torchao weight-only; pip install "
        "'sd3-lora-celeba[quant]'); the LoRA stays fp32.",
    )
    compile: bool = option(False, "torch.compile the transformer.")
    # --- flow matching ---
    weighting_scheme: flow.WeightingScheme = option(
        "logit_normal",
        "Timestep density (logit_normal, mode) or loss weight (sigma_sqrt, cosmap); none = uniform.",
    )
    logit_mean: float = option(
        0.0, "Mean of logit_normal. With --density-convention diffusers, negative = more high-noise samples."
    )
    logit_std: float = option(1.0, "Standard deviation of logit_normal.")
    mode_scale: float = option(1.29, "Scale of the mode density (paper Eq. 20).")
    density_convention: flow.DensityConvention = option(
        "diffusers",
        "How a density sample u becomes a noise level: diffusers = 1 - u (the seed, as diffusers' SD3 script); "
        "paper = u (Esser et al.).",
    )
    shift: float | None = option(None, "Timestep shift (paper Eq. 23); default: the model scheduler's (3.0).")
    precondition_outputs: bool = option(
        True,
        "Train the x0 estimate x_t - sigma * v against x0 (the seed); --no-precondition-outputs: velocity.",
    )
    # --- data ---
    caption_variants: str | None = option(
        None, "Comma-separated caption variants to draw from (default: all cached)."
    )
    caption_dropout: float = option(
        0.2, "Probability of training on the empty prompt instead of the caption."
    )
    random_flip: bool = option(True, "Use the cached horizontally flipped latents half of the time.")
    balance_attributes: bool = option(False, "Reweight examples so each CelebA attribute moves toward 50%.")
    balance_max_weight: float = option(5.0, "Bound of --balance-attributes weights (relative to the mean).")
    dataloader_num_workers: int = option(2, "DataLoader worker processes.")
    # --- checkpoints and tracking ---
    checkpointing_steps: int = option(
        500, "Save a checkpoint every N optimizer steps (and at the last step)."
    )
    checkpoints_total_limit: int | None = option(None, "Keep only the newest N checkpoints.")
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "tensorboard", "Metrics backend besides metrics.jsonl (wandb needs the wandb package; never prompts)."
    )
    wandb_project: str = option("sd3-lora", "W&B project with --report-to wandb.")
    max_nan_steps: int = option(5, "Stop after this many consecutive steps with a non-finite loss.")
    validation_fid_every: int = option(0, "Validation FID every N steps (0 = off).")
    validation_dir: Path | None = option(
        None, "Split for validation FID (default: the 'val' folder next to TRAIN_DIR)."
    )
    validation_num_images: int = option(100, "Images generated for each validation FID.")
    validation_guidance_scale: float = option(3.0, "Guidance scale of the validation images.")
    inception_weights: Path | None = option(
        None, "Local pytorch-fid Inception weights for validation FID (offline)."
    )

    def __post_init__(self) -> None:
        positive = ("lora_rank", "num_training_steps", "gradient_accumulation_steps", "batch_size")
        for name in (*positive, "checkpointing_steps", "max_nan_steps", "lr_num_cycles"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "dataloader_num_workers", "validation_fid_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"--caption-dropout must be in [0, 1], got {self.caption_dropout}")
        if self.logit_std <= 0:
            raise ValueError(f"--logit-std must be positive, got {self.logit_std}")
        if not -1 <= self.mode_scale <= 2 / (math.pi - 2):
            raise ValueError(f"--mode-scale must be in [-1, {2 / (math.pi - 2):.3f}] for a valid density")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"--shift must be positive, got {self.shift}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints-total-limit must be at least 1 (or left unset to keep all)")
        if self.balance_max_weight < 1:
            raise ValueError(f"--balance-max-weight must be >= 1, got {self.balance_max_weight}")
        if len(set(self.lora_blocks)) != len(self.lora_blocks) or any(b < 0 for b in self.lora_blocks):
            raise ValueError(
                f"--lora-blocks must list distinct non-negative block indices, got {self.lora_blocks}"
            )
        if self.lora_layers is not None and not self.lora_layer_names:
            raise ValueError("--lora-layers is empty; name at least one layer, e.g. to_q,to_k")
        if not self.amp and self.mixed_precision != "auto":
            raise ValueError("--mixed-precision only applies with --amp; add --amp or drop --mixed-precision")

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


# --- setup helpers ----------------------------------------------------------------------------------------------


def make_accelerator(config: FineTuneConfig):
    """accelerate's Accelerator: device, DDP, autocast and (fp16) GradScaler."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton: forget the previous run's mixed precision so fine_tune can be
    # called twice in one Python process (notebooks, tests). The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cuda = torch.cuda.is_available()
    mixed = "no"
    if config.amp:
        mixed = config.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if (not cuda or torch.cuda.is_bf16_supported()) else "fp16"
        if mixed == "fp16" and not cuda:
            raise InputError(
                "--mixed-precision fp16 needs a CUDA device; use --mixed-precision bf16 (or auto) on CPU"
            )
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed)


def build_dataset(config: FineTuneConfig):
    """The cached training set and its collate function."""
    from sd3_lora_celeba.data.cached import CachedLatentsDataset, collate

    for path, flag in ((config.train_dir, "TRAIN_DIR"), (config.empty_prompt_dir, "EMPTY_PROMPT_DIR")):
        if not Path(path).is_dir():
            raise InputError(
                f"{path}: {flag} folder not found; pass the training split and the empty-prompt folder"
            )
    dataset = CachedLatentsDataset(
        config.train_dir,
        config.empty_prompt_dir,
        variants=config.caption_variant_names,
        caption_dropout=config.caption_dropout,
        random_flip=config.random_flip,
        model_name=config.model_name,
    )
    return dataset, collate


class WithSampleSeed(torch.utils.data.Dataset):
    """Passes each ``(index, sample_seed)`` item through and keeps the seed, for the per-sample flow noise."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[dict, int]:
        return self.dataset[item], item[1]


class CollateWithSeeds:
    """Collate dataset samples with the dataset's collate and add ``sample_seeds`` (B,) int64."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[dict, int]]) -> dict:
        batch = self.collate([sample for sample, _ in items])
        batch["sample_seeds"] = torch.tensor([seed for _, seed in items], dtype=torch.int64)
        return batch


def build_transformer(config: FineTuneConfig):
    """Frozen SD3 transformer with a Gaussian-initialised, fp32 LoRA on the chosen blocks' attention linears."""
    from sd3_lora_celeba.models.loading import load_transformer
    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    transformer = load_transformer(config.model_name, config.model_revision, torch_dtype(config.precision))
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
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def default_shift(config: FineTuneConfig) -> float:
    """``--shift`` or the model scheduler's shift (3.0 for SD3-medium)."""
    if config.shift is not None:
        return config.shift
    from sd3_lora_celeba.models.loading import load_scheduler

    return float(load_scheduler(config.model_name, config.model_revision).config.shift)


def draw_noise_and_sigmas(
    sample_seeds: torch.Tensor, latent_shape: torch.Size, config: FineTuneConfig, shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample diffusion noise (B, 16, H/8, W/8) and noise levels (B,), each from its sample's seed.

    Drawing from the sample seed (not a global RNG) makes a sample's noise independent of the batch it lands in,
    the process that handles it and whether the run was resumed.
    """
    noise, sigmas = [], []
    for seed in sample_seeds.tolist():
        generator = torch.Generator().manual_seed(derive_seed(seed, 1))
        u = flow.sample_density(
            config.weighting_scheme,
            1,
            logit_mean=config.logit_mean,
            logit_std=config.logit_std,
            mode_scale=config.mode_scale,
            generator=generator,
        )
        sigmas.append(flow.shift_sigmas(flow.density_to_sigmas(u, config.density_convention), shift))
        noise.append(torch.randn(tuple(latent_shape[1:]), generator=generator))
    return torch.stack(noise), torch.cat(sigmas)


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def validation_split(config: FineTuneConfig) -> Path:
    return config.validation_dir or Path(config.train_dir).parent / "val"


def check_validation_fid_available(config: FineTuneConfig) -> None:
    if config.validation_fid_every == 0:
        return
    try:
        import sd3_lora_celeba.evaluate.validation  # noqa: F401
    except ModuleNotFoundError:
        raise InputError(
            "--validation-fid-every: validation FID is not available in this version; "
            "use --validation-fid-every 0 and 'sd3 fid-vs-step' after training"
        ) from None
    if not validation_split(config).is_dir():
        raise InputError(f"{validation_split(config)}: validation split not found; pass --validation-dir")


# --- the training loop ------------------------------------------------------------------------------------------


def fine_tune(config: FineTuneConfig) -> Path:
    """Train the LoRA; returns the final checkpoint folder. Resumable; see the module docstring."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(config)
    device, is_main = accelerator.device, accelerator.is_main_process
    run_dir = Path(config.output_dir)
    check_validation_fid_available(config)
    if is_main:
        ckpt.remove_partial_checkpoints(run_dir)
    resume_from = ckpt.resolve_resume(config.resume, run_dir)
    config_dict = config_to_dict(config)
    if resume_from is not None:
        ckpt.check_compatible(resume_from, config_dict)

    # Model, optimizer, schedule. Seeding first makes the Gaussian LoRA init reproducible.
    set_seed(config.seed)
    dataset, collate = build_dataset(config)
    transformer = build_transformer(config).to(device)
    shift = default_shift(config)
    if config.compile:
        transformer.compile()
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        lora_params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        fused=device.type == "cuda",
    )
    lr_scheduler = build_lr_scheduler(config, optimizer)
    # The lr scheduler stays unprepared: accelerate would step it once per process.
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    (log.info if is_main else log.debug)(
        "LoRA rank %d on %d linears (%.2fM trainable parameters); shift %.3g; mixed precision %s; %d process(es)",
        config.lora_rank,
        sum(1 for n, _ in accelerator.unwrap_model(transformer).named_modules() if n.endswith(".lora_A")),
        sum(p.numel() for p in lora_params) / 1e6,
        shift,
        accelerator.mixed_precision,
        accelerator.num_processes,
    )

    # Resume: LoRA, optimizer, schedule, scaler, RNG, data position, step.
    step, consumed, nan_streak = 0, 0, 0
    if resume_from is not None:
        state = ckpt.load_training_state(resume_from)
        ckpt.load_lora_weights(accelerator.unwrap_model(transformer), resume_from)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and state.get("scaler") is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_states(state["rng"])
        step, consumed, nan_streak = state["step"], state["consumed"], state["nan_streak"]
        log.info("resumed from %s at step %d", resume_from, step)
    if step >= config.num_training_steps:
        log.info("%s: already trained to step %d; raise --num-training-steps to go on", run_dir, step)
        return resume_from
    if is_main:
        truncate_metrics(run_dir, step)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / layout.RUN_CONFIG)

    # Data: an endless, seeded stream of (index, sample_seed); this process reads its slice of each micro-batch.
    weights = (
        balanced_weights(dataset.attributes, max_weight=config.balance_max_weight)
        if config.balance_attributes
        else None
    )
    sampler = ResumableBatchSampler(
        len(dataset),
        config.batch_size,
        seed=config.seed,
        weights=weights,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
        start=consumed,
    )
    loader = torch.utils.data.DataLoader(
        WithSampleSeed(dataset),
        batch_sampler=sampler,
        collate_fn=CollateWithSeeds(collate),
        num_workers=config.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    images_per_step = sampler.global_batch_size * config.gradient_accumulation_steps

    tracker = Tracker(run_dir, config.report_to, config_dict, enabled=is_main, project=config.wandb_project)
    progress = tqdm(
        total=config.num_training_steps,
        initial=step,
        desc="fine-tune",
        unit="step",
        disable=None if is_main else True,
    )
    transformer.train()
    final_checkpoint = resume_from
    while step < config.num_training_steps:
        step_start = time.perf_counter()
        window_loss = torch.zeros((), device=device)
        window_sigmas = []
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(transformer):  # no DDP all-reduce until the window's last micro-batch
                latents = batch["latents"].to(device)  # (B, 16, H/8, W/8), already (z - shift) * scale
                noise, sigmas = draw_noise_and_sigmas(batch["sample_seeds"], latents.shape, config, shift)
                noise, sigmas = noise.to(device), sigmas.to(device)  # (B, 16, H/8, W/8), (B,)
                noisy_latents = flow.add_noise(latents, noise, sigmas)
                model_pred = transformer(
                    hidden_states=noisy_latents,
                    timestep=flow.sigmas_to_timesteps(sigmas),
                    encoder_hidden_states=batch["prompt_embeds"].to(device),  # (B, 77 + L, D)
                    pooled_projections=batch["pooled_prompt_embeds"].to(device),  # (B, P)
                    return_dict=False,
                )[0]  # (B, 16, H/8, W/8), the predicted velocity
                if config.precondition_outputs:
                    model_pred = flow.precondition_outputs(model_pred, noisy_latents, sigmas)
                    target = latents
                else:
                    target = flow.velocity_target(latents, noise)
                loss = flow.weighted_mse(
                    model_pred, target, flow.loss_weighting(config.weighting_scheme, sigmas)
                )
                accelerator.backward(loss)  # divides by the accumulation steps; scales for fp16
            window_loss += loss.detach()
            window_sigmas.append(sigmas.detach())
            consumed += sampler.global_batch_size

        # End of the accumulation window: one optimizer step, unless the loss was not finite anywhere.
        mean_loss = float(accelerator.reduce(window_loss, "mean")) / config.gradient_accumulation_steps
        grad_norm = float("nan")
        skipped = not math.isfinite(mean_loss)
        if not skipped:
            grad_norm = float(accelerator.clip_grad_norm_(lora_params, config.max_grad_norm or float("inf")))
            if not math.isfinite(grad_norm) and accelerator.scaler is None:
                skipped = True  # with fp16 the GradScaler skips overflowing steps itself
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        step += 1
        nan_streak = nan_streak + 1 if skipped else 0
        if skipped:
            log.error(
                "step %d: non-finite loss %s or grad norm %s; update skipped", step, mean_loss, grad_norm
            )

        step_time = time.perf_counter() - step_start
        sigmas_all = accelerator.gather(torch.cat(window_sigmas))
        tracker.log(
            {
                "step": step,
                "loss": mean_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "sigma_hist": flow.sigma_histogram(sigmas_all),
                "step_time_s": step_time,
                "images_per_s": images_per_step / step_time,
                "peak_memory_mb": peak_memory_mb(device),
                "shift": shift,
                "epoch": sampler.epoch_of(consumed),
                "skipped": skipped,
            }
        )
        progress.update()
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
        if nan_streak >= config.max_nan_steps:
            tracker.close()
            raise RuntimeError(
                f"step {step}: {nan_streak} consecutive non-finite steps; lower --learning-rate, try "
                "--mixed-precision bf16, or resume from an earlier checkpoint"
            )

        if step % config.checkpointing_steps == 0 or step == config.num_training_steps:
            accelerator.wait_for_everyone()
            if is_main:
                training_state = {
                    "step": step,
                    "consumed": consumed,
                    "nan_streak": nan_streak,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rng": ckpt.rng_states(),
                    "sampler": {"seed": config.seed, "consumed": consumed, "balanced": weights is not None},
                }
                final_checkpoint = ckpt.save_checkpoint(
                    run_dir,
                    step,
                    transformer=accelerator.unwrap_model(transformer),
                    training_state=training_state,
                    config=config,
                )
                ckpt.prune_checkpoints(run_dir, config.checkpoints_total_limit)
                log.info("step %d: saved %s", step, final_checkpoint)
            accelerator.wait_for_everyone()

        if config.validation_fid_every and step % config.validation_fid_every == 0:
            # --- validation FID call site (module provided by the evaluate stage) ---
            from sd3_lora_celeba.evaluate.validation import validation_fid

            if is_main:
                fid = validation_fid(
                    accelerator.unwrap_model(transformer),
                    model_name=config.model_name,
                    revision=config.model_revision,
                    split_dir=validation_split(config),
                    empty_prompt_dir=config.empty_prompt_dir,
                    num_images=config.validation_num_images,
                    guidance_scale=config.validation_guidance_scale,
                    seed=config.seed,
                    inception_weights=config.inception_weights,
                    work_dir=run_dir / layout.VALIDATION_WORK_DIR,
                )
                tracker.log({"step": step, "validation_fid": fid})
                log.info("step %d: validation FID %.2f", step, fid)
            accelerator.wait_for_everyone()

    progress.close()
    tracker.close()
    accelerator.end_training()
    return layout.checkpoint_dir(run_dir, step) if final_checkpoint is None else final_checkpoint
