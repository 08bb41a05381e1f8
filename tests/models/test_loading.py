"""The model-loading boundary: devices, dtypes, and every way a model can be missing as one line.

Hub failures are produced by the real huggingface_hub / transformers / diffusers code talking to a local fake
hub (an HTTP server answering each request with the status and ``X-Error-Code`` the real hub sends), or, for
the offline case, by the real code with an empty cache. Nothing leaves the machine.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import types
from pathlib import Path

import httpx
import pytest
import torch

from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models import loading
from sd3_lora_celeba.models.loading import load_pretrained, resolve_device, resolve_dtype

# --- devices and dtypes -------------------------------------------------------------------------------------


def test_resolve_dtype_auto_follows_the_device(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert resolve_dtype(name, "cuda") == dtype and resolve_dtype(name, "cpu") == dtype
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_dtype("fp8", "cpu")


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="--device gpu0: not a device name"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(None) == torch.device("cuda")
    with pytest.raises(InputError, match="--device cuda:3: only 1 CUDA device"):
        resolve_device("cuda:3")


def test_enable_tf32_is_harmless_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.backends.cuda.matmul.fp32_precision
    loading.enable_tf32()
    assert torch.backends.cuda.matmul.fp32_precision == before


# --- hub errors (the fake_hub fixture is in tests/conftest.py) ---------------------------------------------


def _loaders():
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    return {
        "vae": lambda name: loading.load_vae(name),
        "pipeline": lambda name: loading.load_pipeline_without_text_encoders(name),
        "text-encoder": lambda name: loading.load_text_encoder(1, name),
        "blip2": lambda name: load_pretrained(
            Blip2ForConditionalGeneration.from_pretrained, name, what="BLIP-2"
        ),
        "tokenizer": lambda name: load_pretrained(
            AutoTokenizer.from_pretrained, name, what="Llama 3 tokenizer"
        ),
    }


def _one_line(exc: pytest.ExceptionInfo, *needles: str) -> str:
    message = exc.value.format_message()
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("loader", ["vae", "pipeline", "text-encoder", "blip2", "tokenizer"])
@pytest.mark.parametrize(
    "status, code, needles",
    [
        (401, "GatedRepo", ("access denied", "accept its licence", "hf auth login", "--model-name DIR")),
        (403, "GatedRepo", ("access denied", "accept its licence", "hf auth login")),
        # The hub answers 401 for a private or gated repo when not logged in.
        (401, "RepoNotFound", ("access denied", "hf auth login")),
        (404, "RepoNotFound", ("not found on the hub", "check the id", "--model-name DIR")),
        (404, "RevisionNotFound", ("revision main not found", "--model-revision")),
    ],
)
def test_hub_errors_are_one_line(fake_hub, loader, status, code, needles):
    fake_hub(status, code)
    with pytest.raises(InputError) as exc:
        _loaders()[loader]("some-org/some-model")
    _one_line(exc, "some-org/some-model", *needles)


@pytest.mark.parametrize("loader", ["vae", "pipeline", "blip2", "tokenizer"])
def test_a_hub_repo_without_the_files_is_one_line(fake_hub, loader):
    fake_hub(404, "EntryNotFound")
    with pytest.raises(InputError) as exc:
        _loaders()[loader]("some-org/other-kind")
    _one_line(exc, "some-org/other-kind", "--model-name")


@pytest.mark.parametrize("loader", ["vae", "pipeline", "text-encoder", "blip2", "tokenizer"])
def test_offline_and_not_cached(monkeypatch, tmp_path, loader):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InputError) as exc:
        _loaders()[loader]("some-org/never-downloaded")
    _one_line(
        exc,
        "not in the local hub cache",
        "HF_HUB_OFFLINE",
        "hf download some-org/never-downloaded",
        "--model-name",
    )


def _raising(exc: BaseException):
    def loader(name, **kwargs):
        raise exc

    return loader


def _wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    """``outer`` raised ``from inner``, as transformers and diffusers re-raise hub errors."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def test_no_network_is_one_line(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    cases = [
        refused,
        _wrapped(refused, OSError("We couldn't connect to 'https://huggingface.co' to load the files")),
        _wrapped(LocalEntryNotFoundError("not cached"), OSError("Can't load the model for 'x/y'.")),
        ConnectionError("network unreachable"),
    ]
    for error in cases:
        with pytest.raises(InputError) as exc:
            load_pretrained(_raising(error), "x/y", what="SD3 pipeline")
        _one_line(exc, "SD3 pipeline x/y", "cannot be reached", "hf download x/y", "--model-name DIR")


def _closed_port_endpoint() -> str:
    """A hub endpoint on this machine where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _cache_repo(cache: Path, repo_id: str, folder: Path) -> None:
    """``folder`` stored as the hub client stores a downloaded repo (``refs/main`` naming a snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path) -> Path:
    """Online mode (HF_HUB_OFFLINE unset) with a hub that refuses connections; the client's retry back-off
    fails the test. Returns the (empty) hub cache folder."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = _closed_port_endpoint()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for variable in loading._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)

    def no_back_off(seconds: float) -> None:
        raise AssertionError(f"the hub client retried (back-off of {seconds} s)")

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=no_back_off, time=time.time))
    loading.hub_reachable.cache_clear()
    yield cache
    loading.hub_reachable.cache_clear()


def test_an_unreachable_hub_means_the_local_cache_at_once(unreachable_hub, tiny_sd3, caplog):
    """HF_HUB_OFFLINE unset and no network: a cached model loads at once (one probe, no retries, one warning)."""
    _cache_repo(unreachable_hub, "some-org/tiny-sd3", tiny_sd3)
    with caplog.at_level("WARNING", logger="sd3_lora_celeba.models.loading"):
        vae = loading.load_vae("some-org/tiny-sd3")
        pipe = loading.load_pipeline_without_text_encoders("some-org/tiny-sd3")
    assert vae.config.latent_channels == pipe.vae.config.latent_channels
    warnings = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1 and "HF_HUB_OFFLINE=1" in warnings[0]


def test_an_unreachable_hub_without_the_model_is_one_line(unreachable_hub):
    for load in _loaders().values():
        with pytest.raises(InputError) as exc:
            load("some-org/never-downloaded")
        _one_line(exc, "cannot be reached", "hf download some-org/never-downloaded")


def test_the_hub_probe(monkeypatch):
    """A refused connection is unreachable; behind a proxy the direct probe cannot tell: reachable."""
    for variable in loading._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    endpoint = _closed_port_endpoint()
    loading.hub_reachable.cache_clear()
    assert not loading.hub_reachable(endpoint)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert loading.hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    loading.hub_reachable.cache_clear()
    assert loading.hub_reachable(endpoint)
    loading.hub_reachable.cache_clear()


def test_a_name_that_is_no_folder_and_no_hub_id():
    for load in (loading.load_vae, loading.load_pipeline_without_text_encoders):
        with pytest.raises(InputError) as exc:
            load("not a model id")
        _one_line(exc, "not a model id", "neither a local folder nor a valid hub id", "--model-name")


def test_other_errors_pass_through():
    for error in (RuntimeError("a real bug"), OSError(28, "No space left on device"), MemoryError()):
        with pytest.raises(type(error)):
            load_pretrained(_raising(error), "x/y", what="SD3 pipeline")


# --- local folders ------------------------------------------------------------------------------------------


def test_local_folders_that_are_not_the_model(tiny_sd3, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    readme_only = tmp_path / "readme-only"
    readme_only.mkdir()
    (readme_only / "README.md").write_text("not a model")
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    wrong_class = tmp_path / "wrong-class"
    (wrong_class / "vae").mkdir(parents=True)
    (wrong_class / "vae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (wrong_class / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    no_weights = tmp_path / "no-weights"
    (no_weights / "vae").mkdir(parents=True)
    (no_weights / "vae" / "config.json").write_text((tiny_sd3 / "vae" / "config.json").read_text())
    cases = [
        (loading.load_vae, tmp_path / "missing", ("the folder does not exist", "--model-name")),
        (loading.load_pipeline_without_text_encoders, tmp_path / "missing", ("the folder does not exist",)),
        (loading.load_vae, a_file, ("is a file, not a model folder",)),
        (loading.load_vae, empty, ("the folder is empty", "hf download ID --local-dir DIR")),
        (loading.load_pipeline_without_text_encoders, empty, ("the folder is empty",)),
        (loading.load_vae, readme_only, ("has no vae/ subfolder", "not a diffusers SD3 pipeline folder")),
        (loading.load_pipeline_without_text_encoders, readme_only, ("model_index.json is missing",)),
        # A transformers model folder (the CLIP text encoder) given as the SD3 pipeline.
        (
            loading.load_pipeline_without_text_encoders,
            tiny_sd3 / "text_encoder",
            ("model_index.json is missing",),
        ),
        (loading.load_transformer, tiny_sd3 / "text_encoder", ("has no transformer/ subfolder",)),
        (loading.load_vae, wrong_class, ("describes UNet2DConditionModel, not AutoencoderKL",)),
        (
            loading.load_pipeline_without_text_encoders,
            wrong_class,
            ("describes StableDiffusionXLPipeline, not StableDiffusion3Pipeline",),
        ),
        (loading.load_vae, no_weights, ("no file named", "--model-name")),
    ]
    for load, folder, needles in cases:
        with pytest.raises(InputError) as exc:
            load(str(folder))
        _one_line(exc, str(folder), *needles)


def test_a_folder_without_a_tokenizer(tiny_sd3):
    from transformers import AutoTokenizer

    with pytest.raises(InputError) as exc:
        load_pretrained(AutoTokenizer.from_pretrained, tiny_sd3, what="Llama 3 tokenizer")
    _one_line(exc, str(tiny_sd3), "has no tokenizer files")
    assert (
        load_pretrained(AutoTokenizer.from_pretrained, tiny_sd3, what="CLIP", subfolder="tokenizer")
        is not None
    )


def test_a_transformers_folder_of_another_model_type(tiny_sd3, tmp_path):
    from transformers import T5EncoderModel

    with pytest.raises(InputError) as exc:
        load_pretrained(T5EncoderModel.from_pretrained, tiny_sd3, what="T5", subfolder="text_encoder")
    _one_line(exc, "describes clip_text_model, not t5")


def test_the_tiny_model_loads_without_deprecation_warnings(tiny_sd3, recwarn):
    vae = loading.load_vae(str(tiny_sd3), dtype=torch.float16)
    encoder, tokenizer = loading.load_text_encoder(2, str(tiny_sd3), dtype=torch.bfloat16)
    assert vae.dtype == torch.float16 and not vae.training
    assert encoder.dtype == torch.bfloat16 and not encoder.training and tokenizer is not None
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]


@pytest.mark.gpu
def test_on_a_real_gpu():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", resolve_device(None)) == expected
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    loading.enable_tf32()
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
