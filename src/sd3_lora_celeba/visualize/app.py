"""``sd3 visualize-attention-weights``: a Gradio app comparing attention of the base model and LoRA checkpoints.

UI only: generation and capture live in :mod:`.explorer` and :mod:`.capture`, figures in :mod:`.figures`, NCUT in
:mod:`.ncut`. The pipeline is loaded once and shared; every result a user produces is kept in that browser
session's ``gr.State``, so two users never see each other's images. Attention is captured once per Generate; words,
patches, blocks, steps, comparisons and NCUT are then explored from the stored maps without regenerating. The app
listens on 127.0.0.1 unless ``--host`` says otherwise and opens a public share link only with ``--share``.

Importing this module changes no environment variable: the command sets ``GRADIO_ANALYTICS_ENABLED=False``
(unless already set) before Gradio is imported; whether the hub may be reached is the user's ``HF_HUB_OFFLINE``.

Callbacks are plain functions of (explorer or session, inputs) so tests call them without a browser.
"""

import html
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sd3_lora_celeba.config import check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import DEFAULT_SD3_MODEL, SD3_MODEL_ENV, Precision

log = logging.getLogger(__name__)

Offload = Literal["auto", "none", "model"]
# Beside the weights, the default capture and one guided generation needed 2.2-2.4 GiB at the native
# resolution in benchmarks/estimate_memory.py, and 8.7 GiB for SD3-medium at twice the side (4x the image
# tokens: the decode's activations and the maps grow with them). The fixed rest is for the CUDA context, kernel
# workspaces and larger captures. At the native resolution the two make 4 GiB.
APP_WORKSPACE_BYTES = 4 * 2**30
APP_TOKEN_BYTES = 2.4 * 2**30  # the part that scales with the number of image tokens


def workspace_bytes(resolution: int, native: int) -> int:
    """Memory the app needs beside the weights at ``resolution`` px: the native 4 GiB, with its token-bound
    part scaled by the number of image tokens (``(resolution / native) ** 2``)."""
    return int(APP_WORKSPACE_BYTES - APP_TOKEN_BYTES + APP_TOKEN_BYTES * (resolution / native) ** 2)


DIRECTIONS = {
    "image -> text": "image_to_text",
    "text -> image": "text_to_image",
}
DIRECTION_HELP = (
    "**image -> text**: how much each image patch (query) attends to the chosen words (keys): where the words "
    "are *read* into the image. **text -> image**: how much the chosen words' tokens (queries) attend to each "
    "patch (keys): which patches the words *gather* from. Both are softmax probabilities over all joint-attention "
    "keys, averaged over heads, the shown blocks and steps, conditional branch only."
)


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
    precision: Precision | None = option(
        None, "Model dtype [default: auto = bfloat16 on CUDA (float16 without bf16), float32 on CPU]."
    )
    resolution: int | None = option(
        None, "Image side in pixels, a multiple of 16 [default: the model's native]."
    )
    offload: Offload = option(
        "auto",
        "model: keep each model (text encoders, transformer, VAE) in CPU memory and move it to the GPU only "
        "while it runs (diffusers' model offload; slower by the copies). auto: offload when the pipeline's "
        "weights and the app's workspace do not fit in the GPU's free memory (SD3.5-large on a 24 GB GPU).",
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
        check_bounds(self)
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port}: use a port between 1 and 65535")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise ValueError(
                f"--resolution {self.resolution}: use a positive multiple of 16 (VAE 8 x patch 2)"
            )
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"--max-sequence-length {self.max_sequence_length}: use 1..512")
        if not 1 <= self.num_inference_steps <= 200:
            raise ValueError("--num-inference-steps: use 1..200")


def load_explorer(config: VisualizeConfig):
    """The pipeline of ``config.model_name`` with every loadable LoRA of ``config.lora_weight_dir``."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.models.loading import enable_tf32, load_pretrained, resolve_device, resolve_dtype
    from sd3_lora_celeba.visualize.explorer import AttentionExplorer

    device = resolve_device(config.device)
    if config.offload == "model" and device.type == "cpu":
        raise InputError(
            "--offload model: with --device cpu the models already stay in CPU memory; use --offload auto or none"
        )
    enable_tf32()
    pipe = load_pretrained(
        StableDiffusion3Pipeline.from_pretrained,
        config.model_name,
        what="SD3 pipeline",
        revision=config.model_revision,
        dtype=resolve_dtype(config.precision or "auto", device),
    )
    native = pipe.default_sample_size * pipe.vae_scale_factor
    workspace = workspace_bytes(config.resolution or native, native)
    weights, free = pipeline_bytes(pipe), free_device_bytes(device)
    offload = wants_offload(config.offload, weights, free, workspace)
    if offload and config.offload == "auto":
        log.info(
            "the pipeline's weights (%.1f GiB) and the app's workspace (%.1f GiB) do not fit in %s's free memory "
            "(%.1f GiB): each model moves to the GPU only while it runs (--offload none turns this off)",
            weights / 2**30,
            workspace / 2**30,
            device,
            free / 2**30,
        )
    return AttentionExplorer(
        pipe,
        config.lora_weight_dir,
        device=device,
        max_sequence_length=config.max_sequence_length,
        resolution=config.resolution,
        offload=offload,
    )


def pipeline_bytes(pipe) -> int:
    """Bytes of the weights and buffers of every model of ``pipe`` (text encoders, transformer, VAE)."""
    from sd3_lora_celeba.visualize.explorer import pipeline_models

    return sum(t.nbytes for m in pipeline_models(pipe) for t in (*m.parameters(), *m.buffers()))


def free_device_bytes(device) -> int | None:
    """Free memory of a CUDA device (other processes' use counted); None for other devices."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def wants_offload(
    choice: Offload, weights: int, free: int | None, workspace: int = APP_WORKSPACE_BYTES
) -> bool:
    """Whether the app offloads its models: ``--offload model`` / ``none`` as asked; ``auto`` when the weights
    plus ``workspace`` (:func:`workspace_bytes`) exceed the device's free memory (never off CUDA: ``free`` is
    None)."""
    if choice != "auto":
        return choice == "model"
    return free is not None and weights + workspace > free


# --- session and callbacks: plain functions, tested without a browser -------------------------------------


@dataclass
class Session:
    """What one browser session explores: the captured generation and the current choices."""

    generation: Any = None
    prompt: int = 0
    words: list[int] = field(default_factory=list)
    patch: tuple[int, int, int] | None = None  # (model, row, column)
    blocks: tuple[int, ...] | None = None  # shown (None: every captured)
    steps: tuple[int, ...] | None = None
    direction: str = "image_to_text"


def error(message: str) -> str:
    """An error line for the page; the text is escaped, so file names with < > & show as written."""
    return f"**Error:** {html.escape(message)}"


def note(message: str) -> str:
    return html.escape(message)


def _memory_line(generation) -> str:
    from sd3_lora_celeba.visualize.explorer import SESSION_BYTES_LIMIT

    return (
        f"captured maps in this session: {generation.nbytes() / 2**20:.1f} MiB "
        f"(limit {SESSION_BYTES_LIMIT / 2**30:.0f} GiB; replaced at the next Generate)"
    )


def generate_callback(
    explorer,
    prompts: str,
    seed: float,
    steps: float,
    guidance: float,
    blocks_text: str,
    steps_text: str,
    progress=None,
) -> tuple[Session | None, str]:
    """Render and capture. Returns (a new Session or None, message)."""
    from sd3_lora_celeba.visualize.explorer import MAX_SEED, parse_indices

    out_of_memory = False
    try:
        seed_value = float(seed if seed is not None else 0)
        if not seed_value.is_integer() or not 0 <= seed_value <= MAX_SEED:
            raise InputError(f"seed {seed}: choose a whole number in 0..{MAX_SEED}")
        if steps is None or not float(steps).is_integer():
            raise InputError(f"denoising steps {steps}: use a whole number")
        steps = int(steps)
        if guidance is None or not 0 <= float(guidance) <= 30:
            raise InputError(f"guidance scale {guidance}: use a number in 0..30")
        # Empty: the default capture set; "all": every block / step.
        blocks = parse_indices(blocks_text, explorer.num_blocks, "capture blocks")
        if blocks is None and (blocks_text or "").strip().lower() == "all":
            blocks = tuple(range(explorer.num_blocks))
        capture_steps = parse_indices(steps_text, max(steps, 1), "capture steps")
        if capture_steps is None and (steps_text or "").strip().lower() == "all":
            capture_steps = tuple(range(steps))
        lines = [line for line in (prompts or "").splitlines() if line.strip()]
        generation = explorer.generate(
            lines or [""], int(seed_value), steps, float(guidance), blocks, capture_steps, progress=progress
        )
    except (InputError, ValueError) as exc:
        return None, error(exc.message if isinstance(exc, InputError) else str(exc))
    except Exception as exc:
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        out_of_memory = True
    if out_of_memory:  # out of the except block: its traceback, and the tensors its frames held, are gone
        return None, error(out_of_memory_message(explorer))
    session = Session(generation=generation)
    message = (
        f"Generated with seed {generation.seed}; captured blocks {_ranges(generation.blocks)} at steps "
        f"{_ranges(generation.steps)}; {_memory_line(generation)}. Click a word or a patch."
    )
    return session, note(message)


def out_of_memory_message(explorer) -> str:
    """What to do after a Generate ran out of device memory. The memory the failed run held goes back to the
    device first (its tensors are collected, the allocator's cached blocks released), so the next Generate
    starts from the memory the app had before."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fixes = "capture fewer blocks or steps, or compare fewer prompts"
    if not explorer.offload:
        fixes += ", or restart the app with --offload model"
    return f"out of GPU memory during Generate: {fixes} (the models and LoRAs are unchanged)"


def _ranges(values) -> str:
    from sd3_lora_celeba.visualize.capture import _ranges as ranges

    return ranges(tuple(values))


def show_callback(session: Session | None, blocks_text: str, steps_text: str, direction: str, prompt: int):
    """Choose shown blocks/steps/direction/prompt among the captured ones (no regeneration). Returns message."""
    from sd3_lora_celeba.visualize.explorer import parse_indices

    if session is None or session.generation is None:
        return error("generate images first")
    generation = session.generation
    try:
        blocks = parse_indices(blocks_text, generation.settings["num_blocks"], "shown blocks")
        steps = parse_indices(steps_text, generation.num_inference_steps, "shown steps")
        generation.prompts[0].captured[0].select(blocks, steps)
    except ValueError as exc:
        return error(str(exc))
    session.blocks, session.steps = blocks, steps
    session.direction = DIRECTIONS.get(direction, direction)
    new_prompt = min(max(int(prompt or 0), 0), len(generation.prompts) - 1)
    if new_prompt != session.prompt:
        session.prompt, session.words, session.patch = new_prompt, [], None
    shown_blocks, shown_steps = generation.prompts[0].captured[0].select(blocks, steps)
    return note(f"Showing blocks {_ranges(shown_blocks)}, steps {_ranges(shown_steps)} (no regeneration).")


def word_callback(session: Session | None, pick: str, several: bool) -> str:
    """A word clicked in a word row: ``"i"`` chooses word i, ``"+i"`` (shift-click) adds/removes it."""
    if session is None or session.generation is None:
        return error("generate images first")
    text = (pick or "").split(":")[0]
    add = text.startswith("+") or several
    try:
        index = int(text.lstrip("+"))
    except ValueError:
        return ""
    words = session.generation.prompts[session.prompt].words
    if not 0 <= index < len(words):
        return error(f"word {index} is not a word of the prompt; click a word in the rows")
    if add:
        session.words = (
            [w for w in session.words if w != index] if index in session.words else [*session.words, index]
        )
    else:
        session.words = [index]
    chosen = ", ".join(f"'{words[w].text}' ({words[w].encoder})" for w in session.words) or "none"
    return note(f"Heatmap of {chosen}.")


def patch_callback(session: Session | None, x: int, y: int) -> str:
    """A click on the images at pixel (x, y): mark that patch and tint the words it attends to."""
    from sd3_lora_celeba.visualize.figures import locate_patch

    if session is None or session.generation is None:
        return error("generate images first")
    model, row, col = locate_patch(session.generation, int(x), int(y))
    session.patch = (model, row, col)
    return note(
        f"Patch (row {row}, column {col}) clicked in '{session.generation.names[model]}': words tinted by the "
        "attention it pays them."
    )


def render(session: Session | None) -> tuple[Any, str, str, Any, str]:
    """(images with the heatmap, colour scale HTML, word rows HTML, difference image, entropy markdown)."""
    from sd3_lora_celeba.visualize.explorer import entropy
    from sd3_lora_celeba.visualize.figures import colour_scale, overlay_row, words_html

    if session is None or session.generation is None:
        return None, "", "", None, ""
    g, p = session.generation, session.prompt
    result = g.prompts[p]
    heat = None
    if session.words:
        heat = g.word_maps(p, session.words, session.direction, session.blocks, session.steps)
    patch = session.patch[1:] if session.patch else None
    model = session.patch[0] if session.patch else 0
    grid_w = g.grid[1]
    scores = g.word_scores(
        p, model, patch[0] * grid_w + patch[1] if patch else None, session.blocks, session.steps
    )
    view = overlay_row(
        g,
        p,
        heat,
        float(heat.min()) if heat is not None else 0,
        float(heat.max()) if heat is not None else 1,
        patch=patch,
    )
    what = (
        "patch attention to the words"
        if session.direction == "image_to_text"
        else "words' attention to patches"
    )
    scale = colour_scale(float(heat.min()), float(heat.max()), "inferno", what) if heat is not None else ""
    rows = "".join(words_html(result.words, scores, set(session.words), enc) for enc in ("CLIP", "T5"))
    diff, table = None, ""
    if heat is not None:
        delta = heat - heat[:1]
        bound = float(abs(delta).max()) or 1.0
        if len(g.names) > 1:
            diff = overlay_row(g, p, delta, -bound, bound, cmap="RdBu_r", alpha=0.75)
        lines = ["| model | entropy of the map (0 = one patch, 1 = uniform) | max |", "|---|---|---|"]
        lines += [
            f"| {html.escape(n)} | {entropy(heat[i]):.3f} | {heat[i].max():.4f} |"
            for i, n in enumerate(g.names)
        ]
        table = "\n".join(lines)
    return view, scale, rows, diff, table


def ncut_callback(
    session: Session | None, n_eig: float, method: str, source: str, with_text: bool, device=None
):
    """Joint NCUT colours of every model's tokens for the shown prompt. Returns (image, message)."""
    import torch

    from sd3_lora_celeba.visualize.figures import overlay_row
    from sd3_lora_celeba.visualize.ncut import ncut_colors, too_few_tokens

    if session is None or session.generation is None:
        return None, error("generate images first")
    g = session.generation
    result = g.prompts[session.prompt]
    n_img = g.grid[0] * g.grid[1]
    try:
        feats = torch.stack([c.mean_features(source, session.blocks) for c in result.captured])
        if not with_text:
            feats = feats[:, :n_img]
        colors = ncut_colors(feats, n_eig=int(n_eig), seed=g.seed, method=method, device=device)
    except ValueError as exc:
        return None, error(str(exc))
    panels = colors[:, :n_img].reshape(len(g.names), *g.grid, 3)
    message = (
        f"NCUT of {source} with {int(n_eig)} eigenvectors ({method} colours), one joint fit over every model"
    )
    message += " and the text tokens." if with_text else "."
    warning = too_few_tokens(n_img)
    if warning:
        message += f" Note: {warning}."
    return overlay_row(g, session.prompt, panels=panels, alpha=1.0), note(message)


def export_callback(session: Session | None, folder: str | None = None) -> tuple[list[str], str]:
    """PNG (200 dpi, settings in its metadata), SVG and the raw maps (.npz) of the current view."""
    from sd3_lora_celeba.visualize.figures import export_figure, slug

    if session is None or session.generation is None:
        return [], error("generate images first")
    g, p = session.generation, session.prompt
    result = g.prompts[p]
    blocks, steps = result.captured[0].select(session.blocks, session.steps)
    heat = g.word_maps(p, session.words, session.direction, blocks, steps) if session.words else None
    words = [result.words[w].text for w in session.words]
    settings = {
        "prompt": result.prompt,
        "seed": g.seed,
        "models": g.names,
        "blocks": list(blocks),
        "steps": list(steps),
        "words": words,
        "direction": session.direction,
        "denoising_steps": g.num_inference_steps,
        "guidance_scale": g.guidance_scale,
    }
    stem = (
        f"{slug(result.prompt)}_seed{g.seed}_blocks{_ranges(blocks)}_steps{_ranges(steps)}"
        + (f"_{slug('-'.join(words), 30)}" if words else "")
    ).replace(",", "+")
    out = Path(folder or tempfile.mkdtemp(prefix="sd3-attention-"))
    title = (
        f"'{', '.join(words) or 'no word'}' ({session.direction}), seed {g.seed}, blocks {_ranges(blocks)}"
    )
    png, svg = export_figure(g, p, heat, title, settings)
    (out / f"{stem}.png").write_bytes(png)
    (out / f"{stem}.svg").write_bytes(svg)
    arrays = {}
    for name, captured in zip(g.names, result.captured, strict=True):
        arrays[f"{name}/image_to_text"] = captured.mean_map("image_to_text", blocks, steps).numpy()
        arrays[f"{name}/text_to_image"] = captured.mean_map("text_to_image", blocks, steps).numpy()
    arrays["kept_columns"] = np.array(result.kept_columns)
    np.savez_compressed(out / f"{stem}.npz", **arrays)
    files = [str(out / f"{stem}.{ext}") for ext in ("png", "svg", "npz")]
    return files, note(f"Exported {stem}.png / .svg / .npz.")


# --- the UI -----------------------------------------------------------------------------------------------

CSS = """
#images img { max-height: 44vh; max-width: 100%; width: auto; height: auto; }
#diff img, #ncut img { max-height: 40vh; max-width: 100%; width: auto; height: auto; }
.word-row { line-height: 1.8; margin: 1px 0; font-size: 14px; user-select: none; }
.word { padding: 0 3px; border-radius: 3px; cursor: pointer; border: 1px solid transparent; }
.word.selected { border-color: #066; outline: 2px solid #0cc; }
.scale { display: flex; gap: 6px; align-items: center; font-size: 12px; min-height: 14px; }
.scale .bar { display: inline-block; width: 160px; height: 10px; }
#word-pick { display: none !important; }
#message { min-height: 1.4em; }
"""

WORD_JS = """
element.addEventListener('click', (event) => {
  const span = event.target.closest('[data-word]');
  if (!span) return;
  const box = document.querySelector('#word-pick textarea, #word-pick input');
  if (!box) return;
  box.value = (event.shiftKey ? '+' : '') + span.dataset.word + ':' + Date.now();
  box.dispatchEvent(new Event('input', { bubbles: true }));
});
"""

BUTTON_IDS = ("generate", "run-ncut", "export")
PNG = {"type": "pil", "format": "png", "buttons": ["download", "fullscreen"], "interactive": False}


def _controls(gr, config: VisualizeConfig, explorer) -> dict:
    """The left column: prompts, seed, denoising settings, capture set, Generate."""
    from sd3_lora_celeba.visualize.explorer import (
        DEFAULT_CAPTURE_STEP_STRIDE,
        MAX_PROMPTS,
        MAX_SEED,
        MAX_STEPS,
        default_capture,
    )

    d_blocks, _ = default_capture(explorer.num_blocks, config.num_inference_steps)
    c = {}
    c["prompt"] = gr.Textbox(
        label=f"Prompt (up to {MAX_PROMPTS}, one per line)",
        lines=3,
        max_lines=6,
        elem_id="prompt",
        value="a photo of a smiling woman with blond hair",
    )
    with gr.Row():
        c["seed"] = gr.Number(
            label=f"Seed (0..{MAX_SEED})", value=0, precision=0, elem_id="seed", min_width=80
        )
        c["steps"] = gr.Number(
            label=f"Steps (1..{MAX_STEPS})",
            value=config.num_inference_steps,
            precision=0,
            elem_id="steps",
            min_width=60,
        )
        c["guidance"] = gr.Number(
            label="Guidance (0..30)", value=config.guidance_scale, step=0.5, min_width=60
        )
    with gr.Row():
        c["capture_blocks"] = gr.Textbox(
            label=f"Capture blocks (0..{explorer.num_blocks - 1})",
            placeholder=f"default {_ranges(d_blocks)}",
            elem_id="capture-blocks",
            min_width=100,
        )
        c["capture_steps"] = gr.Textbox(
            label="Capture steps",
            placeholder=f"default every {DEFAULT_CAPTURE_STEP_STRIDE}th",
            elem_id="capture-steps",
            min_width=100,
        )
    c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
    dual = (
        f" SD3.5 dual blocks {_ranges(explorer.dual_blocks)}: NCUT can use their attn2."
        if explorer.dual_blocks
        else ""
    )
    offloaded = (
        " The models wait in CPU memory and move to the GPU only while they run (`--offload`): each Generate "
        "copies them over."
        if explorer.offload
        else ""
    )
    gr.Markdown(
        f"<small>Default capture, chosen for speed: blocks {_ranges(d_blocks)}, every "
        f"{DEFAULT_CAPTURE_STEP_STRIDE}th denoising step (the last included); `all` captures everything. "
        "Captured maps stay in this session (float16, at most 3 GiB, size shown after Generate); the boxes "
        f"on the right choose among them without regenerating.{dual}{offloaded}</small>",
        elem_id="capture-note",
    )
    return c


def _explore(gr) -> dict:
    """The right column: message, images with the heatmap, word rows, shown blocks/steps/direction."""
    c = {}
    c["message"] = gr.Markdown("", elem_id="message")
    c["view"] = gr.Image(
        label="Base and LoRA images, same seed, the chosen words' heatmap drawn on each (click a patch)",
        elem_id="images",
        **PNG,
    )
    c["scale"] = gr.HTML("", elem_id="scale")
    c["words"] = gr.HTML("", elem_id="words", js_on_load=WORD_JS)
    c["pick"] = gr.Textbox("", elem_id="word-pick", show_label=False, container=False)
    with gr.Row():
        c["show_blocks"] = gr.Textbox(
            label="Show blocks (Enter)", placeholder="all captured", elem_id="show-blocks"
        )
        c["show_steps"] = gr.Textbox(
            label="Show steps (Enter)", placeholder="all captured", elem_id="show-steps"
        )
        c["direction"] = gr.Radio(
            list(DIRECTIONS), value="image -> text", label="Direction", elem_id="direction"
        )
        c["several"] = gr.Checkbox(label="Several words (or shift-click)", value=False, elem_id="several")
        c["prompt_choice"] = gr.Radio(
            [0], value=0, label="Prompt shown", visible=False, elem_id="prompt-choice"
        )
    return c


def _tabs(gr, explorer) -> dict:
    """Compare, NCUT, Export, LoRA norms and Help, below the fold."""
    from sd3_lora_celeba.visualize.figures import lora_norm_plot

    sources = ["output", "query", "key", "value"]
    if explorer.dual_blocks:
        sources += [f"attn2 {s}" for s in sources]
    c = {}
    with gr.Tabs():
        with gr.Tab("Compare", elem_id="tab-compare"):
            c["diff"] = gr.Image(
                label="LoRA minus base (one symmetric scale, red = more)", elem_id="diff", **PNG
            )
            c["entropy"] = gr.Markdown("", elem_id="entropy")
        with gr.Tab("NCUT", elem_id="tab-ncut"):
            with gr.Row():
                c["source"] = gr.Dropdown(sources, value="output", label="Features", elem_id="ncut-source")
                c["with_text"] = gr.Checkbox(label="Include text tokens", value=False, elem_id="ncut-text")
                c["n_eig"] = gr.Slider(2, 100, value=20, step=1, label="Eigenvectors", elem_id="n-eig")
                c["method"] = gr.Radio(["tsne", "spectral"], value="tsne", label="Colouring")
                c["ncut"] = gr.Button("Run NCUT", elem_id="run-ncut")
            c["ncut_image"] = gr.Image(label="NCUT, one joint fit over every model", elem_id="ncut", **PNG)
        with gr.Tab("Export", elem_id="tab-export"):
            c["export"] = gr.Button("Export PNG (200 dpi) + SVG + raw maps (.npz)", elem_id="export")
            c["files"] = gr.File(label="Files", file_count="multiple", elem_id="export-files")
        with gr.Tab("LoRA norms"):
            gr.Image(
                lora_norm_plot(explorer.norms, explorer.num_blocks),
                label="LoRA weight change per block",
                elem_id="lora-norms",
                **PNG,
            )
        with gr.Tab("Help"):
            gr.Markdown(DIRECTION_HELP)
    return c


def _wire(gr, explorer, c: dict, state) -> None:
    """Events: Generate captures; everything else redraws from the session."""
    # (No postponed annotations in this module: Gradio reads the gr.SelectData hint below at run time.)
    ncut_device = str(explorer.device) if explorer.device.type == "cuda" else "cpu"

    def shown(message: str) -> str:
        if message.startswith("**Error:**"):
            gr.Warning(html.unescape(message.removeprefix("**Error:** ")))
        return message

    def on_generate(prompts, seed, steps, guidance, blocks_text, steps_text, progress=gr.Progress()):  # noqa: B008
        def report(done, total, what):
            progress((done, total), desc=what)

        session, message = generate_callback(
            explorer, prompts, seed, steps, guidance, blocks_text, steps_text, progress=report
        )
        if session is None:
            return (gr.update(), shown(message), *[gr.update()] * 7)
        g = session.generation
        n_img = g.grid[0] * g.grid[1]
        eig = gr.update(maximum=max(2, min(100, n_img - 1)), value=min(20, n_img - 1))
        choice = gr.update(choices=list(range(len(g.prompts))), value=0, visible=len(g.prompts) > 1)
        return (session, shown(message), *render(session), eig, choice)

    def on_show(session, blocks_text, steps_text, direction, prompt):
        return (shown(show_callback(session, blocks_text, steps_text, direction, prompt)), *render(session))

    def on_word(session, pick, several):
        message = word_callback(session, pick, several)
        return (shown(message) if message else gr.update(), *render(session))

    def on_patch(session, evt: gr.SelectData):
        x, y = evt.index
        return (shown(patch_callback(session, x, y)), *render(session))

    def on_ncut(session, n_eig, method, source, with_text):
        figure, message = ncut_callback(session, n_eig, method, source, with_text, device=ncut_device)
        return figure, shown(message)

    def on_export(session):
        files, message = export_callback(session)
        return files or None, shown(message)

    buttons = [c["generate"], c["ncut"], c["export"]]
    figures = [c["view"], c["scale"], c["words"], c["diff"], c["entropy"]]
    shows = [state, c["show_blocks"], c["show_steps"], c["direction"], c["prompt_choice"]]

    def busy():
        return [gr.update(interactive=False)] * len(buttons)

    def idle():
        return [gr.update(interactive=True)] * len(buttons)

    inputs = [c[k] for k in ("prompt", "seed", "steps", "guidance", "capture_blocks", "capture_steps")]
    c["generate"].click(busy, None, buttons).then(
        on_generate, inputs, [state, c["message"], *figures, c["n_eig"], c["prompt_choice"]]
    ).then(idle, None, buttons)
    for box in (c["show_blocks"], c["show_steps"]):
        box.submit(on_show, shows, [c["message"], *figures])
    for control in (c["direction"], c["prompt_choice"]):
        control.change(on_show, shows, [c["message"], *figures])
    c["pick"].change(on_word, [state, c["pick"], c["several"]], [c["message"], *figures])
    c["view"].select(on_patch, [state], [c["message"], *figures])
    ncut_inputs = [state, c["n_eig"], c["method"], c["source"], c["with_text"]]
    c["ncut"].click(busy, None, buttons).then(on_ncut, ncut_inputs, [c["ncut_image"], c["message"]]).then(
        idle, None, buttons
    )
    c["export"].click(busy, None, buttons).then(on_export, [state], [c["files"], c["message"]]).then(
        idle, None, buttons
    )


def build_app(config: VisualizeConfig, explorer=None):
    """The Gradio Blocks of the app (not launched). ``explorer`` defaults to :func:`load_explorer` of config."""
    import gradio as gr

    explorer = explorer or load_explorer(config)
    # Figures are served from Gradio's cache folder: drop files older than an hour, every hour.
    with gr.Blocks(title="SD3 attention: base vs LoRA", delete_cache=(3600, 3600)) as app:
        banner = "\n".join(f"- {html.escape(e)}" for e in explorer.errors)
        gr.Markdown(
            f"**Some LoRA checkpoints were not loaded:**\n{banner}" if banner else "",
            elem_id="banner",
            visible=bool(banner),
        )
        state = gr.State(None)  # this browser session's Session
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                controls = _controls(gr, config, explorer)
            with gr.Column(scale=3):
                explore = _explore(gr)
        tabs = _tabs(gr, explorer)
        _wire(gr, explorer, {**controls, **explore, **tabs}, state)
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
        css=CSS,
    )


def visualize_attention_weights(config: VisualizeConfig) -> None:
    """Load the models, then serve the app until interrupted."""
    # Before Gradio is imported: no telemetry from a local visualisation tool (the user may override it).
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(config)
    log.info("attention app on http://%s:%d", config.host, config.port)
    launch(app, config, block=True)
