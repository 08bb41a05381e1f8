"""Loading models: the one place where model ids, subfolders, devices and dtypes are decided.

Every model is loaded the standard way, ``from_pretrained`` on a hub id or a local folder, and every such call
goes through :func:`load_pretrained`, which turns the many ways a model can be missing (not downloaded while
offline, no network, gated, not found, a folder of another model type) into one line naming the model and the
fix. The defaults can be redirected with environment variables (used by ``sd3 demo`` and the tests to point at
the tiny offline world):

=======================  ===================================================  ==========================
what                     default                                              environment variable
=======================  ===================================================  ==========================
SD3 pipeline (diffusers)  ``stabilityai/stable-diffusion-3-medium-diffusers``  ``SD3_MODEL_NAME``
BLIP-2 captioner          ``Salesforce/blip2-flan-t5-xl-coco``                 ``SD3_BLIP2_MODEL_NAME``
Llama 3 chat model        ``meta-llama/Llama-3.1-8B-Instruct``                 ``SD3_LLAMA3_MODEL_NAME``
=======================  ===================================================  ==========================

Text encoders follow the diffusers subfolders: 1 = ``text_encoder`` (CLIP-L/14), 2 = ``text_encoder_2``
(CLIP-G/14), 3 = ``text_encoder_3`` (T5-XXL).

Precision: every command's ``--precision`` is a :data:`Precision`; ``auto`` is resolved by
:func:`resolve_dtype` (bfloat16 on CUDA, float16 where the GPU has no bfloat16, float32 on CPU).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from sd3_lora_celeba.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_SD3_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
DEFAULT_BLIP2_MODEL = "Salesforce/blip2-flan-t5-xl-coco"
DEFAULT_LLAMA3_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
SD3_MODEL_ENV = "SD3_MODEL_NAME"
BLIP2_MODEL_ENV = "SD3_BLIP2_MODEL_NAME"
LLAMA3_MODEL_ENV = "SD3_LLAMA3_MODEL_NAME"

# A compute precision (``--precision``); "auto" is decided per device by resolve_dtype.
Precision = Literal["auto", "float32", "float16", "bfloat16"]
# A storage dtype (cached embeddings, exported weights): always explicit.
StorageDtype = Literal["float32", "float16", "bfloat16"]

# SD3 pads / truncates both CLIP prompts to 77 tokens; they fill the first 77 text positions, T5 the rest.
CLIP_MAX_LENGTH = 77
TEXT_ENCODER_SUBFOLDERS = {1: "text_encoder", 2: "text_encoder_2", 3: "text_encoder_3"}
TOKENIZER_SUBFOLDERS = {1: "tokenizer", 2: "tokenizer_2", 3: "tokenizer_3"}
TEXT_ENCODER_ALIASES = {"1": 1, "2": 2, "3": 3, "clip-l": 1, "clip-g": 2, "t5": 3}
TEXT_ENCODER_NAMES = {1: "CLIP-L/14", 2: "CLIP-G/14", 3: "T5-XXL"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(precision: str) -> torch.dtype:
    """torch dtype of an explicit dtype name (``--storage-dtype``, or a resolved ``--precision``)."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use float32, float16 or bfloat16") from None


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype of a ``--precision`` value on ``device``: ``auto`` = bfloat16 on CUDA (float16 where bfloat16
    is not supported), float32 elsewhere; the other values map directly."""
    if precision != "auto":
        return torch_dtype(precision)
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """The compute device of a ``--device`` value: None / ``auto`` = CUDA when available, else CPU."""
    if requested is None or str(requested) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {requested}: not a device name; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {requested}: CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s); pick cuda:0.."
                f"{torch.cuda.device_count() - 1}"
            )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise InputError(f"--device {requested}: MPS is not available here; use --device cpu or auto")
    return device


def enable_tf32() -> None:
    """Allow TF32 tensor cores for float32 matmuls and convolutions (no effect without CUDA)."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


# ----------------------------------------------------------------------------------------------------------
# The model-loading boundary


def _looks_local(model_name: str) -> bool:
    """True for a path (hub ids are ``name`` or ``owner/name``)."""
    return (
        Path(model_name).expanduser().exists()
        or model_name.startswith(("/", ".", "~"))
        or "\\" in model_name
        or model_name.count("/") > 1
    )


def _owner_class(loader: Callable[..., Any]) -> type | None:
    owner = getattr(loader, "__self__", None)
    return owner if isinstance(owner, type) else None


def _expected_config(cls: type | None) -> tuple[str | None, str | None, str | None]:
    """(config file, expected diffusers ``_class_name``, expected transformers ``model_type``) of a class."""
    if cls is None:
        return None, None, None
    config_name = getattr(cls, "config_name", None)
    if isinstance(config_name, str):  # a diffusers model, scheduler or pipeline
        generic = cls.__name__ in ("DiffusionPipeline", "ModelMixin")
        return config_name, None if generic else cls.__name__, None
    config_class = getattr(cls, "config_class", None)
    if config_class is not None and hasattr(cls, "from_pretrained"):  # a transformers model
        return "config.json", None, getattr(config_class, "model_type", None) or None
    return None, None, None


# Any of these marks a folder that a tokenizer or processor can be loaded from.
_TOKENIZER_MARKERS = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def _check_local_folder(loader: Callable[..., Any], model_name: str, what: str, flag: str, subfolder: Any):
    """Fail with one line when a local model folder is missing, empty or holds another kind of model."""
    path = Path(model_name).expanduser()
    if not path.exists():
        raise InputError(
            f"{what} {model_name}: the folder does not exist; check {flag}, or give a hub id such as "
            f"{DEFAULT_SD3_MODEL if 'SD3' in what else 'owner/name'}"
        )
    if not path.is_dir():
        raise InputError(f"{what} {model_name}: is a file, not a model folder; check {flag}")
    if not any(path.iterdir()):
        raise InputError(
            f"{what} {model_name}: the folder is empty; check {flag}, or download the model into it "
            "(`hf download ID --local-dir DIR`)"
        )
    folder = path / subfolder if subfolder else path
    kind = f"the {subfolder}/ subfolder of a diffusers pipeline" if subfolder else "a model folder"
    if not subfolder and "pipeline" in what.lower():
        kind = "a diffusers pipeline folder"
    if not folder.is_dir():
        raise InputError(
            f"{what} {model_name}: has no {subfolder}/ subfolder, so it is not a diffusers SD3 pipeline folder; "
            f"check {flag} (it must hold model_index.json and the pipeline subfolders)"
        )
    cls = _owner_class(loader)
    if cls is not None and ("Tokenizer" in cls.__name__ or "Processor" in cls.__name__):
        if not any((folder / marker).is_file() for marker in _TOKENIZER_MARKERS):
            where = f"{subfolder}/" if subfolder else "the folder"
            raise InputError(
                f"{what} {model_name}: {where} has no tokenizer files (tokenizer_config.json, tokenizer.json), "
                f"so it is not {kind} with a tokenizer; check {flag}"
            )
        return
    config_file, class_name, model_type = _expected_config(cls)
    if config_file is None:
        return
    config_path = folder / config_file
    if not config_path.is_file():
        raise InputError(
            f"{what} {model_name}: {config_path.relative_to(path)} is missing, so it is not {kind}; check {flag} "
            "or download the model again"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{config_path}: cannot read ({exc}); download the model again") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: not a model config; download the model again")
    found = config.get("_class_name") if class_name else config.get("model_type")
    expected = class_name or model_type
    if expected and found != expected:
        raise InputError(
            f"{what} {model_name}: {config_path.relative_to(path)} describes "
            f"{found or 'another kind of model'}, not {expected}; check {flag}"
        )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub ``endpoint`` opens within a few seconds (asked once per process).

    Without a network the hub client retries every request with back-off (about 25 s each) before it falls back
    to the local cache; one probe here replaces that, and warns once. Behind a proxy the direct probe says
    nothing: reachable."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return True
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        log.warning(
            "%s cannot be reached: models load from the local hub cache only (set HF_HUB_OFFLINE=1 to skip "
            "this check)",
            endpoint,
        )
        return False


def _hub_unreachable() -> bool:
    """True when the hub is to be used (HF_HUB_OFFLINE unset) but cannot be reached."""
    if _offline():
        return False
    from huggingface_hub import constants

    return not hub_reachable(constants.ENDPOINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_error_message(
    exc: BaseException, model_name: str, what: str, flag: str, revision: Any
) -> str | None:
    """The one-line message for a failed load, or None when the error is not about finding the model."""
    from huggingface_hub import errors as hub

    chain = _chain(exc)
    target = f"{what} {model_name}"
    download = f"`hf download {model_name}`"
    local = f"or pass {flag} DIR (a local copy)"

    def has(*types: type) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    http = has(hub.HfHubHTTPError)
    status = getattr(getattr(http, "response", None), "status_code", None)
    if has(hub.GatedRepoError) or status in (401, 403):
        return (
            f"{target}: access denied (a gated or private model); accept its licence at "
            f"https://huggingface.co/{model_name}, then log in with `hf auth login` {local}"
        )
    if has(hub.HFValidationError):
        return f"{target}: neither a local folder nor a valid hub id (owner/name); check {flag}"
    if has(hub.RevisionNotFoundError):
        return f"{target}: revision {revision or 'main'} not found on the hub; check --model-revision"
    if has(hub.RepositoryNotFoundError) or (status == 404 and not has(hub.EntryNotFoundError)):
        return f"{target}: not a local folder and not found on the hub; check the id {local}"
    if has(hub.OfflineModeIsEnabled) or (_offline() and has(hub.LocalEntryNotFoundError)):
        return (
            f"{target}: not in the local hub cache and HF_HUB_OFFLINE is set; download it with {download} "
            f"(with HF_HUB_OFFLINE unset) {local}"
        )
    if has(hub.LocalEntryNotFoundError, ConnectionError, TimeoutError) or _is_transport_error(chain):
        return (
            f"{target}: the hub cannot be reached and the model is not in the local cache; check the network, "
            f"or download it with {download} where there is one, {local}"
        )
    missing = has(hub.EntryNotFoundError)
    if missing is not None:
        url = str(getattr(getattr(missing, "response", None), "url", "") or "")
        name = (
            url.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in url else "file the loader needs"
        )
        return f"{target}: the hub copy has no {name}, so it is not a model for {what}; check the id {local}"
    # transformers and diffusers re-raise hub failures as plain OSErrors with a sentence; recognise those.
    plain = next(
        (e for e in chain if (type(e) is OSError and e.errno is None) or type(e) is ValueError), None
    )
    if plain is not None and _is_loading_sentence(str(plain)):
        if _looks_local(model_name):
            return (
                f"{target}: cannot be loaded ({_first_line(plain)}); check {flag}: the folder must hold a "
                "complete copy of the model"
            )
        return (
            f"{target}: cannot be loaded ({_first_line(plain)}); check {flag}, or download it with {download}"
        )
    return None


def _is_transport_error(chain: list[BaseException]) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        return False
    return any(isinstance(e, httpx.TransportError) for e in chain)


_LOADING_SENTENCES = (
    "does not appear to have a file named",
    "no file named",
    "can't load",
    "couldn't connect",
    "is not a local folder",
    "is not a valid model identifier",
    "couldn't find",
    "not a valid git identifier",
    "couldn't instantiate the backend tokenizer",
)


def _is_loading_sentence(text: str) -> bool:
    lowered = text.lower()
    return any(s in lowered for s in _LOADING_SENTENCES)


def _follow_hub_progress_setting() -> None:
    """transformers follows ``HF_HUB_DISABLE_PROGRESS_BARS`` (``sd3 --quiet``, ``--logging-style plain``);
    diffusers' loading bars do not: mirror the hub's setting there."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled() and "diffusers.utils.logging" in sys.modules:
        sys.modules["diffusers.utils.logging"].disable_progress_bar()


def load_pretrained(
    loader: Callable[..., Any],
    model_name: str | os.PathLike,
    *,
    what: str,
    flag: str = "--model-name",
    **kwargs,
) -> Any:
    """``loader(model_name, **kwargs)`` (e.g. ``SD3Transformer2DModel.from_pretrained``), with every way the
    model can be missing turned into a one-line :class:`InputError` naming ``what``, the model and the fix.

    ``flag`` is the command-line option that chooses the model (named in the fix). Other errors (a real bug,
    out of memory, a full disk) pass through unchanged."""
    model_name = str(model_name)
    _follow_hub_progress_setting()
    if _looks_local(model_name):
        _check_local_folder(loader, model_name, what, flag, kwargs.get("subfolder"))
    elif not kwargs.get("local_files_only") and _hub_unreachable():
        kwargs["local_files_only"] = True  # the cached copy at once, not after the client's retries
    try:
        return loader(model_name, **kwargs)
    except InputError:
        raise
    except Exception as exc:
        message = _hub_error_message(exc, model_name, what, flag, kwargs.get("revision"))
        if message is None:
            raise
        raise InputError(message) from None


# ----------------------------------------------------------------------------------------------------------
# SD3 parts


def load_transformer(model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The SD3 MM-DiT (``transformer`` subfolder), in eval mode."""
    from diffusers import SD3Transformer2DModel

    model = load_pretrained(
        SD3Transformer2DModel.from_pretrained,
        model_name,
        what="SD3 transformer",
        subfolder="transformer",
        revision=revision,
        dtype=dtype,
    )
    return model.eval()


def load_vae(model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """The SD3 VAE (``vae`` subfolder), in eval mode. Encoding is done in fp32: fp16 overflows in SD3's VAE."""
    from diffusers import AutoencoderKL

    model = load_pretrained(
        AutoencoderKL.from_pretrained,
        model_name,
        what="SD3 VAE",
        subfolder="vae",
        revision=revision,
        dtype=dtype,
    )
    return model.eval()


def load_scheduler(model_name: str, revision: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return load_pretrained(
        FlowMatchEulerDiscreteScheduler.from_pretrained,
        model_name,
        what="SD3 scheduler",
        subfolder="scheduler",
        revision=revision,
    )


def load_text_encoder(
    encoder: int, model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """Text encoder 1, 2 (CLIP with projection) or 3 (T5 encoder) and its tokenizer, in eval mode."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    cls = T5EncoderModel if encoder == 3 else CLIPTextModelWithProjection
    what = f"SD3 text encoder {encoder} ({TEXT_ENCODER_NAMES[encoder]})"
    model = load_pretrained(
        cls.from_pretrained,
        model_name,
        what=what,
        subfolder=TEXT_ENCODER_SUBFOLDERS[encoder],
        revision=revision,
        dtype=dtype,
    ).eval()
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained,
        model_name,
        what=f"SD3 tokenizer {encoder}",
        subfolder=TOKENIZER_SUBFOLDERS[encoder],
        revision=revision,
    )
    return model, tokenizer


def load_pipeline_without_text_encoders(
    model_name: str, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    """A ``StableDiffusion3Pipeline`` with no text encoders or tokenizers: prompts come from the caches."""
    from diffusers import StableDiffusion3Pipeline

    return load_pretrained(
        StableDiffusion3Pipeline.from_pretrained,
        model_name,
        what="SD3 pipeline",
        revision=revision,
        dtype=dtype,
        text_encoder=None,
        text_encoder_2=None,
        text_encoder_3=None,
        tokenizer=None,
        tokenizer_2=None,
        tokenizer_3=None,
    )
