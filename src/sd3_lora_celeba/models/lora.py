"""LoRA on the MM-DiT attention linears: targets, attach, save (diffusers format), load.

Layer names (``--lora-layers``) are relative to a transformer block:

- ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (image stream) and ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
  ``to_add_out`` (text stream) name the joint attention ``attn`` of every block (``attn.to_q`` is the same layer);
- ``attn2.to_q``, ``attn2.to_k``, ``attn2.to_v``, ``attn2.to_out.0`` name the second image self-attention of the
  SD3.5-medium MMDiT-X blocks (``dual_attention_layers``, blocks 0-12 there).

The default is every layer the model has: the joint-attention linears for SD3-medium and SD3.5-large, plus the
``attn2`` linears of the dual-attention blocks for SD3.5-medium (:func:`default_lora_layers`).

Saved checkpoints are plain diffusers LoRA folders (``pytorch_lora_weights.safetensors``) that stock
``StableDiffusion3Pipeline.load_lora_weights(folder)`` loads. The peft ``LoraConfig`` (rank, alpha, targets)
travels inside the safetensors metadata: without it a reloaded LoRA whose ``lora_alpha != r`` would be scaled
wrongly, since diffusers would have to guess alpha from the tensor shapes. ComfyUI reads alpha only from
``.alpha`` tensors, so for ComfyUI use ``sd3 export-lora`` (:mod:`sd3_lora_celeba.models.lora_export`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.errors import InputError

log = logging.getLogger(__name__)

# Joint attention of an MM-DiT block: image-stream and text-stream projections.
JOINT_ATTENTION_LINEARS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
# Second image self-attention of SD3.5's MMDiT-X (dual-attention) blocks; it has no text-stream projections.
DUAL_ATTENTION_LINEARS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
ADAPTER_NAME = "default"


def layer_path(layer: str) -> str:
    """Module path of a ``--lora-layers`` name inside a block: ``to_q`` -> ``attn.to_q``, ``attn2.to_q`` kept."""
    layer = layer.strip()
    return layer if layer.startswith(("attn.", "attn2.")) else f"attn.{layer}"


def dual_attention_blocks(transformer: torch.nn.Module) -> tuple[int, ...]:
    """Indices of the blocks with a second self-attention ``attn2`` (SD3.5-medium: 0-12; SD3: none)."""
    return tuple(
        i
        for i, block in enumerate(transformer.transformer_blocks)
        if getattr(block, "attn2", None) is not None
    )


def default_lora_layers(transformer: torch.nn.Module) -> tuple[str, ...]:
    """Every attention linear the model has: joint attention, plus ``attn2`` where dual-attention blocks exist."""
    if dual_attention_blocks(transformer):
        return JOINT_ATTENTION_LINEARS + DUAL_ATTENTION_LINEARS
    return JOINT_ATTENTION_LINEARS


def _span(indices: Sequence[int]) -> str:
    if not indices:
        return "none"
    if list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return ",".join(map(str, indices))


def lora_target_modules(
    transformer: torch.nn.Module, blocks: Sequence[int], layers: Sequence[str] | None = None
) -> list[str]:
    """Full module names (``transformer_blocks.{i}.attn.to_q``) of ``layers`` in each of ``blocks``.

    ``layers=None`` is :func:`default_lora_layers`. A layer absent from one block (the last SD3 block has no
    ``to_add_out``; ``attn2`` exists only in dual-attention blocks) is skipped for that block; a layer named
    explicitly that exists in none of the chosen blocks, or a block out of range, raises a one-line ValueError
    naming the flag, what the loaded model has, and the fix.
    """
    num_blocks = len(transformer.transformer_blocks)
    explicit = layers is not None
    layers = tuple(layers) if explicit else default_lora_layers(transformer)
    names = dict(transformer.named_modules())
    targets: list[str] = []
    for i in blocks:
        if not 0 <= i < num_blocks:
            raise ValueError(
                f"--lora-blocks: block {i} does not exist; the model has blocks 0..{num_blocks - 1}"
            )
        for layer in layers:
            name = f"transformer_blocks.{i}.{layer_path(layer)}"
            if name in names and isinstance(names[name], torch.nn.Linear):
                targets.append(name)
    if explicit:
        for layer in layers:
            _check_layer_found(transformer, layer, targets)
    return targets


def _check_layer_found(transformer: torch.nn.Module, layer: str, targets: Sequence[str]) -> None:
    path = layer_path(layer)
    if any(t.split(".", 2)[2] == path for t in targets):  # "transformer_blocks.{i}." + path
        return
    dual = dual_attention_blocks(transformer)
    if path.startswith("attn2."):
        if not dual:
            raise ValueError(
                f"--lora-layers: '{layer}': this model has no dual-attention (attn2) blocks (only SD3.5-medium "
                f"has them); drop the attn2.* layers"
            )
        if path.removeprefix("attn2.") in ("to_q", "to_k", "to_v", "to_out.0"):
            raise ValueError(
                f"--lora-layers: '{layer}': none of the chosen --lora-blocks has attn2; this model's "
                f"dual-attention blocks are {_span(dual)}"
            )
    choices = default_lora_layers(transformer)
    raise ValueError(
        f"--lora-layers: no linear layer '{layer}' in the chosen blocks; choose among {', '.join(choices)}"
    )


def lora_config(targets: Sequence[str], rank: int, alpha: float | None = None, init: str | bool = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=init,
        target_modules=list(targets),
    )


def add_lora(transformer, config) -> None:
    """Attach a LoRA adapter; base weights frozen, LoRA parameters trainable and fp32.

    Works on a base quantized with :func:`~sd3_lora_celeba.models.quantize.quantize_frozen_base` (peft wraps
    those linears in its torchao LoRA layer; training works, merging into int8 weights does not).
    """
    transformer.requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns that a torchao base cannot be merged; training never merges.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            p.data = p.data.float()


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """LoRA weights of ``transformer`` with peft key names (``...attn.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)


_warned_alpha: set[tuple[float, int]] = set()


def warn_if_alpha_differs(alpha: float, rank: int) -> None:
    """Once per process and (alpha, rank): say that ComfyUI would apply this diffusers file at the wrong strength.

    ComfyUI reads alpha only from ``.alpha`` tensors, which the diffusers format does not have, so it scales the
    weight change by 1 instead of ``alpha / rank``.
    """
    if float(alpha) == float(rank) or (alpha, rank) in _warned_alpha:
        return
    _warned_alpha.add((alpha, rank))
    log.warning(
        "--lora-alpha %g != --lora-rank %d: ComfyUI would apply this diffusers-format LoRA at %g times its "
        "trained strength; for ComfyUI run 'sd3 export-lora CHECKPOINT OUT.safetensors --format comfyui'",
        alpha,
        rank,
        rank / alpha,
    )


def save_lora(transformer, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a diffusers LoRA folder (weights + peft config in metadata + adapter_config.json), atomically.

    Warns (once) when alpha != rank, see :func:`warn_if_alpha_differs`.
    """
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.io import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state_dict(transformer).items()}
    peft_config = transformer.peft_config[ADAPTER_NAME]
    warn_if_alpha_differs(peft_config.lora_alpha, peft_config.r)
    metadata = peft_config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    with atomic_path(folder / layout.LORA_WEIGHTS) as tmp:
        tmp.unlink()
        StableDiffusion3Pipeline.save_lora_weights(
            tmp.parent,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
            weight_name=tmp.name,
            safe_serialization=True,
        )
    atomic_write_text(
        folder / layout.ADAPTER_CONFIG, json.dumps(_jsonable(metadata), indent=2, sort_keys=True)
    )


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def lora_weights_file(folder: Path) -> Path:
    """The LoRA weights file of a checkpoint folder, or an InputError saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: LoRA folder not found; pass a checkpoint folder written by 'sd3 fine-tune'"
        )
    path = folder / layout.LORA_WEIGHTS
    if not path.is_file():
        raise InputError(
            f"{folder}: no {layout.LORA_WEIGHTS} in this folder; pass a checkpoint-<step> folder of a fine-tune run"
        )
    return path


def load_lora_into_pipeline(pipe, folder: Path, adapter_name: str = ADAPTER_NAME, scale: float = 1.0) -> None:
    """Load a LoRA folder into a pipeline with stock diffusers; a LoRA of another model gives an InputError."""
    path = lora_weights_file(folder)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: LoRA does not fit this model ({first}); use a checkpoint trained on the same base model"
        ) from None
    if scale != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[scale])


def adapter_config_from_metadata(meta: dict[str, str]) -> dict | None:
    """The transformer's peft config from a diffusers LoRA file's safetensors metadata.

    diffusers >= 0.35 writes flat ``transformer.*`` keys under ``lora_adapter_metadata``; older versions wrote a
    nested ``transformer_lora_adapter_metadata``. None when the file carries no config.
    """
    if "lora_adapter_metadata" in meta:
        flat = json.loads(meta["lora_adapter_metadata"])
        config = {k.removeprefix("transformer."): v for k, v in flat.items() if k.startswith("transformer.")}
        return config or None
    if "transformer_lora_adapter_metadata" in meta:
        return json.loads(meta["transformer_lora_adapter_metadata"])
    return None


def lora_delta_norms(folder: Path) -> dict[int, float]:
    """Frobenius norm of the weight change ``scale * B @ A`` summed over each block's LoRA layers.

    Used to plot where a checkpoint changed the model. Keys are transformer block indices.
    """
    from safetensors import safe_open

    path = lora_weights_file(folder)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = adapter_config_from_metadata(meta) or {}
    rank_default = config.get("r")
    alpha_default = config.get("lora_alpha")
    sq: dict[int, float] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]
        alpha = alpha_default if alpha_default is not None else rank
        scale = alpha / (rank_default or rank)
        delta = scale * (b.float() @ a.float())
        block = int(key.split("transformer_blocks.")[1].split(".")[0])
        sq[block] = sq.get(block, 0.0) + float(delta.pow(2).sum())
    return {k: v**0.5 for k, v in sorted(sq.items())}
