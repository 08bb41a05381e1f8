"""oneDNN linears on the CPU, and LoRA linears as one autograd function (models/lora_linear.py): the same
products and gradients as nn.Linear and peft, taken only where they apply."""

from __future__ import annotations

import pytest
import torch

from sd3_lora_celeba.models import cpu_linear, lora_linear
from sd3_lora_celeba.models.cpu_linear import OneDnnLinear, use_onednn_linears

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this PyTorch build has no oneDNN")


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """The shapes of every oneDNN product, in order."""
    seen: list[tuple] = []
    real = cpu_linear.onednn_linear

    def counting(x, weight, bias, gelu_tanh=False):
        seen.append((tuple(x.shape), tuple(weight.shape)) + (("gelu",) if gelu_tanh else ()))
        return real(x, weight, bias, gelu_tanh=gelu_tanh)

    monkeypatch.setattr(cpu_linear, "onednn_linear", counting)
    return seen


def _pair(in_features: int = 96, out_features: int = 160, bias: bool = True):
    torch.manual_seed(0)
    stock = torch.nn.Linear(in_features, out_features, bias=bias)
    fast = torch.nn.Linear(in_features, out_features, bias=bias)
    fast.load_state_dict(stock.state_dict())
    assert use_onednn_linears(fast) == 1 and type(fast) is OneDnnLinear
    return stock, fast


def _assert_same_output_and_input_gradient(stock, fast, x: torch.Tensor) -> None:
    """The two modules' outputs for ``x``, and the gradients ``x`` gets back from one random output gradient,
    agree; parameters keep their gradients for the caller to compare."""
    x_stock, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_stock, y_fast = stock(x_stock), fast(x_fast)
    torch.testing.assert_close(y_fast, y_stock, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_stock)
    y_stock.backward(grad)
    y_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x_stock.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_nn_linear(calls, bias):
    stock, fast = _pair(bias=bias)
    x = torch.randn(5, 3, 96).transpose(0, 1)  # 3-D and not contiguous, as attention reshapes hand them over
    _assert_same_output_and_input_gradient(stock, fast, x)
    torch.testing.assert_close(fast.weight.grad, stock.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, stock.bias.grad, rtol=1e-5, atol=1e-5)
    # forward, then the input's gradient through the transposed weight (a view, not a copy)
    assert calls == [((3, 5, 96), (160, 96)), ((3, 5, 160), (96, 160))]


def test_a_frozen_layer_gives_the_input_its_gradient_and_the_weight_none(calls):
    stock, fast = _pair()
    for layer in (stock, fast):
        layer.requires_grad_(False)
    x = torch.randn(4, 96)
    x_stock, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    stock(x_stock).sum().backward()
    fast(x_fast).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_stock.grad, rtol=1e-5, atol=1e-5)
    assert fast.weight.grad is None and fast.bias.grad is None
    with torch.no_grad():  # inference: one product, no autograd record
        assert not fast(x).requires_grad
    assert len(calls) == 3


def test_any_rank_of_input(calls):
    stock, fast = _pair()
    x = torch.randn(2, 3, 4, 96)
    torch.testing.assert_close(fast(x), stock(x), rtol=1e-5, atol=1e-5)
    assert calls == [((2, 3, 4, 96), (160, 96))]


@pytest.mark.parametrize("case", ["float64", "autocast", "compiling", "1-d"])
def test_other_inputs_take_the_stock_linear(calls, monkeypatch, case):
    stock, fast = _pair()
    x = torch.randn(4, 96)
    if case == "float64":
        stock.double(), fast.double()
        x = x.double()
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    if case == "1-d":
        x = x[0]
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = fast(x), stock(x)
        assert got.dtype == torch.bfloat16
    else:
        got, expected = fast(x), stock(x)
    assert torch.equal(got, expected)
    assert calls == []


def test_use_onednn_linears_swaps_plain_cpu_linears_only(monkeypatch):
    class MyLinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), MyLinear(8, 8), torch.nn.Conv1d(8, 8, 1), torch.nn.Linear(8, 4)
    )
    keys = list(model.state_dict())
    assert use_onednn_linears(model) == 2
    assert [type(m).__name__ for m in model] == ["OneDnnLinear", "MyLinear", "Conv1d", "OneDnnLinear"]
    assert list(model.state_dict()) == keys and isinstance(model[0], torch.nn.Linear)
    assert use_onednn_linears(model) == 0  # already done: nothing to swap
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert use_onednn_linears(torch.nn.Linear(2, 2)) == 0


def test_a_peft_lora_model_trains_the_same(calls):
    """The fine-tune case: frozen base linears and trainable LoRA linears, swapped after peft wrapped them."""
    from peft import LoraConfig, inject_adapter_in_model

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        model.requires_grad_(False)
        config = LoraConfig(r=8, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="gaussian")
        return inject_adapter_in_model(config, model)

    stock, fast = build(), build()
    assert use_onednn_linears(fast) == 6  # two bases, two lora_A, two lora_B
    x = torch.randn(2, 10, 64)
    for model in (stock, fast):
        model(x).square().mean().backward()
    stock_grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    fast_grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert sorted(stock_grads) == sorted(fast_grads) and len(stock_grads) == 4
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6)
    assert calls  # the products went through oneDNN


def test_fine_tune_chooses_onednn_unless_compiling():
    from sd3_lora_celeba.train import recipe

    def choose(**options):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])  # what compile_blocks walks
        recipe.choose_kernels(model, recipe.FineTuneConfig(train_dir=".", empty_prompt_dir=".", **options))
        return type(model[0]).__name__

    assert choose() == "OneDnnLinear"  # SD3_CPU_LINEARS=onednn in the tests
    assert choose(compile=True) == "Linear"


def _cpuinfo(vendor: str, flags: str) -> str:
    """The start of a /proc/cpuinfo of one x86 processor."""
    return f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: some CPU\nflags\t\t: {flags}\n"


AMD_AVX512 = _cpuinfo("AuthenticAMD", "fpu avx2 avx512f avx512bw")
AMD_AVX2 = _cpuinfo("AuthenticAMD", "fpu avx2 fma")
INTEL_AVX512 = _cpuinfo("GenuineIntel", "fpu avx2 avx512f")


def test_auto_takes_onednn_where_it_measured_faster():
    prefers = cpu_linear.cpu_prefers_onednn
    assert prefers(AMD_AVX512)
    assert not prefers(INTEL_AVX512)  # MKL won the forward and the input-gradient products there
    assert not prefers(AMD_AVX2)
    for other in ("", "CPU implementer\t: 0x41\nFeatures\t: fp asimd sve\n"):  # no /proc/cpuinfo; arm64
        assert not prefers(other)


@pytest.mark.parametrize(
    "setting, cpuinfo, linears, gelu",
    [
        ("", AMD_AVX512, "OneDnnLinear", True),
        ("auto", INTEL_AVX512, "Linear", True),
        (" Auto ", AMD_AVX2, "Linear", False),
        ("onednn", AMD_AVX2, "OneDnnLinear", True),
        ("blas", AMD_AVX512, "Linear", False),
    ],
)
def test_the_pipeline_follows_the_cpu_or_the_environment(monkeypatch, setting, cpuinfo, linears, gelu):
    from diffusers.models.activations import GELU

    from sd3_lora_celeba.doctor import cpu_linears_line
    from sd3_lora_celeba.train import recipe

    monkeypatch.setenv("SD3_CPU_LINEARS", setting)
    monkeypatch.setattr(cpu_linear, "_cpuinfo", lambda: cpuinfo)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), GELU(4, 4, approximate="tanh"))
    recipe.choose_kernels(model, recipe.FineTuneConfig(train_dir=".", empty_prompt_dir="."))
    assert type(model[0]).__name__ == linears
    assert type(model[1]) is GELU  # fine-tuning keeps the stock GELU
    inference = torch.nn.Sequential(torch.nn.Linear(2, 2), GELU(2, 2, approximate="tanh"))
    swapped = cpu_linear.use_fast_cpu_linears(inference)  # what generate-images and the app call
    onednn = 2 if linears == "OneDnnLinear" else 0  # the GELU's projection is a linear too
    assert swapped == onednn + gelu
    assert type(inference[0]).__name__ == linears
    assert (type(inference[1]) is cpu_linear.gelu_projection_class()) == gelu
    kind = {"OneDnnLinear": "oneDNN", "Linear": "BLAS"}[linears]
    line = cpu_linears_line()  # sd3 doctor
    assert f"float32 CPU linears: {kind}, inference GELU {'fused into oneDNN' if gelu else 'stock'}" in line


def test_a_bad_setting_is_one_line_before_any_command_runs(monkeypatch):
    from click.testing import CliRunner

    from sd3_lora_celeba.cli import cli
    from sd3_lora_celeba.errors import InputError

    monkeypatch.setenv("SD3_CPU_LINEARS", "mkl")
    with pytest.raises(InputError, match="SD3_CPU_LINEARS='mkl' is not one of auto, onednn, blas"):
        cpu_linear.onednn_chosen()
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "SD3_CPU_LINEARS='mkl'" in lines[0] and "unset it" in lines[0], result.output


def _gelu_pair(approximate: str = "tanh"):
    """diffusers' GELU projection, and a copy of it given the fused class (when it takes it)."""
    from diffusers.models.activations import GELU

    torch.manual_seed(0)
    stock, fused = GELU(96, 160, approximate=approximate), GELU(96, 160, approximate=approximate)
    fused.load_state_dict(stock.state_dict())
    keys = list(fused.state_dict())
    swapped = cpu_linear.use_fused_gelu_projections(fused)
    assert list(fused.state_dict()) == keys
    return stock, fused, swapped


def test_the_fused_gelu_projection_gives_diffusers_gelu_in_one_product(calls):
    stock, fused, swapped = _gelu_pair()
    assert swapped == 1 and type(fused).__name__ == "OneDnnGeluProjection"
    x = torch.randn(5, 3, 96).transpose(0, 1)  # 3-D and not contiguous
    with torch.no_grad():
        got, expected = fused(x), stock(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert calls == [((3, 5, 96), (160, 96), "gelu")]
    assert cpu_linear.use_fused_gelu_projections(fused) == 0  # already done
    # the tanh GELU and not the exact one: the two differ by far more than the tolerance here
    exact = torch.nn.functional.gelu(stock.proj(x))
    assert (got - exact).abs().max() > 1e-4


@pytest.mark.parametrize("case", ["graph", "trainable", "float64", "peft", "compiling"])
def test_what_the_fused_gelu_does_not_cover_takes_the_stock_forward(calls, monkeypatch, case):
    """Whatever records a graph (an input or projection that needs a gradient), other dtypes, a projection
    peft wrapped, compiling: diffusers' own forward, with its gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    stock, fused, _ = _gelu_pair()
    x = torch.randn(4, 96)
    records = case in ("graph", "trainable")  # "trainable": the projection's parameters need gradients
    if case == "graph":
        stock.requires_grad_(False), fused.requires_grad_(False)
        x.requires_grad_()
    if case == "float64":
        stock.double(), fused.double()
        x = x.double()
    if case == "peft":
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj"], init_lora_weights="gaussian")
        stock, fused = inject_adapter_in_model(config, stock), inject_adapter_in_model(config, fused)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.enable_grad() if records else torch.no_grad():
        got, expected = fused(x), stock(x)
    assert torch.equal(got, expected)
    assert got.requires_grad == records
    assert calls == []


def test_only_tanh_gelus_on_the_cpu_are_swapped(monkeypatch):
    assert _gelu_pair("none")[2] == 0
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert _gelu_pair()[2] == 0


def test_an_sd3_transformer_with_fused_gelus_gives_the_same_prediction(calls):
    stock = _tiny_sd3_lora(3, (1,), checkpointing=False).eval()
    fused = _tiny_sd3_lora(3, (1,), checkpointing=False).eval()
    # each block's image feed-forward, and the text one in every block but the last
    assert cpu_linear.use_fused_gelu_projections(fused) == 3 + 2
    inputs = _tiny_sd3_inputs()
    with torch.no_grad():
        got, expected = (m(**inputs, return_dict=False)[0] for m in (fused, stock))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 5 and all(c[-1] == "gelu" for c in calls)


def _tiny_sd3_lora(num_layers: int, blocks: tuple[int, ...], checkpointing: bool, alpha: float | None = None):
    """A seeded tiny SD3 transformer with the recipe's peft LoRA (rank 4) on ``blocks``."""
    from diffusers import SD3Transformer2DModel

    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
        out_channels=16, pos_embed_max_size=8,
    )  # fmt: skip
    add_lora(model, lora_config(lora_target_modules(model, blocks), 4, alpha=alpha, init="gaussian"))
    if alpha is not None:  # a non-zero B, so the LoRA term and its scale count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _tiny_sd3_inputs() -> dict:
    """Seeded inputs of a batch of two for :func:`_tiny_sd3_lora`'s model."""
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 12, 32, generator=g),
        pooled_projections=torch.randn(2, 24, generator=g),
        timestep=torch.tensor([100.0, 700.0]),
    )


def _assert_same_sd3_gradients(stock, fast, count: int) -> None:
    """One loss's LoRA gradients of the two models agree; ``count`` LoRA parameters have one."""
    inputs = _tiny_sd3_inputs()
    for model in (stock, fast):
        model(**inputs, return_dict=False)[0].square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (stock, fast)]
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == count
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_sd3_lora_step_gives_the_same_gradients(calls, checkpointing):
    """The recipe's model (peft LoRA on the joint-attention linears), with gradient checkpointing's recompute."""
    stock, fast = (_tiny_sd3_lora(2, (0, 1), checkpointing) for _ in range(2))
    assert use_onednn_linears(fast) > 0
    # lora_A and lora_B of 8 + 7 linears (the last block has no text-stream output projection)
    _assert_same_sd3_gradients(stock, fast, 2 * (8 + 7))
    assert calls


# --- LoRA linears as one autograd function ---------------------------------------------------------------------


@pytest.fixture
def lora_calls(monkeypatch) -> list[bool]:
    """One entry per call of the LoRA function (whether its products went through oneDNN)."""
    seen: list[bool] = []
    real = lora_linear._LoraLinearFunction.apply

    def counting(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(lora_linear._LoraLinearFunction, "apply", counting)
    return seen


def _lora_pair(alpha: int = 8, dropout: float = 0.0, onednn: bool = True):
    """Two equal peft LoRA models (frozen bases, rank 4); the second with the LoRA function."""
    from peft import LoraConfig, inject_adapter_in_model

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, 24))
        model.requires_grad_(False)
        config = LoraConfig(
            r=4,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=["0", "2"],
            init_lora_weights="gaussian",
        )
        model = inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():  # a non-zero B, so the LoRA term counts
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        return model

    stock, fast = build(), build()
    if onednn:
        use_onednn_linears(fast)
    assert lora_linear.use_lora_linear_function(fast) == 2
    assert [type(m).__name__ for m in fast if hasattr(m, "lora_A")] == ["LoraLinear", "LoraLinear"]
    return stock, fast


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_close_in_norm(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """``got`` equals ``expected`` up to float32 rounding of differently ordered sums: the difference is small
    against the whole tensor (element-wise tolerances trip on entries that cancel to near zero)."""
    error = float((got - expected).norm() / expected.norm())
    assert error < tol, f"relative error {error:.2e} >= {tol:.0e}"


@pytest.fixture
def merges(monkeypatch) -> list[bool]:
    """One entry per call of the LoRA function: whether it formed ``W + s B A``."""
    seen: list[bool] = []
    real = lora_linear.merges_lora

    def recording(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(lora_linear, "merges_lora", recording)
    return seen


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("alpha", [4, 16])  # scale 1 and 4
@pytest.mark.parametrize("rows", [5, 10])  # 15 or 30 rows: the LoRA products kept, or W + s B A formed
def test_the_lora_function_gives_peft_s_outputs_and_gradients(lora_calls, merges, onednn, alpha, rows):
    stock, fast = _lora_pair(alpha=alpha, onednn=onednn)
    x = torch.randn(rows, 3, 48).transpose(0, 1)  # 3-D and not contiguous
    _assert_same_output_and_input_gradient(stock, fast, x)
    stock_grads, fast_grads = _grads(stock), _grads(fast)
    assert sorted(fast_grads) == sorted(stock_grads) and len(stock_grads) == 4
    for name, g in stock_grads.items():
        _assert_close_in_norm(fast_grads[name], g)
    assert lora_calls == [onednn, onednn]
    assert merges == [rows == 10] * 2
    # an input without gradient (the first LoRA block's input): the function skips the input's product
    for model in (stock, fast):
        model.zero_grad()
        model(x).square().sum().backward()
    assert merges[2:] == [False, rows == 10]  # without the input's gradient, forming W + s B A saves less
    for name, g in _grads(stock).items():
        _assert_close_in_norm(_grads(fast)[name], g)


def test_w_plus_sba_is_formed_where_it_costs_fewer_flops():
    # SD3-medium width 1536, rank any: the 333 text tokens of batch 1 keep the LoRA products, the image's merge
    assert not lora_linear.merges_lora(333, 1536, 1536, input_grad=True)
    assert lora_linear.merges_lora(4096, 1536, 1536, input_grad=True)
    assert lora_linear.merges_lora(4 * 333, 1536, 1536, input_grad=True)  # batch 4
    # without the input's gradient only the output's LoRA product is saved
    assert lora_linear.merges_lora(1000, 384, 384, input_grad=True)
    assert not lora_linear.merges_lora(300, 384, 384, input_grad=False)
    assert lora_linear.merges_lora(400, 384, 384, input_grad=False)


@pytest.mark.parametrize("case", ["dropout", "disabled", "merged", "autocast", "float64", "trainable base"])
def test_what_the_lora_function_does_not_cover_takes_peft_s_forward(lora_calls, case):
    stock, fast = _lora_pair(dropout=0.1 if case == "dropout" else 0.0)
    x = torch.randn(6, 48)
    for model in (stock, fast):
        model.eval()  # dropout off, so the two forwards agree
        if case == "disabled":
            for m in model:
                if hasattr(m, "enable_adapters"):
                    m.enable_adapters(False)
        if case == "merged":
            for m in model:
                if hasattr(m, "merge"):
                    m.merge()
        if case == "float64":
            model.double()
        if case == "trainable base":
            model[0].base_layer.weight.requires_grad_(True)
    x = x.double() if case == "float64" else x
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = fast(x), stock(x)
    else:
        got, expected = fast(x), stock(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    covered = 1 if case == "trainable base" else 0  # the second linear is still plain
    assert len(lora_calls) == covered


def test_the_lora_function_keeps_peft_s_state_dict_and_merge():
    from peft import get_peft_model_state_dict

    stock, fast = _lora_pair()
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert list(get_peft_model_state_dict(fast)) == list(get_peft_model_state_dict(stock))
    x = torch.randn(3, 48)
    unmerged = fast(x)
    for m in fast:
        if hasattr(m, "merge"):
            m.merge()
    torch.testing.assert_close(fast(x), unmerged, rtol=1e-5, atol=1e-5)
    assert lora_linear.use_lora_linear_function(fast) == 0  # already done


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_sd3_lora_step_with_the_lora_function_gives_the_same_gradients(lora_calls, checkpointing):
    """The recipe's model and kernels (choose_kernels), against stock peft with the stock linears."""
    from sd3_lora_celeba.train import recipe

    stock, fast = (_tiny_sd3_lora(3, (1, 2), checkpointing, alpha=8) for _ in range(2))
    recipe.choose_kernels(fast, recipe.FineTuneConfig(train_dir=".", empty_prompt_dir="."))
    _assert_same_sd3_gradients(stock, fast, 2 * (8 + 7))
    assert len(lora_calls) == (2 if checkpointing else 1) * (8 + 7)  # checkpointing recomputes the forward
