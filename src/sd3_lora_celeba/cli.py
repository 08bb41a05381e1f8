"""The ``sd3`` command: maps subcommand names to stage functions, and sets up logging.

Stage modules are imported only when their subcommand runs, so ``sd3 --help`` is instant. Each entry names
``module:ConfigClass:function``; the config dataclass generates the subcommand's options.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import threading
import warnings

import click

from sd3_lora_celeba import __version__
from sd3_lora_celeba.config import cpu_linears_choice
from sd3_lora_celeba.errors import InputError, Terminated

# name -> (target "module:Config:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-celeba-hq": (
        "sd3_lora_celeba.data.prepare_hq:PrepareCelebAHQConfig:prepare_celeba_hq",
        "Split CelebAMask-HQ into train/val/test example folders.",
    ),
    "prepare-celeba": (
        "sd3_lora_celeba.data.prepare_celeba:PrepareCelebAConfig:prepare_celeba",
        "Filter and face-crop extra CelebA images into the training split.",
    ),
    "caption-blip2": (
        "sd3_lora_celeba.captioning.blip2:CaptionBlip2Config:caption_blip2",
        "Caption every image with BLIP-2 (prompt_blip2.txt).",
    ),
    "caption-llama3": (
        "sd3_lora_celeba.captioning.llama3:CaptionLlama3Config:caption_llama3",
        "Rewrite BLIP-2 captions with Llama 3 and the CelebA attributes (prompt_llama3.txt).",
    ),
    "compute-latent-dist": (
        "sd3_lora_celeba.encode.latents:ComputeLatentDistConfig:compute_latent_dist",
        "Cache SD3 VAE latent distributions of every image (and its flip).",
    ),
    "compute-prompt-embeds": (
        "sd3_lora_celeba.encode.prompts:ComputePromptEmbedsConfig:compute_prompt_embeds",
        "Cache one SD3 text encoder's embeddings (1=CLIP-L, 2=CLIP-G, 3=T5-XXL) of every prompt.",
    ),
    "fine-tune": (
        "sd3_lora_celeba.train.recipe:FineTuneConfig:fine_tune",
        "LoRA fine-tune the SD3 transformer on cached latents and prompt embeddings.",
    ),
    "export-lora": (
        "sd3_lora_celeba.models.lora_export:ExportLoraConfig:export_lora",
        "Export a LoRA checkpoint to another key layout (ComfyUI/kohya).",
    ),
    "copy-images": (
        "sd3_lora_celeba.evaluate.copy_images:CopyImagesConfig:copy_images",
        "Copy (or link) a split's ground-truth images into one flat folder.",
    ),
    "generate-images": (
        "sd3_lora_celeba.sample.generate:GenerateImagesConfig:generate_images",
        "Generate one image per example from cached prompt embeddings, with or without LoRA.",
    ),
    "fid": (
        "sd3_lora_celeba.evaluate.fid_cli:FidConfig:fid",
        "FID (and optionally KID) between two image folders, identical to pytorch-fid.",
    ),
    "fid-vs-step": (
        "sd3_lora_celeba.evaluate.sweeps:FidVsStepConfig:fid_vs_step",
        "FID of every checkpoint of a run (and the base model): CSV and plot.",
    ),
    "fid-vs-guidance": (
        "sd3_lora_celeba.evaluate.sweeps:FidVsGuidanceConfig:fid_vs_guidance",
        "FID over a sweep of guidance scales for one model: CSV and plot.",
    ),
    "experiment": (
        "sd3_lora_celeba.evaluate.experiment:ExperimentConfig:experiment",
        "Train a grid of fine-tunes and score them all: results table, FID figures, manifest.",
    ),
    "report": (
        "sd3_lora_celeba.evaluate.report:ReportConfig:report",
        "Rebuild an experiment's results table and figures from its score files.",
    ),
    "visualize-attention-weights": (
        "sd3_lora_celeba.visualize.app:VisualizeConfig:visualize_attention_weights",
        "Gradio app: attention heatmaps and NCUT, base model vs LoRA checkpoints.",
    ),
    "demo": (
        "sd3_lora_celeba.demo:DemoConfig:demo",
        "Run the whole pipeline on the bundled tiny world (synthetic data, tiny models).",
    ),
    "doctor": (
        "sd3_lora_celeba.doctor:DoctorConfig:doctor",
        "Print versions, device, and whether each model id or folder is reachable.",
    ),
}


# The option to lower when a command runs out of GPU memory.
OOM_ADVICE: dict[str, str] = {
    "caption-blip2": "--batch-size",
    "caption-llama3": "--batch-size",
    "compute-latent-dist": "--batch-size",
    "compute-prompt-embeds": "--batch-size",
    "fine-tune": "--batch-size (raise --gradient-accumulation-steps to keep the effective batch) or turn on "
    "--gradient-checkpointing",
    "generate-images": "--batch-size",
    "fid": "--batch-size",
    "fid-vs-step": "--batch-size and --fid-batch-size",
    "fid-vs-guidance": "--batch-size and --fid-batch-size",
    "visualize-attention-weights": "--resolution, or use --offload model",
}

# Disk errors worth one line (the path and the fix) instead of a traceback.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space or write the output elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write the output elsewhere",
    errno.EROFS: "read-only file system; choose a writable output folder",
    errno.EACCES: "permission denied; fix the permissions or choose another folder",
    errno.EPERM: "operation not permitted; fix the permissions or choose another folder",
}

INTERRUPTED = "interrupted; re-run the same command to resume"


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and whose commands end in one line on Ctrl-C,
    SIGTERM, a full or read-only disk, or CUDA out of memory."""

    _depth = 0  # > 0 while a command runs; nested runs (sd3 demo) let the outer one report

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, help_text = COMMANDS[name]
        module_name, config_name, func_name = target.split(":")
        module = importlib.import_module(module_name)
        from sd3_lora_celeba.config import build_command

        return build_command(name, getattr(module, config_name), getattr(module, func_name), help_text)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help straight from COMMANDS: listing commands imports nothing heavy.
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        if LazyGroup._depth:
            return super().invoke(ctx)
        LazyGroup._depth += 1
        previous = _install_sigterm_handler()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            click.echo(INTERRUPTED, err=True)
            ctx.exit(143 if isinstance(exc, Terminated) else 130)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                raise
            where = exc.filename or "the output folder"
            raise InputError(f"{where}: {_DISK_ERRORS[exc.errno]}") from None
        except Exception as exc:
            if type(exc).__name__ != "OutOfMemoryError":
                raise
            command = ctx.invoked_subcommand or "this command"
            lower = OOM_ADVICE.get(command, "the batch or image size")
            raise InputError(f"{command}: out of GPU memory; lower {lower}, or use a larger GPU") from None
        finally:
            LazyGroup._depth -= 1
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _install_sigterm_handler():
    """Turn SIGTERM into :class:`Terminated` (a KeyboardInterrupt) while a command runs; the previous handler
    is returned, or None when signals cannot be handled here (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _print_version(ctx: click.Context) -> None:
    import importlib.metadata

    click.echo(f"sd3-lora-celeba {__version__}")
    for lib in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            click.echo(f"  {lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            click.echo(f"  {lib} not installed")
    ctx.exit(0)


# Library messages that read as failures in a normal run (shown again with --verbose).
_NOISE = (
    (FutureWarning, r".*torch_dtype.*deprecated"),
    (UserWarning, r".*torch_dtype.*deprecated"),
    (UserWarning, r"Already found a `peft_config` attribute"),
    (UserWarning, r".*local_dir_use_symlinks.*deprecated"),
)
# Deprecation notices raised inside the libraries are for their developers, not for our users.
_LIBRARY_MODULES = (
    r"(diffusers|transformers|huggingface_hub|peft|accelerate|torch|torchvision|pytorch_fid)(\.|$)"
)
_LIBRARIES = {"diffusers": "DIFFUSERS_VERBOSITY", "transformers": "TRANSFORMERS_VERBOSITY"}
_LIBRARIES["huggingface_hub"] = "HF_HUB_VERBOSITY"
# Import-time notices of optional libraries (torchao's extension check, torch's pytree deprecation).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "peft")


def quiet_libraries(verbose: bool, progress_bars: bool) -> None:
    """Library logging at error level and known warnings filtered (unless ``verbose``); library progress bars
    off unless ``progress_bars``. Works whether or not the libraries are imported yet."""
    level = logging.WARNING if verbose else logging.ERROR
    for lib, env in _LIBRARIES.items():
        # The variable covers a later import (the library sets its level then); the logger an earlier one.
        os.environ[env] = logging.getLevelName(level).lower()
        logging.getLogger(lib).setLevel(level)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for category, message in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        warnings.filterwarnings("ignore", category=FutureWarning, module=_LIBRARY_MODULES)
    if not progress_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        for module, name in (
            ("huggingface_hub.utils", "disable_progress_bars"),
            ("diffusers.utils.logging", "disable_progress_bar"),
            ("transformers.utils.logging", "disable_progress_bar"),
        ):
            if module in sys.modules:
                getattr(sys.modules[module], name)()


def setup_logging(quiet: bool, style: str, verbose: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if style == "rich":
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries(verbose, progress_bars=not quiet and style == "rich")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def _quiet_early(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    # tqdm reads TQDM_DISABLE when it is imported, which happens while click resolves the subcommand (after
    # the group options are parsed, before the group callback runs): decide it while parsing.
    if value:
        os.environ["TQDM_DISABLE"] = "1"
    return value


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _print_version(ctx) if value else None,
    help="Show the version of sd3-lora-celeba and of its main libraries, then exit.",
)
@click.option(
    "--quiet", is_flag=True, callback=_quiet_early, help="Only print warnings and errors; no progress bars."
)
@click.option(
    "--verbose",
    is_flag=True,
    help="Also show the libraries' own warnings and info (transformers, diffusers, huggingface_hub).",
)
@click.option(
    "--logging-style",
    type=click.Choice(["rich", "plain"]),
    default="rich",
    show_default=True,
    help="Log format: rich (coloured, for terminals) or plain (timestamped lines, for log files).",
)
def cli(quiet: bool, verbose: bool, logging_style: str) -> None:
    """Fine-tune Stable Diffusion 3 with LoRA on CelebA faces, measure FID, and visualise attention."""
    setup_logging(quiet, logging_style, verbose)
    cpu_linears_choice()  # a bad SD3_CPU_LINEARS fails here, before any model loads


def main() -> None:
    cli(prog_name="sd3")


if __name__ == "__main__":
    main()
