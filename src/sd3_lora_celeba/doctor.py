"""``sd3 doctor``: library versions, the compute device, and whether each model can be reached."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from sd3_lora_celeba import __version__
from sd3_lora_celeba.config import check_bounds, option
from sd3_lora_celeba.models.loading import (
    BLIP2_MODEL_ENV,
    DEFAULT_BLIP2_MODEL,
    DEFAULT_LLAMA3_MODEL,
    DEFAULT_SD3_MODEL,
    LLAMA3_MODEL_ENV,
    SD3_MODEL_ENV,
)

LIBRARIES = (
    "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors",
    "pytorch-fid", "ncut-pytorch", "gradio", "huggingface-hub", "wandb",
)  # fmt: skip

# Files whose presence marks a loadable local model folder.
_MODEL_MARKERS = ("model_index.json", "config.json")


@dataclass
class DoctorConfig:
    model_name: str = option(DEFAULT_SD3_MODEL, "SD3 pipeline: hub id or local folder.", env=SD3_MODEL_ENV)
    blip2_model: str = option(
        DEFAULT_BLIP2_MODEL, "BLIP-2 model: hub id or local folder.", env=BLIP2_MODEL_ENV
    )
    llama3_model: str = option(
        DEFAULT_LLAMA3_MODEL, "Llama 3 model: hub id or local folder.", env=LLAMA3_MODEL_ENV
    )
    timeout: float = option(10.0, "Seconds to wait for the hub before calling a model unreachable.", min=0.1)

    def __post_init__(self) -> None:
        check_bounds(self)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "sd3-lora-celeba": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_report() -> list[str]:
    import torch

    lines = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(
                f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}"
            )
        lines.append(f"CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("mps (Apple GPU)")
    else:
        lines.append(f"cpu only ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    lines.append(cpu_linears_line())
    return lines


def cpu_linears_line() -> str:
    """Which kernel the float32 CPU linears take here (models/cpu_linear.py), and whether inference fuses the
    feed-forward's GELU into its up-projection."""
    from sd3_lora_celeba.config import cpu_linears_choice
    from sd3_lora_celeba.models.cpu_linear import gelu_fusion_chosen, onednn_chosen

    kind = "oneDNN" if onednn_chosen() else "BLAS"
    gelu = "fused into oneDNN" if gelu_fusion_chosen() else "stock"
    return f"float32 CPU linears: {kind}, inference GELU {gelu} (SD3_CPU_LINEARS={cpu_linears_choice()})"


def model_reachability(model: str, timeout: float) -> tuple[bool, str]:
    """(reachable, how): a local folder with a model marker, a cached hub snapshot, or the live hub."""
    path = Path(model).expanduser()
    if path.exists():
        if any((path / m).is_file() for m in _MODEL_MARKERS):
            return True, f"local folder {path}"
        return False, f"local folder {path} has no {' or '.join(_MODEL_MARKERS)}"
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, local_files_only=True, allow_patterns=list(_MODEL_MARKERS))
        cached = True
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        cached = False
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return cached, "in the local hub cache" if cached else "not cached, and HF_HUB_OFFLINE is set"
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=timeout)
        return True, "on the hub" + (" (also cached)" if cached else "")
    except Exception as exc:  # noqa: BLE001 - gated, missing, or no network: report the reason
        reason = type(exc).__name__
        if cached:
            return True, f"in the local hub cache (hub not reachable: {reason})"
        return False, f"hub not reachable ({reason}); log in with `hf auth login` or check the id"


def doctor(config: DoctorConfig) -> bool:
    """Print the report; return True when every model is reachable (exit code 1 otherwise)."""
    import click

    click.echo("Versions:")
    for name, version in library_versions().items():
        click.echo(f"  {name:16s} {version}")
    click.echo("Device:")
    for line in device_report():
        click.echo(f"  {line}")
    click.echo("Models:")
    all_ok = True
    for label, model in (
        ("SD3", config.model_name),
        ("BLIP-2", config.blip2_model),
        ("Llama 3", config.llama3_model),
    ):
        ok, how = model_reachability(model, config.timeout)
        all_ok &= ok
        click.echo(f"  {label:8s} {'ok ' if ok else 'NO '} {model}: {how}")
    if not all_ok:
        raise SystemExit(1)
    return all_ok
