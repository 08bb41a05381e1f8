"""``sd3 export-lora``: write a diffusers-format LoRA checkpoint in the ComfyUI / kohya key layout.

ComfyUI names SD3 LoRA weights after the original MM-DiT state dict (``comfy/lora.py``: ``lora_unet_`` + the
``diffusion_model.`` key with dots as underscores; ``comfy/utils.py`` maps the diffusers names onto it, SD3.5's
``attn2`` included). diffusers splits MM-DiT's fused projections, so::

    diffusers (transformer_blocks.{i}.)                MM-DiT / ComfyUI (lora_unet_joint_blocks_{i}_)
    attn.to_q, attn.to_k, attn.to_v                 -> x_block_attn_qkv          (fused, rows q|k|v)
    attn.to_out.0                                   -> x_block_attn_proj
    attn.add_q_proj, attn.add_k_proj, attn.add_v_proj -> context_block_attn_qkv  (fused)
    attn.to_add_out                                 -> context_block_attn_proj
    attn2.to_q, attn2.to_k, attn2.to_v              -> x_block_attn2_qkv         (SD3.5 MMDiT-X blocks; fused)
    attn2.to_out.0                                  -> x_block_attn2_proj

Each module gets ``.lora_down.weight`` (A), ``.lora_up.weight`` (B) and ``.alpha``; ComfyUI applies
``up @ down * alpha / rank`` with ``rank = lora_down.shape[0]``. A fused qkv LoRA is exact: ``down`` stacks the
three A matrices (3r rows), ``up`` is block-diagonal in the three B matrices, and alpha becomes ``3 * alpha`` so the
scale stays ``alpha / r``. A projection absent from the adapter contributes zero blocks. The tensors are written
in float16 by default (``--dtype float32`` keeps full precision; the ``.alpha`` scalars stay float32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.models.loading import StorageDtype
from sd3_lora_celeba.models.lora import adapter_config_from_metadata, lora_weights_file

log = logging.getLogger(__name__)

# MM-DiT module -> the diffusers linears it fuses, in row order.
FUSED = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block_attn_proj": ("attn.to_out.0",),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block_attn_proj": ("attn.to_add_out",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block_attn2_proj": ("attn2.to_out.0",),
}
PREFIX = "lora_unet_joint_blocks_"


@dataclass
class ExportLoraConfig:
    """Options of ``sd3 export-lora``."""

    checkpoint_dir: Path = argument("A checkpoint-<step> folder written by 'sd3 fine-tune'.")
    output: Path = argument("Output .safetensors file.")
    format: Literal["comfyui"] = option(
        "comfyui", "Key layout: comfyui (kohya-style MM-DiT names, fused qkv)."
    )
    dtype: StorageDtype = option(
        "float16", "dtype of the written LoRA tensors (half by default; float32 keeps full precision)."
    )
    overwrite: bool = option(False, "Replace an existing output file.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if Path(self.output).suffix != ".safetensors":
            raise ValueError(f"OUTPUT {self.output}: must end in .safetensors")


def read_diffusers_lora(folder: Path) -> tuple[dict[str, torch.Tensor], float, int]:
    """(peft-named LoRA tensors without the ``transformer.`` prefix, alpha, rank) of a checkpoint folder."""
    from safetensors import safe_open

    path = lora_weights_file(folder)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    config = adapter_config_from_metadata(meta)
    if config is None:
        raise InputError(
            f"{path}: no LoRA config in the file metadata; pass a checkpoint written by 'sd3 fine-tune'"
        )
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InputError(f"{path}: per-layer ranks or alphas cannot be exported; export a uniform-rank LoRA")
    return tensors, float(config["lora_alpha"]), int(config["r"])


def to_comfyui(tensors: dict[str, torch.Tensor], alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors -> ComfyUI/kohya key layout (see the module docstring)."""
    blocks = sorted({int(k.split("transformer_blocks.")[1].split(".")[0]) for k in tensors})
    out: dict[str, torch.Tensor] = {}
    for i in blocks:
        for module, parts in FUSED.items():
            keys = [f"transformer_blocks.{i}.{p}" for p in parts]
            present = [k for k in keys if f"{k}.lora_A.weight" in tensors]
            if not present:
                continue
            ref_a = tensors[f"{present[0]}.lora_A.weight"]  # (r, in)
            downs, ups = [], []
            for k in keys:
                if k in present:
                    downs.append(tensors[f"{k}.lora_A.weight"].float())  # (r, in)
                    ups.append(tensors[f"{k}.lora_B.weight"].float())  # (out, r)
                else:  # a projection without LoRA: zero blocks keep the fused layout
                    downs.append(torch.zeros_like(ref_a, dtype=torch.float32))
                    ups.append(torch.zeros(tensors[f"{present[0]}.lora_B.weight"].shape, dtype=torch.float32))
            name = f"{PREFIX}{i}_{module}"
            out[f"{name}.lora_down.weight"] = torch.cat(downs, 0)  # (n r, in)
            out[f"{name}.lora_up.weight"] = torch.block_diag(*ups)  # (n out, n r)
            out[f"{name}.alpha"] = torch.tensor(alpha * len(parts), dtype=torch.float32)
    return out


def from_comfyui(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """Inverse of :func:`to_comfyui`: (peft-named tensors, alpha). Zero blocks (absent projections) are dropped."""
    out: dict[str, torch.Tensor] = {}
    alphas = set()
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        block, module = name[len(PREFIX) :].split("_", 1)
        parts = FUSED[module]
        down, up = state[key], state[f"{name}.lora_up.weight"]
        rank = down.shape[0] // len(parts)
        out_dim = up.shape[0] // len(parts)
        alphas.add(round(float(state[f"{name}.alpha"]) / len(parts), 6))
        for j, part in enumerate(parts):
            a = down[j * rank : (j + 1) * rank]
            b = up[j * out_dim : (j + 1) * out_dim, j * rank : (j + 1) * rank]
            if not a.any() and not b.any():
                continue
            out[f"transformer_blocks.{block}.{part}.lora_A.weight"] = a.clone()
            out[f"transformer_blocks.{block}.{part}.lora_B.weight"] = b.clone()
    if len(alphas) != 1:
        raise ValueError(f"expected one alpha per rank across modules, found {sorted(alphas)}")
    return out, alphas.pop()


def export_lora(config: ExportLoraConfig) -> Path:
    """Write ``config.output`` in the requested key layout; returns its path."""
    from sd3_lora_celeba.io import atomic_save_safetensors
    from sd3_lora_celeba.models.loading import torch_dtype

    output = Path(config.output)
    if output.exists() and not config.overwrite:
        raise InputError(f"{output}: already exists; pass --overwrite or another OUTPUT")
    tensors, alpha, rank = read_diffusers_lora(config.checkpoint_dir)
    state = to_comfyui(tensors, alpha, rank)
    dtype = torch_dtype(config.dtype)
    state = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in state.items()}
    metadata = {
        "format": "pt",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "source": "sd3-lora-celeba",
    }
    atomic_save_safetensors(output, state, metadata=metadata)
    log.info("wrote %s (%d modules, rank %d, alpha %g)", output, len(state) // 3, rank, alpha)
    return output
