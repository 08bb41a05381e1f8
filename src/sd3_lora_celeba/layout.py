"""Every on-disk file and folder name of the project, written down once.

Dataset folder (made by ``prepare-celeba-hq`` / ``prepare-celeba``, filled by the later stages)::

    DATASET/
    ├── dataset.json                 split sizes, seed, options of prepare-celeba-hq    (DATASET_INFO)
    ├── train/                       (SPLITS)
    │   ├── hq-00017/                one folder per example; folder name = stable example id
    │   │   ├── example.json         id, source, source file, identity, split, 40 attributes  (EXAMPLE_RECORD)
    │   │   ├── image.jpg            CelebA-HQ image as released, or a CelebA face crop    (IMAGE)
    │   │   ├── prompt_blip2.txt     caption-blip2 output                                  (prompt_file("blip2"))
    │   │   ├── prompt_llama3.txt    caption-llama3 output                                 (prompt_file("llama3"))
    │   │   ├── latent_dist.safetensors   VAE mean/logvar of image and its flip            (LATENT_DIST)
    │   │   ├── prompt_embeds_1.safetensors  text_encoder   (CLIP-L/14), every prompt variant  (prompt_embeds_file(1))
    │   │   ├── prompt_embeds_2.safetensors  text_encoder_2 (CLIP-G/14)
    │   │   └── prompt_embeds_3.safetensors  text_encoder_3 (T5-XXL)
    │   └── celeba-012345/           extra CelebA example (train only), same files
    ├── val/
    ├── test/
    └── empty-prompt/                made by hand as in the README (EMPTY_PROMPT_DIR)
        ├── prompt_empty.txt         empty file
        └── prompt_embeds_{1,2,3}.safetensors

An example folder is *finished* for ``prepare-*`` once ``example.json`` exists: it is written last, atomically.
Any folder holding ``example.json`` or a ``prompt_*.txt`` file is an "example folder" for the caching stages,
so every command accepts the dataset root, one split, or any single example folder (``empty-prompt`` included).

Training run folder (``fine-tune --output-dir``)::

    RUN/
    ├── config.json                  resolved fine-tune config                          (RUN_CONFIG)
    ├── metrics.jsonl                one JSON object per logged step                    (METRICS)
    ├── tensorboard/                 TensorBoard event files                            (TENSORBOARD_DIR)
    └── checkpoint-000500/           one per --checkpointing-steps                      (checkpoint_dir(step))
        ├── pytorch_lora_weights.safetensors   diffusers-format LoRA (load_lora_weights)  (LORA_WEIGHTS)
        ├── adapter_config.json      peft LoRA config (rank, alpha, targets)            (ADAPTER_CONFIG)
        ├── training_state.pt        optimizer, scheduler, scaler, RNG, sampler, step   (TRAINING_STATE)
        └── config.json              config of the run that wrote it

Image folders for FID (``copy-images`` / ``generate-images``) are flat: ``<example id>.png`` / ``.jpg``,
plus ``fid_stats.npz`` (pytorch-fid compatible statistics cache, FID_STATS).
"""

from __future__ import annotations

import re
from pathlib import Path

# --- dataset -------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")
DATASET_INFO = "dataset.json"
EXAMPLE_RECORD = "example.json"
IMAGE = "image.jpg"
EMPTY_PROMPT_DIR = "empty-prompt"
EMPTY_VARIANT = "empty"  # prompt variant of the empty prompt: EMPTY_PROMPT_DIR/prompt_empty.txt
LATENT_DIST = "latent_dist.safetensors"
PROMPT_PREFIX = "prompt_"
PROMPT_SUFFIX = ".txt"
PROMPT_VARIANTS = ("blip2", "llama3", "empty")
HQ_ID_PREFIX = "hq-"
CELEBA_ID_PREFIX = "celeba-"

# --- CelebAMask-HQ release ------------------------------------------------------------------------------
HQ_ATTRIBUTES = "CelebAMask-HQ-attribute-anno.txt"
HQ_MAPPING = "CelebA-HQ-to-CelebA-mapping.txt"
HQ_IMAGES = "CelebA-HQ-img"

# --- CelebA release ------------------------------------------------------------------------------------
CELEBA_ATTRIBUTES = "Anno/list_attr_celeba.txt"
CELEBA_BBOX = "Anno/list_bbox_celeba.txt"
CELEBA_IDENTITY = "Anno/identity_CelebA.txt"
CELEBA_PARTITION = "Eval/list_eval_partition.txt"
CELEBA_IMAGES = "Img/img_celeba"

# The 40 CelebA attributes, in release order.
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

# --- training runs -------------------------------------------------------------------------------------
RUN_CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_PREFIX = "checkpoint-"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_STATE = "training_state.pt"
VALIDATION_WORK_DIR = "validation"  # fine-tune --validation-fid-every: ground truth + generated images

# --- FID -----------------------------------------------------------------------------------------------
FID_STATS = "fid_stats.npz"
GENERATION_SETTINGS = "generation.json"  # settings of a generate-images folder (refuses mixed resumes)
# Sweep folders (fid-vs-step: RUN/fid-vs-step/ by default; fid-vs-guidance: --output-dir):
#   SWEEP/sweep.json, ground-truth/<id>.jpg, step-000500/<id>.png | guidance-3.0/<id>.png, fid_vs_*.csv / .png
SWEEP_SETTINGS = "sweep.json"
GROUND_TRUTH_DIR = "ground-truth"
FID_VS_STEP_DIR = "fid-vs-step"
FID_VS_STEP_CSV = "fid_vs_step.csv"
FID_VS_STEP_PLOT = "fid_vs_step.png"
FID_VS_GUIDANCE_CSV = "fid_vs_guidance.csv"
FID_VS_GUIDANCE_PLOT = "fid_vs_guidance.png"
# Experiment folders (sd3 experiment; the tree is in evaluate/experiment.py):
EXPERIMENT_RECORD = "experiment.json"  # resolved runs + evaluation; report rebuilds everything from it
EXPERIMENT_MANIFEST = "manifest.json"  # versions, git revision, config hash, cache fingerprints, device
EXPERIMENT_RUNS_DIR = "runs"
EXPERIMENT_IMAGES_DIR = "images"
EXPERIMENT_SCORES_DIR = "scores"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
SCORES_CSV = "scores.csv"
FIGURE_FORMATS = ("png", "svg")


def step_images_dir(sweep_dir: Path, step: int) -> Path:
    return Path(sweep_dir) / f"step-{step:06d}"


def guidance_images_dir(sweep_dir: Path, guidance_scale: float) -> Path:
    return Path(sweep_dir) / f"guidance-{guidance_scale:g}"


def prompt_file(variant: str) -> str:
    """File name of the caption of one prompt variant, e.g. ``prompt_blip2.txt``."""
    return f"{PROMPT_PREFIX}{variant}{PROMPT_SUFFIX}"


def prompt_variant(path: Path) -> str | None:
    """Prompt variant of a ``prompt_<variant>.txt`` path, or None for other files."""
    name = path.name
    if name.startswith(PROMPT_PREFIX) and name.endswith(PROMPT_SUFFIX):
        return name[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)]
    return None


def prompt_embeds_file(encoder: int) -> str:
    """Cache file of text encoder 1, 2 or 3 (diffusers ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``)."""
    return f"prompt_embeds_{encoder}.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


_CKPT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """Step of a ``checkpoint-<step>`` folder, or None if the name does not match."""
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run (those holding LoRA weights), sorted by step."""
    found = (
        [
            p
            for p in Path(run_dir).iterdir()
            if p.is_dir() and checkpoint_step(p) is not None and (p / LORA_WEIGHTS).is_file()
        ]
        if Path(run_dir).is_dir()
        else []
    )
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def is_example_dir(path: Path) -> bool:
    """True for a folder that holds an example record or a prompt file."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / EXAMPLE_RECORD).is_file():
        return True
    return any(prompt_variant(p) is not None for p in path.iterdir() if p.is_file())


def find_example_dirs(root: Path) -> list[Path]:
    """Example folders at or below ``root`` (dataset root, split, or one example), sorted by path.

    Sorting by path makes every process of a multi-process run see the same order, so examples can be
    sharded by position in this list while outputs stay keyed by folder (the example id).
    """
    root = Path(root)
    if is_example_dir(root):
        return [root]
    found: list[Path] = []
    if root.is_dir():
        for dirpath in sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith(".")):
            if is_example_dir(dirpath):
                found.append(dirpath)
    return found


def example_id(example_dir: Path) -> str:
    """Stable example id: the example folder's name."""
    return Path(example_dir).name
