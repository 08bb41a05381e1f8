"""The ``sd3`` command: maps subcommand names to stage functions, and sets up logging.

Stage modules are imported only when their subcommand runs, so ``sd3 --help`` is instant. Each entry names
``module:ConfigClass:function``; the config dataclass generates the subcommand's options.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from sd3_lora_celeba import __version__

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


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, help_text = COMMANDS[name]
        module_name, config_name, func_name = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("sd3_lora_celeba"):
                return _unavailable(name, help_text)
            raise
        from sd3_lora_celeba.config import build_command

        return build_command(name, getattr(module, config_name), getattr(module, func_name), help_text)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help straight from COMMANDS: listing commands imports nothing heavy.
        rows = [(name, help_text) for name, (_, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str, help_text: str) -> click.Command:
    def run() -> None:
        raise click.ClickException(f"'{name}' is not available in this version of sd3-lora-celeba")

    return click.Command(name, callback=run, help=help_text)


def _print_version(ctx: click.Context) -> None:
    import importlib.metadata

    click.echo(f"sd3-lora-celeba {__version__}")
    for lib in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            click.echo(f"  {lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            click.echo(f"  {lib} not installed")
    ctx.exit(0)


def setup_logging(quiet: bool, style: str) -> None:
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
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Progress bars follow --quiet as well.
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


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
@click.option("--quiet", is_flag=True, help="Only print warnings and errors; no progress bars.")
@click.option(
    "--logging-style",
    type=click.Choice(["rich", "plain"]),
    default="rich",
    show_default=True,
    help="Log format: rich (coloured, for terminals) or plain (timestamped lines, for log files).",
)
def cli(quiet: bool, logging_style: str) -> None:
    """Fine-tune Stable Diffusion 3 with LoRA on CelebA faces, measure FID, and visualise attention."""
    setup_logging(quiet, logging_style)


def main() -> None:
    # tqdm reads TQDM_DISABLE when it is imported, which happens while click resolves the subcommand,
    # before the group callback runs: decide it from the group options up front.
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            break
        if arg == "--quiet":
            os.environ["TQDM_DISABLE"] = "1"
    cli(prog_name="sd3")


if __name__ == "__main__":
    main()
