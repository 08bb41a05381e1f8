"""Loading SD3 parts: the one place where model ids, subfolders and dtypes are decided.

Every model is loaded the standard way, ``from_pretrained`` on a hub id or a local folder. The defaults can be
redirected with environment variables (used by ``sd3 demo`` and the tests to point at the tiny offline world):

=======================  ===================================================  ==========================
what                     default                                              environment variable
=======================  ===================================================  ==========================
SD3 pipeline (diffusers)  ``stabilityai/stable-diffusion-3-medium-diffusers``  ``SD3_MODEL_NAME``
BLIP-2 captioner          ``Salesforce/blip2-flan-t5-xl-coco``                 ``SD3_BLIP2_MODEL_NAME``
Llama 3 chat model        ``meta-llama/Llama-3.1-8B-Instruct``                 ``SD3_LLAMA3_MODEL_NAME``
=======================  ===================================================  ==========================

Text encoders follow the diffusers subfolders: 1 = ``text_encoder`` (CLIP-L/14), 2 = ``text_encoder_2``
(CLIP-G/14), 3 = ``text_encoder_3`` (T5-XXL).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
DEFAULT_BLIP2_MODEL = "Salesforce/blip2-flan-t5-xl-coco"
DEFAULT_LLAMA3_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SD3_MODEL_ENV = "SD3_MODEL_NAME"
BLIP2_MODEL_ENV = "SD3_BLIP2_MODEL_NAME"
LLAMA3_MODEL_ENV = "SD3_LLAMA3_MODEL_NAME"

Precision = Literal["float32", "float16", "bfloat16"]

TEXT_ENCODER_SUBFOLDERS = {1: "text_encoder", 2: "text_encoder_2", 3: "text_encoder_3"}
TOKENIZER_SUBFOLDERS = {1: "tokenizer", 2: "tokenizer_2", 3: "tokenizer_3"}
TEXT_ENCODER_ALIASES = {"1": 1, "2": 2, "3": 3, "clip-l": 1, "clip-g": 2, "t5": 3}
TEXT_ENCODER_NAMES = {1: "CLIP-L/14", 2: "CLIP-G/14", 3: "T5-XXL"}


def sd3_model_name() -> str:
    return os.environ.get(SD3_MODEL_ENV) or DEFAULT_SD3_MODEL


def torch_dtype(precision: str) -> torch.dtype:
    """torch dtype of a ``--precision`` / ``--storage-dtype`` value."""
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use float32, float16 or bfloat16") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_transformer(model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The SD3 MM-DiT (``transformer`` subfolder), in eval mode."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(
        model_name, subfolder="transformer", revision=revision, torch_dtype=dtype
    )
    return model.eval()


def load_vae(model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The SD3 VAE (``vae`` subfolder), in eval mode. Encoding is done in fp32: fp16 overflows in SD3's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(
        model_name, subfolder="vae", revision=revision, torch_dtype=dtype
    ).eval()


def load_scheduler(model_name: str, revision: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(
        model_name, subfolder="scheduler", revision=revision
    )


def load_text_encoder(
    encoder: int, model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """Text encoder 1, 2 (CLIP with projection) or 3 (T5 encoder) and its tokenizer, in eval mode."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    cls = T5EncoderModel if encoder == 3 else CLIPTextModelWithProjection
    model = cls.from_pretrained(
        model_name, subfolder=TEXT_ENCODER_SUBFOLDERS[encoder], revision=revision, torch_dtype=dtype
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(
        model_name, subfolder=TOKENIZER_SUBFOLDERS[encoder], revision=revision
    )
    return model, tokenizer


def load_pipeline_without_text_encoders(
    model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """A ``StableDiffusion3Pipeline`` with no text encoders or tokenizers: prompts come from the caches."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        model_name,
        revision=revision,
        torch_dtype=dtype,
        text_encoder=None,
        text_encoder_2=None,
        text_encoder_3=None,
        tokenizer=None,
        tokenizer_2=None,
        tokenizer_3=None,
    )
    return pipe
