"""Optional int8 storage of the frozen transformer (``sd3 fine-tune --quantize-base``), with torchao.

torchao's int8 weight-only quantization stores each frozen ``nn.Linear`` weight as int8 with one scale per
output row and dequantizes it inside the matmul; activations, biases, norms and embeddings keep their dtype. The
linears hold nearly all of the MM-DiT's weights, so the frozen base shrinks to about half of its bf16 size (a
quarter of fp32). It runs on CPU and CUDA alike. The LoRA layers are never quantized: call
:func:`quantize_frozen_base` on the loaded transformer *before* :func:`~sd3_lora_celeba.models.lora.add_lora`;
peft then wraps the quantized linears in its torchao LoRA layer and the LoRA weights stay fp32 and trainable.

Install with ``pip install "sd3-lora-celeba[quant]"`` (the tests run with torchao 0.18; 0.17 also works).
"""

from __future__ import annotations

import torch

from sd3_lora_celeba.errors import InputError


def _is_lora_module(fqn: str) -> bool:
    return any(part.startswith("lora_") for part in fqn.split("."))


def quantize_frozen_base(transformer: torch.nn.Module) -> int:
    """Store the weights of every non-LoRA ``nn.Linear`` of ``transformer`` as int8, in place.

    Returns the number of linears quantized. Raises InputError when torchao is not installed, and ValueError when
    a LoRA adapter is already attached (quantize first, then add the LoRA).
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ModuleNotFoundError:
        raise InputError(
            "--quantize-base needs torchao; install it with: pip install 'sd3-lora-celeba[quant]'"
        ) from None
    names = [n for n, _ in transformer.named_modules()]
    if any(_is_lora_module(n) for n in names):
        raise ValueError(
            "quantize_frozen_base: a LoRA adapter is attached; quantize the base before add_lora"
        )
    quantized: list[str] = []

    def frozen_linear(module: torch.nn.Module, fqn: str) -> bool:
        keep = isinstance(module, torch.nn.Linear) and not _is_lora_module(fqn)
        if keep:
            quantized.append(fqn)
        return keep

    quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=frozen_linear)
    transformer.requires_grad_(False)
    return len(quantized)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, counting the int8 data and scales of quantized weights."""

    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: sum its inner tensors
            inner, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, name)) for name in inner)
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(nbytes(t) for t in tensors.values())
