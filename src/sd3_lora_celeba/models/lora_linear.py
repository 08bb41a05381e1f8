"""peft's LoRA linears of a CPU training run as one autograd function: the same maths, fewer passes.

:func:`use_lora_linear_function` gives peft's LoRA linears the class :class:`LoraLinear`, whose forward is one
autograd function for ``x W^T + b + s (x A^T) B^T`` (frozen ``W``, ``b``; trainable ``A``, ``B``; scale ``s``).
peft computes the LoRA term as four operations (two products, a scale, an add), and autograd adds the input's
two gradients in one more. Here the LoRA product is added into the base product's output in place (one
``addmm``), the scale is applied to the rank-wide tensors only, and the input's gradient is summed in one
buffer, so the separate passes over layer-wide tensors (scale and add in the forward, scale and gradient sum in
the backward) are gone. Same products and same parameters; one mid-size image-stream projection (1024 tokens,
width 384, rank 64, oneDNN, forward and backward) measured 13.7 against 17.3 ms (median of 30, interleaved).
Where a call has enough rows (:func:`merges_lora`), the function forms ``W + s B A`` for it instead, which
replaces the two rank-wide products into the output and into the input's gradient with one ``out x r x in``
product: the same maths, rounded differently (relative 1e-6). On the 2-core AMD EPYC of 2026-12-04 (two
threads) the mid-size fine-tune step (blocks 4-22, rank 64, 1024 image and 333 text rows per call) took 3.09
against 3.13 s wall, 6.16 against 6.24 s CPU time (medians of 16, interleaved). The formed weight is kept for
the backward (``out x in`` floats per call: 9 MiB at SD3-medium's width, for the blocks whose activations are
kept at once: one block with gradient checkpointing).
The base products take the kernel of the base layer (:mod:`~sd3_lora_celeba.models.cpu_linear`). Anything
peft's forward does beyond one plain adapter (dropout, DoRA and other variants, several adapters, a merged or
disabled adapter, autocast, other dtypes, a trainable base, ``torch.compile``) takes peft's forward unchanged.

It lives apart from :mod:`~sd3_lora_celeba.models.cpu_linear` because it needs peft, which commands that only
ask which kernel the CPU takes (``sd3 doctor``) should not import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from sd3_lora_celeba.models.cpu_linear import OneDnnLinear, onednn_linear, plain_float32, takes_onednn_path


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x``, by oneDNN or by the BLAS."""
    return onednn_linear(x, weight, bias) if onednn else F.linear(x, weight, bias)


def merges_lora(rows: int, out_features: int, in_features: int, input_grad: bool) -> bool:
    """Whether a LoRA linear of ``rows`` input rows costs fewer FLOPs with ``W + s B A`` formed for the call.

    Forming it costs one ``out x r x in`` product; it saves the rank-wide product into the output
    (``rows x r x out``) and, when the input gets a gradient, the one into that gradient (``rows x r x in``).
    """
    saved = rows * out_features + (rows * in_features if input_grad else 0)
    return saved > out_features * in_features


class _LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling (x A^T) B^T`` with ``W`` and ``b`` frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, onednn: bool):
        rows = x.view(-1, x.shape[-1])  # (N, in)
        h = _product(rows, lora_a, None, onednn)  # (N, r)
        merged = merges_lora(rows.shape[0], *weight.shape, ctx.needs_input_grad[0])
        ctx.scaling, ctx.onednn, ctx.merged = scaling, onednn, merged
        if merged:  # W + s B A: one product of the input, and one of the input's gradient
            weight = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
        out = _product(rows, weight, bias, onednn)  # (N, out), a fresh tensor
        if not merged:
            out.addmm_(h, lora_b.t(), alpha=scaling)  # the LoRA product added in place
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, h, weight, lora_a, lora_b = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (N, out)
        grad_h = torch.mm(grad_rows, lora_b).mul_(ctx.scaling)  # (N, r): the scale on the narrow side
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad_rows, weight.t(), None, ctx.onednn)  # both paths at once if W + s B A
            if not ctx.merged:
                grad_x.addmm_(grad_h, lora_a)  # both paths' gradients in one buffer
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_h.t(), rows)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(grad_rows.t(), h).mul_(ctx.scaling)
        return grad_x, None, None, grad_a, grad_b, None, None


class LoraLinear(PeftLoraLinear):
    """peft's LoRA linear whose plain float32 CPU case runs as one autograd function (see the module docstring)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = None if args or kwargs else self._plain_adapter(x)
        if plain is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b, scaling = plain
        base = self.base_layer
        return _LoraLinearFunction.apply(
            x.contiguous(), base.weight, base.bias, lora_a, lora_b, scaling, type(base) is OneDnnLinear
        )

    def _plain_adapter(self, x: torch.Tensor):
        """``(A, B, scaling)`` of the one active adapter when it is vanilla LoRA on a frozen float32 CPU linear
        outside autocast and compile; else None."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        lora_a, lora_b, base = self.lora_A[name], self.lora_B[name], self.base_layer
        if (
            name in self.lora_variant
            or type(self.lora_dropout[name]) is not torch.nn.Identity
            or type(base) not in (torch.nn.Linear, OneDnnLinear)
            or lora_a.bias is not None
            or lora_b.bias is not None
            or any(p.requires_grad for p in base.parameters())
            or not takes_onednn_path(x, base.weight, base.bias)
            or not (plain_float32(lora_a.weight) and plain_float32(lora_b.weight))
        ):
            return None
        return lora_a.weight, lora_b.weight, self.scaling[name]


def use_lora_linear_function(model: torch.nn.Module) -> int:
    """Give every peft LoRA linear of ``model`` whose base is on the CPU the class :class:`LoraLinear`, in place;
    returns how many. Same parameters, state dict and peft behaviour (merge, unmerge, save)."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and module.base_layer.weight.device.type == "cpu":
            module.__class__ = LoraLinear
            count += 1
    return count
