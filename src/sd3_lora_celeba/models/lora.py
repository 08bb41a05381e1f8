"""LoRA on SD3's joint-attention linears: targets, attach, save (diffusers format), load.

Saved checkpoints are plain diffusers LoRA folders (``pytorch_lora_weights.safetensors``) that stock
``StableDiffusion3Pipeline.load_lora_weights(folder)`` loads. The peft ``LoraConfig`` (rank, alpha, targets)
travels inside the safetensors metadata: without it a reloaded LoRA whose ``lora_alpha != r`` would be scaled
wrongly, since diffusers would have to guess alpha from the tensor shapes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.errors import InputError

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
ADAPTER_NAME = "default"


def lora_target_modules(
    transformer: torch.nn.Module, blocks: Sequence[int], layers: Sequence[str] = JOINT_ATTENTION_LINEARS
) -> list[str]:
    """Full module names of ``layers`` inside ``transformer_blocks.{i}.attn`` for each block ``i``.

    Raises ValueError naming the bad block index or layer; layers absent from a block (the last SD3 block has no
    ``to_add_out``) are skipped for that block only.
    """
    num_blocks = len(transformer.transformer_blocks)
    names = dict(transformer.named_modules())
    targets: list[str] = []
    for i in blocks:
        if not 0 <= i < num_blocks:
            raise ValueError(
                f"--lora-blocks: block {i} does not exist; the model has blocks 0..{num_blocks - 1}"
            )
        for layer in layers:
            name = f"transformer_blocks.{i}.attn.{layer}"
            if name in names and isinstance(names[name], torch.nn.Linear):
                targets.append(name)
    for layer in layers:
        if not any(t.endswith(f".attn.{layer}") for t in targets):
            raise ValueError(
                f"--lora-layers: no linear layer '{layer}' in the chosen blocks; "
                f"choose among {', '.join(JOINT_ATTENTION_LINEARS)}"
            )
    return targets


def lora_config(targets: Sequence[str], rank: int, alpha: float | None = None, init: str | bool = "gaussian"):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=init,
        target_modules=list(targets),
    )


def add_lora(transformer, config) -> None:
    """Attach a LoRA adapter; base weights frozen, LoRA parameters trainable and fp32."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            p.data = p.data.float()


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """LoRA weights of ``transformer`` with peft key names (``...attn.to_q.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)


def save_lora(transformer, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a diffusers LoRA folder (weights + peft config in metadata + adapter_config.json), atomically."""
    from diffusers import StableDiffusion3Pipeline

    from sd3_lora_celeba.io import atomic_path, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state_dict(transformer).items()}
    peft_config = transformer.peft_config[ADAPTER_NAME]
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
