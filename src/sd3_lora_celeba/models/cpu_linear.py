"""Faster float32 linear layers on the CPU: the same products, computed by oneDNN instead of the BLAS.

PyTorch sends a float32 ``nn.Linear`` on the CPU to its BLAS (MKL in the pip wheels). The oneDNN matmul that
PyTorch also ships (the library behind its CPU convolutions) was faster on AMD EPYC development machines with
AVX-512: on one thread 96-105 against 79-93 GFLOP/s (a 2048-square product and the MM-DiT's feed-forward shape).
On Intel Xeons with AVX-512 MKL won the forward products (a mid-size transformer call 4.5% faster, every
MM-DiT shape by 2-14%) and, on an Ice Lake, the input-gradient products too (by 3-13%) and a training step's
forward and backward (by 5%, twice); an earlier Intel machine had given that step to oneDNN by 4.7%. On an AMD
EPYC without AVX-512 a transformer call took 1.5% longer with oneDNN. So :func:`use_fast_cpu_linears`, what the
pipeline calls, takes oneDNN on AMD CPUs with AVX-512 (:func:`cpu_prefers_onednn`) and the BLAS everywhere
else, for training and inference alike; the environment variable ``SD3_CPU_LINEARS``
(``auto``, ``onednn``, ``blas``) overrides that. What it gives the train-step and generate benchmarks is in the
README's Benchmarks section. The results agree to float32 rounding (the order of the additions differs, as
between two BLAS builds).

:func:`use_onednn_linears` gives every plain ``nn.Linear`` of a model the class :class:`OneDnnLinear`: a subclass
with the same parameters and state dict, so peft wraps and saves it like any linear, and LoRA fusing writes into
the same weight. Its forward takes the oneDNN path only for float32 CPU tensors outside autocast and outside
``torch.compile`` (which plans its own kernels); anything else is the stock ``F.linear``. Training keeps working:
the backward gives the input's gradient through oneDNN as well and the weight's gradient (LoRA layers) from one
matmul, and skips what is not needed (a frozen weight gets none).

Inference also fuses the feed-forward's tanh GELU into its up-projection (:func:`use_fused_gelu_projections`,
where :func:`gelu_fusion_chosen`): PyTorch's float32 tanh GELU costs more than three times a ``tanh`` of the
same tensor on the CPU, and oneDNN applies it while it writes the product. A mid-size guided image took 9.22
against 10.01 s of CPU time with it (median of 4, interleaved, Intel Xeon with AVX-512).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sd3_lora_celeba.config import cpu_linears_choice


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear kernel (x86 and arm64 pip wheels do)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu_tanh: bool = False
) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN for a contiguous ``x`` of any rank; ``weight`` may be a transposed view
    (no copy is made). ``gelu_tanh``: the tanh-approximated GELU of that, applied by oneDNN as it writes the
    product (one pass over the output fewer)."""
    attr, algorithm = ("gelu", "tanh") if gelu_tanh else ("none", "")
    rows = torch.ops.mkldnn._linear_pointwise(x.view(-1, x.shape[-1]), weight, bias, attr, [], algorithm)
    return rows.view(*x.shape[:-1], rows.shape[-1])


def plain_float32(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32)


def takes_onednn_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """float32 CPU tensors (no tensor subclass), outside autocast and ``torch.compile``."""
    return (
        x.device.type == "cpu"
        and x.dim() >= 2
        and plain_float32(x)
        and plain_float32(weight)
        and plain_float32(bias)
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


def _avx512_vendor(cpuinfo: str) -> str | None:
    """The x86 vendor id (``GenuineIntel``, ``AuthenticAMD``) in the text of ``/proc/cpuinfo`` when the CPU has
    AVX-512, else None."""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    if not (vendor and flags and "avx512f" in flags.group(1).split()):
        return None
    return vendor.group(1)


def cpu_prefers_onednn(cpuinfo: str) -> bool:
    """The ``auto`` rule, from the text of ``/proc/cpuinfo``: oneDNN where it measured faster than MKL, that is
    AMD CPUs with AVX-512; the BLAS everywhere else (Intel, x86 without AVX-512, other architectures)."""
    return _avx512_vendor(cpuinfo) == "AuthenticAMD"


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read(65536)  # the first processor's block is enough
    except OSError:
        return ""


def _onednn_setting(auto_rule: Callable[[str], bool]) -> bool:
    """``SD3_CPU_LINEARS`` when set (``onednn``, ``blas``), else ``auto_rule`` of this CPU's ``/proc/cpuinfo``;
    never without oneDNN. A bad value is a one-line InputError
    (:func:`~sd3_lora_celeba.config.cpu_linears_choice`, which the ``sd3`` command checks first thing)."""
    choice = cpu_linears_choice()
    if choice == "blas" or not onednn_available():
        return False
    return choice == "onednn" or auto_rule(_cpuinfo())


def onednn_chosen() -> bool:
    """Whether this run's float32 CPU linears go through oneDNN (:func:`cpu_prefers_onednn` under ``auto``)."""
    return _onednn_setting(cpu_prefers_onednn)


@functools.cache
def gelu_projection_class() -> type[torch.nn.Module]:
    """:class:`OneDnnGeluProjection`, made on first use (it subclasses diffusers' ``GELU``, which this module
    does not import at load time)."""
    from diffusers.models.activations import GELU

    class OneDnnGeluProjection(GELU):
        """diffusers' ``GELU`` (the feed-forward's up-projection, then GELU) whose tanh-approximated inference
        on float32 CPU tensors is one oneDNN product with the GELU applied as the output is written.

        PyTorch's own float32 tanh GELU on the CPU is slow: for the mid-size feed-forward's (2048, 1536)
        output it took 9.7 ms on one thread of an Intel Xeon with AVX-512, against 2.6 ms for ``torch.tanh``
        of the same tensor; the fused product and GELU took 25.2 ms against 30.9 ms for MKL's product followed
        by it (median of 30, interleaved). Whatever records an autograd graph, another GELU or a wrapped
        projection (peft LoRA) takes the stock forward."""

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            proj = self.proj
            if not (
                self.approximate == "tanh"
                and isinstance(proj, torch.nn.Linear)
                and takes_onednn_path(hidden_states, proj.weight, proj.bias)
                and not _records_graph(hidden_states, proj)
            ):
                return super().forward(hidden_states)
            return onednn_linear(hidden_states.contiguous(), proj.weight, proj.bias, gelu_tanh=True)

    return OneDnnGeluProjection


def _records_graph(x: torch.Tensor, layer: torch.nn.Linear) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in layer.parameters(recurse=False))
    )


def use_fused_gelu_projections(model: torch.nn.Module) -> int:
    """Give every diffusers ``GELU`` of ``model`` with the tanh approximation and its projection on the CPU the
    class ``OneDnnGeluProjection`` (:func:`gelu_projection_class`), in place; returns how many. Parameters and
    state dict stay as they are. Nothing changes where oneDNN is missing."""
    if not onednn_available():
        return 0
    from diffusers.models.activations import GELU

    fused = gelu_projection_class()
    count = 0
    for module in model.modules():
        if type(module) is GELU and module.approximate == "tanh" and module.proj.weight.device.type == "cpu":
            module.__class__ = fused
            count += 1
    return count


def gelu_fusion_chosen() -> bool:
    """Whether inference fuses the tanh GELU into its up-projection's oneDNN product: ``SD3_CPU_LINEARS=onednn``,
    or ``auto`` on an x86 CPU with AVX-512 (Intel included, whose other linears stay on the BLAS: the fused
    product beat MKL's product and PyTorch's GELU). Not with ``blas``, and not without AVX-512, where it
    was not measured."""
    return _onednn_setting(lambda cpuinfo: _avx512_vendor(cpuinfo) is not None)


def use_fast_cpu_linears(model: torch.nn.Module, training: bool = False) -> int:
    """The pipeline's choice of CPU linear kernel: :func:`use_onednn_linears` where :func:`onednn_chosen`,
    otherwise nothing (the stock BLAS path); for inference (not ``training``, fine-tune's step, whose backward
    needs the product before the GELU) also :func:`use_fused_gelu_projections` where :func:`gelu_fusion_chosen`.
    Returns how many modules were swapped."""
    count = use_onednn_linears(model) if onednn_chosen() else 0
    if not training and gelu_fusion_chosen():
        count += use_fused_gelu_projections(model)
    return count
