"""``sd3 visualize-attention-weights``: a Gradio app comparing attention of the base model and LoRA checkpoints.

UI only: generation and capture live in :mod:`.explorer` and :mod:`.capture`, figures in :mod:`.figures`, NCUT in
:mod:`.ncut`. The pipeline is loaded once and shared; every result a user produces is kept in that browser
session's ``gr.State``, so two users never see each other's images. The app listens on 127.0.0.1 unless
``--host`` says otherwise and opens a public share link only with ``--share``.

Callbacks are plain functions of (explorer, inputs) so tests call them without a browser.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before gradio/huggingface_hub are imported: no telemetry and no hub calls from a local visualisation tool
# (models must be in the cache or a local folder; HF_HUB_OFFLINE=0 in the environment allows downloads).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sd3_lora_celeba.config import option  # noqa: E402
from sd3_lora_celeba.errors import InputError  # noqa: E402
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, Precision  # noqa: E402

log = logging.getLogger(__name__)

MESSAGE_ID = "message"


@dataclass
class VisualizeConfig:
    """Options of ``sd3 visualize-attention-weights``."""

    lora_weight_dir: tuple[Path, ...] = option(
        (),
        "LoRA checkpoint folder to compare with the base model (repeat the option for several).",
        multiple=True,
    )
    model_name: str = option(
        DEFAULT_SD3_MODEL, "SD3 pipeline: hub id or local diffusers folder.", env=SD3_MODEL_ENV
    )
    model_revision: str | None = option(None, "Hub revision (branch, tag or commit) of --model-name.")
    device: str | None = option(None, "torch device, e.g. cuda or cpu [default: cuda when available].")
    precision: Precision | None = option(None, "Model dtype [default: float16 on CUDA, float32 on CPU].")
    resolution: int | None = option(
        None, "Image side in pixels, a multiple of 16 [default: the model's native]."
    )
    max_sequence_length: int = option(
        256, "T5 prompt positions (SD3 default 256); longer prompts are refused."
    )
    num_inference_steps: int = option(28, "Initial value of the denoising steps field.")
    guidance_scale: float = option(7.0, "Initial value of the guidance scale field.")
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 exposes the app to the network.")
    port: int = option(7860, "Port to listen on.")
    share: bool = option(
        False, "Also open a public gradio.live link (sends traffic through Gradio's servers)."
    )

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: use a port between 1 and 65535")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise ValueError(
                f"--resolution {self.resolution}: use a positive multiple of 16 (VAE 8 x patch 2)"
            )
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"--max-sequence-length {self.max_sequence_length}: use 1..512")
        if self.num_inference_steps < 1:
            raise ValueError("--num-inference-steps: use at least 1")


def load_explorer(config: VisualizeConfig):
    """The pipeline of ``config.model_name`` with every loadable LoRA of ``config.lora_weight_dir``."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.models.loading import load_pretrained, resolve_device, resolve_dtype
    from sd3_lora_celeba.visualize.explorer import AttentionExplorer

    device = resolve_device(config.device)
    precision = config.precision or ("float16" if device.type == "cuda" else "float32")
    pipe = load_pretrained(
        StableDiffusion3Pipeline.from_pretrained,
        config.model_name,
        what="SD3 pipeline",
        revision=config.model_revision,
        dtype=resolve_dtype(precision, device),
    )
    return AttentionExplorer(
        pipe,
        config.lora_weight_dir,
        device=device,
        max_sequence_length=config.max_sequence_length,
        resolution=config.resolution,
    )


# --- callbacks: plain functions, tested without a browser ------------------------------------------------


def _error(message: str) -> str:
    return f"**Error:** {message}"


def generate_callback(
    explorer, prompt: str, seed: float, steps: float, guidance: float, blocks_text: str, steps_text: str
) -> tuple[Any, Any, list[tuple[str, int]], str, str]:
    """Generate every model's image. Returns (generation or None, side-by-side image, token choices, order, message)."""
    from sd3_lora_celeba.visualize.explorer import parse_indices
    from sd3_lora_celeba.visualize.figures import side_by_side

    try:
        steps = int(steps)
        blocks = parse_indices(blocks_text, explorer.num_blocks, "blocks")
        capture_steps = parse_indices(steps_text, max(steps, 1), "capture steps")
        generation = explorer.generate(prompt, int(seed), steps, float(guidance), blocks, capture_steps)
    except (InputError, ValueError) as exc:
        message = exc.message if isinstance(exc, InputError) else str(exc)
        return None, None, [], "", _error(message)
    choices = [(f"{t.text} [{t.encoder} {t.column}]", t.column) for t in generation.tokens]
    order = "Left to right: " + " | ".join(f"**{n}**" for n in generation.names)
    blocks_used = ",".join(map(str, generation.maps[0].blocks))
    steps_used = ",".join(map(str, generation.maps[0].steps))
    message = (
        f"Generated with seed {generation.seed}; attention of blocks {blocks_used} at steps {steps_used}."
    )
    return generation, side_by_side(generation.images), choices, order, message


def token_callback(generation, column: int | None) -> tuple[Any, str]:
    """Heatmaps of the prompt token at text ``column`` over every image. Returns (figure, message)."""
    from sd3_lora_celeba.visualize.figures import token_heatmaps

    if generation is None:
        return None, _error("generate images first")
    if column is None:
        return None, ""
    token = next((t for t in generation.tokens if t.column == int(column)), None)
    if token is None:
        return None, _error(f"token column {column} is not a token of the prompt; pick a token from the list")
    return token_heatmaps(generation, token), f"Heatmap of '{token.text}' ({token.encoder})."


def patch_callback(generation, x: int, y: int) -> tuple[Any, str]:
    """Bar plot of the text tokens attended by the patch under pixel (x, y) of the side-by-side image."""
    from sd3_lora_celeba.visualize.figures import locate_patch, patch_bars

    if generation is None:
        return None, _error("generate images first")
    model, row, col = locate_patch(generation, int(x), int(y))
    return patch_bars(
        generation, row, col
    ), f"Patch (row {row}, column {col}) clicked in '{generation.names[model]}'."


def ncut_callback(generation, n_eig: float, method: str, device: str | None = None) -> tuple[Any, str]:
    """Joint NCUT colours of all images' tokens. Returns (figure, message)."""
    from sd3_lora_celeba.visualize.figures import ncut_panels
    from sd3_lora_celeba.visualize.ncut import ncut_colors

    if generation is None:
        return None, _error("generate images first")
    try:
        colors = ncut_colors(
            generation.features(),
            generation.grid,
            n_eig=int(n_eig),
            seed=generation.seed,
            method=method,
            device=device,
        )
    except ValueError as exc:
        return None, _error(str(exc))
    return ncut_panels(
        generation, colors, int(n_eig)
    ), f"NCUT with {int(n_eig)} eigenvectors ({method} colours)."


# --- the UI -----------------------------------------------------------------------------------------------


def build_app(config: VisualizeConfig, explorer=None):
    """The Gradio Blocks of the app (not launched). ``explorer`` defaults to :func:`load_explorer` of config."""
    import gradio as gr

    from sd3_lora_celeba.visualize.figures import lora_norm_plot

    explorer = explorer or load_explorer(config)
    ncut_device = str(explorer.device) if explorer.device.type == "cuda" else "cpu"
    png = {"type": "pil", "format": "png", "buttons": ["download", "fullscreen"], "interactive": False}

    def show(message: str) -> str:
        # Errors also pop up as a toast; the Markdown keeps them visible.
        if message.startswith("**Error:**"):
            gr.Warning(message.removeprefix("**Error:** "))
        return message

    def on_generate(prompt, seed, steps, guidance, blocks_text, steps_text):
        generation, row, choices, order, message = generate_callback(
            explorer, prompt, seed, steps, guidance, blocks_text, steps_text
        )
        if generation is None:
            return (
                gr.update(),
                gr.update(),
                gr.update(),
                gr.update(),
                show(message),
                gr.update(),
                gr.update(),
                gr.update(),
            )
        return generation, row, gr.update(choices=choices, value=None), order, show(message), None, None, None

    def on_token(generation, column):
        figure, message = token_callback(generation, column)
        return (figure, show(message)) if message else (figure, gr.update())

    def on_patch(generation, evt: gr.SelectData):
        x, y = evt.index
        figure, message = patch_callback(generation, x, y)
        return figure, show(message)

    def on_ncut(generation, n_eig, method):
        figure, message = ncut_callback(generation, n_eig, method, device=ncut_device)
        return figure, show(message)

    # Figures are served from Gradio's cache folder: drop files older than an hour, every hour.
    with gr.Blocks(title="SD3 attention: base vs LoRA", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# SD3 attention: base model vs LoRA checkpoints")
        banner = "\n".join(f"- {e}" for e in explorer.errors)
        gr.Markdown(
            f"**Some LoRA checkpoints were not loaded:**\n{banner}" if banner else "",
            elem_id="banner",
            visible=bool(banner),
        )
        state = gr.State(None)  # this browser session's Generation
        with gr.Row():
            prompt = gr.Textbox(
                label="Prompt", value="a photo of a smiling woman with blond hair", scale=4, elem_id="prompt"
            )
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, scale=1)
        with gr.Row():
            steps = gr.Slider(1, 100, value=config.num_inference_steps, step=1, label="Denoising steps")
            guidance = gr.Slider(0.0, 15.0, value=config.guidance_scale, step=0.5, label="Guidance scale")
            blocks = gr.Textbox(
                label=f"Blocks to show (0..{explorer.num_blocks - 1}; empty = all)",
                value="",
                placeholder="e.g. 4-12",
            )
            capture_steps = gr.Textbox(label="Steps to show (empty = all)", value="", placeholder="e.g. 0-9")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        message = gr.Markdown("", elem_id=MESSAGE_ID)
        order = gr.Markdown("")
        images = gr.Image(label="Generated images, same seed (click a patch)", elem_id="images", **png)
        tokens = gr.Radio(choices=[], label="Prompt tokens (click one for its heatmap)", elem_id="tokens")
        heatmap = gr.Image(label="Token heatmap (shared colour scale)", elem_id="heatmap", **png)
        patch_plot = gr.Image(label="Text tokens attended by the clicked patch", elem_id="patch-plot", **png)
        with gr.Row():
            n_eig = gr.Slider(2, 100, value=20, step=1, label="NCUT eigenvectors")
            method = gr.Radio(["tsne", "umap"], value="tsne", label="NCUT colouring")
            ncut = gr.Button("Run NCUT", elem_id="run-ncut")
        ncut_image = gr.Image(
            label="NCUT (one joint fit: a colour means the same in every image)", elem_id="ncut", **png
        )
        gr.Image(
            lora_norm_plot(explorer.norms, explorer.num_blocks),
            label="LoRA weight change per block",
            elem_id="lora-norms",
            **png,
        )

        generate.click(
            on_generate,
            [prompt, seed, steps, guidance, blocks, capture_steps],
            [state, images, tokens, order, message, heatmap, patch_plot, ncut_image],
        )
        tokens.change(on_token, [state, tokens], [heatmap, message])
        images.select(on_patch, [state], [patch_plot, message])
        ncut.click(on_ncut, [state, n_eig, method], [ncut_image, message])
    return app


def launch(app, config: VisualizeConfig, block: bool = True):
    """Start the server; ``block=False`` returns at once (tests)."""
    return app.launch(
        server_name=config.host,
        server_port=config.port,
        share=config.share,
        prevent_thread_lock=not block,
        show_error=True,
        ssr_mode=False,
        quiet=not block,
    )


def visualize_attention_weights(config: VisualizeConfig) -> None:
    """Load the models, then serve the app until interrupted."""
    app = build_app(config)
    log.info("attention app on http://%s:%d", config.host, config.port)
    launch(app, config, block=True)
