"""Faster float32 linear layers on the CPU: the same products, computed by oneDNN instead of the BLAS.

PyTorch sends a float32 ``nn.Linear`` on the CPU to its BLAS (MKL in the pip wheels). The oneDNN matmul that
PyTorch also ships (the library behind its CPU convolutions) was faster on AMD EPYC development machines with
AVX-512: on one thread 96-105 against 79-93 GFLOP/s (a 2048-square product and the MM-DiT's feed-forward shape).
On an Intel Xeon with AVX-512 MKL won the forward products (a mid-size transformer call 4.5% faster, every
MM-DiT shape by 2-14%) but oneDNN won a training step's forward and backward (by 4.7%); on an AMD EPYC without
AVX-512 a transformer call took 1.5% longer with oneDNN. So :func:`use_fast_cpu_linears`, what the pipeline
calls, takes oneDNN for training on CPUs with AVX-512 and for inference on AMD CPUs with AVX-512
(:func:`cpu_prefers_onednn`), and the BLAS everywhere else; the environment variable ``SD3_CPU_LINEARS``
(``auto``, ``onednn``, ``blas``) overrides that. What it gives the train-step and generate benchmarks is in the
README's Benchmarks section. The results agree to float32 rounding (the order of the additions differs, as
between two BLAS builds).

:func:`use_onednn_linears` gives every plain ``nn.Linear`` of a model the class :class:`OneDnnLinear`: a subclass
with the same parameters and state dict, so peft wraps and saves it like any linear, and LoRA fusing writes into
the same weight. Its forward takes the oneDNN path only for float32 CPU tensors outside autocast and outside
``torch.compile`` (which plans its own kernels); anything else is the stock ``F.linear``. Training keeps working:
the backward gives the input's gradient through oneDNN as well and the weight's gradient (LoRA layers) from one
matmul, and skips what is not needed (a frozen weight gets none).

:func:`use_lora_linear_function` gives peft's LoRA linears of a CPU training run the class
:class:`LoraLinear`, whose forward is one autograd function for ``x W^T + b + s (x A^T) B^T`` (frozen ``W``,
``b``; trainable ``A``, ``B``; scale ``s``). peft computes the LoRA term as four operations (two products, a scale,
an add) and autograd adds the input's two gradients in a fifth; here the LoRA product is added into the base
product's output in place (one ``addmm``), the scale is applied to the rank-wide tensors only, and the input's
gradient is summed in one buffer. Same products and same parameters; it removes three passes over a
layer-wide tensor per linear, which measured 3.3 of 12 ms for one mid-size image-stream projection (forward and
backward, rank 64, oneDNN). Anything peft's forward does beyond one plain adapter (dropout, DoRA and other
variants, several adapters, a merged or disabled adapter) takes peft's forward unchanged.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from sd3_lora_celeba.config import cpu_linears_choice


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernel (x86 and arm64 pip wheels do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN for a contiguous ``x`` of any rank; ``weight`` may be a transposed view
    (no copy is made)."""
    rows = torch.ops.mkldnn._linear_pointwise(x.view(-1, x.shape[-1]), weight, bias, "none", [], "")
    return rows.view(*x.shape[:-1], rows.shape[-1])


def _plain_float32(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32)


def takes_onednn_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """float32 CPU tensors (no tensor subclass), outside autocast and ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dim() >= 2
        and _plain_float32(x)
        and _plain_float32(weight)
        and _plain_float32(bias)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _OneDnnLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad_out.contiguous(), weight.t(), None)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


class OneDnnLinear(torch.nn.Linear):
    """``nn.Linear`` whose float32 CPU products run on oneDNN (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not takes_onednn_path(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        # without gradients (inference) the function records nothing and keeps nothing
        return _OneDnnLinearFunction.apply(x.contiguous(), self.weight, self.bias)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` held on the CPU the :class:`OneDnnLinear` class, in place;
    returns how many. Nothing changes where oneDNN is missing or on other devices; quantized weights (tensor
    subclasses) and other dtypes keep the stock linear at each call."""
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            module.__class__ = OneDnnLinear
            count += 1
    return count


def cpu_prefers_onednn(cpuinfo: str, training: bool = False) -> bool:
    """The ``auto`` rule, from the text of ``/proc/cpuinfo``: oneDNN where it measured faster than MKL, that is
    training on x86 CPUs with AVX-512 and inference on AMD ones with AVX-512; the BLAS everywhere else (Intel
    inference, x86 without AVX-512, other architectures)."""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    if not (vendor and flags and "avx512f" in flags.group(1).split()):
        return False
    return training or vendor.group(1) == "AuthenticAMD"


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(65536)  # the first processor's block is enough
    except OSError:
        return ""


def onednn_chosen(training: bool = False) -> bool:
    """Whether this run's float32 CPU linears go through oneDNN: ``SD3_CPU_LINEARS`` when set (``onednn``,
    ``blas``), else the ``auto`` rule for this CPU and workload. A bad value is a one-line InputError
    (:func:`~sd3_lora_celeba.config.cpu_linears_choice`, which the ``sd3`` command checks first thing)."""
    choice = cpu_linears_choice()
    if choice == "blas" or not onednn_available():
        return False
    return choice == "onednn" or cpu_prefers_onednn(_cpuinfo(), training)


def use_fast_cpu_linears(model: torch.nn.Module, training: bool = False) -> int:
    """The pipeline's choice of CPU linear kernel (``training``: fine-tune's step, forward and backward; else
    inference): :func:`use_onednn_linears` where :func:`onednn_chosen`, otherwise nothing (the stock BLAS path);
    returns how many linears were swapped."""
    return use_onednn_linears(model) if onednn_chosen(training) else 0


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x``, by oneDNN or by the BLAS."""
    return onednn_linear(x, weight, bias) if onednn else F.linear(x, weight, bias)


class _LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling (x A^T) B^T`` with ``W`` and ``b`` frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, onednn: bool):
        rows = x.view(-1, x.shape[-1])  # (N, in)
        h = _product(rows, lora_a, None, onednn)  # (N, r)
        out = _product(rows, weight, bias, onednn)  # (N, out), a fresh tensor: added into in place
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.scaling, ctx.onednn = scaling, onednn
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
            grad_x = _product(grad_rows, weight.t(), None, ctx.onednn)
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
            or not (_plain_float32(lora_a.weight) and _plain_float32(lora_b.weight))
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
