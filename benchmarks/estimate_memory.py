"""Peak GPU memory of fine-tuning, validation, generation and the app at the real shapes, without a GPU.

    python benchmarks/estimate_memory.py                          # the three families at 1024 px (~6 min)
    python benchmarks/estimate_memory.py --family sd3.5-large --batch-size 2 --generate-batch-size 8

An estimate, not a measurement: ``bench_fine_tune.py --device cuda`` measures ``torch.cuda.max_memory_allocated``
where a GPU is lent (its "batch 1 + gradient checkpointing" row is this script's SD3-medium batch-1 row with one
micro-batch instead of two), and this project has had none. The script runs the operations a CUDA run performs
on fake tensors (``FakeTensorMode``: shapes and dtypes, no storage, no arithmetic), so the 8 B-parameter
SD3.5-large costs seconds and no memory, and counts the bytes of every tensor storage alive after each operation.

* Fine-tune, as ``sd3 fine-tune`` runs on CUDA: frozen weights in bf16; a Gaussian LoRA on the family's
  recommended blocks, its gradients and fused AdamW state in fp32; bf16 autocast with layer norms in fp32
  (CUDA autocast's rule, applied here because CPU autocast keeps them bf16); the recipe's ``loss_step``,
  backward, clipping and optimizer step; two micro-batches per step, so gradients stay alive through the second
  forward, as with ``--gradient-accumulation-steps``.
* Generation, as ``generate-images`` runs on CUDA: the bf16 transformer and VAE resident, one guided
  transformer call (prompts and empty prompt, 2 x batch), then the VAE decode of the batch.
* Validation FID during fine-tuning (``--validation-fid-every``): generation as above, with the trained
  transformer (its LoRA unfused, under bf16 autocast) and AdamW's state resident.
* The attention app, as ``visualize-attention-weights`` runs on CUDA: the whole bf16 pipeline resident (the
  three text encoders too), its default attention capture during one guided generation, then the decode; and
  its peak with ``--offload model``, where only the running model is on the device.
* All of them: PyTorch's fused attention (its forward keeps only the output and the log-sum-exp, as the CUDA kernels
  do), and sizes rounded up to the CUDA caching allocator's 512-byte blocks.
* Left out: kernel workspaces (cuBLAS keeps a few MiB to tens of MiB), the gap between allocated and reserved
  memory (fragmentation) and the CUDA context (~0.5 GiB, outside ``max_memory_allocated`` too).

``tests/test_benchmark_memory.py`` checks the counting against PyTorch's own allocator on real CPU tensors (the
profiler's memory events, within 2%, with oneDNN off: on CPUs without native bf16 its bf16 products take fp32
scratch buffers from the allocator, a kernel workspace) and the fake run against a real one on small models
(equal bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from sd3_lora_celeba.testing.published import PROMPT_TOKENS, SD3_VAE, TRANSFORMER_CONFIGS, text_encoders

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
GIB = 2**30


def allocator_bytes(nbytes: int, block: int = CUDA_BLOCK) -> int:
    """What the caching allocator holds for a request of ``nbytes``: rounded up to a multiple of ``block``."""
    return -(-nbytes // block) * block


def option_default(config_class, name: str):
    """The default of the option ``name`` of a command's config dataclass."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == name)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, over the operations run inside the mode (and the
    tensors passed to :meth:`track` before it)."""

    def __init__(self, block: int = CUDA_BLOCK):
        super().__init__()
        self.block, self.live, self.peak = block, 0, 0
        self._seen = WeakIdKeyDictionary()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:  # a view, an in-place result or a tensor counted before
            return
        size = allocator_bytes(storage.nbytes(), self.block)
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


@contextlib.contextmanager
def cuda_autocast_norms():
    """Layer norms in float32 under autocast, as CUDA autocast runs them (CPU autocast keeps their input dtype)."""
    layer_norm = F.layer_norm

    def float32_layer_norm(x, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return layer_norm(x.float(), *args, **kwargs)
        return layer_norm(x, *args, **kwargs)

    F.layer_norm = float32_layer_norm
    try:
        yield
    finally:
        F.layer_norm = layer_norm


def lora_transformer(config: dict, checkpointing: bool, rank: int = 64) -> torch.nn.Module:
    """The family's transformer as ``sd3 fine-tune`` trains it on CUDA: frozen weights in bf16, an fp32 LoRA on
    the recommended blocks' attention linears (``attn2`` included where it exists), gradient checkpointing on or
    off. Built on the current default device (``meta`` for an estimate)."""
    from diffusers import SD3Transformer2DModel

    from sd3_lora_celeba.models.families import recommended_lora_blocks
    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config).to(torch.bfloat16)
    blocks = recommended_lora_blocks(config["num_layers"])
    add_lora(model, lora_config(lora_target_modules(model, blocks), rank, init="gaussian"))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def fake_copy(model: torch.nn.Module) -> None:
    """Give a ``meta`` model CPU fake tensors of the same shapes and dtypes (inside a ``FakeTensorMode``); a
    tensor shared by several modules (T5's tied embeddings) stays one tensor."""
    # id -> (the original, kept alive so that no other tensor takes its id meanwhile; its fake)
    fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake_of(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in fakes:
            fake = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            fake = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if parameter else fake
            fakes[id(t)] = (t, fake)
        return fakes[id(t)][1]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = fake_of(p, parameter=True)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake_of(b, parameter=False)


def step_fn(model: torch.nn.Module, config: dict, batch_size: int, micro_batches: int = 2):
    """One optimizer step of ``sd3 fine-tune`` (its ``loss_step`` under bf16 autocast, backward per micro-batch,
    clipping, fused AdamW), and the tensors that live across steps (inputs, weights, optimizer state)."""
    from sd3_lora_celeba.train import recipe

    fine_tune = recipe.FineTuneConfig(train_dir=".", empty_prompt_dir=".", lr_warmup_steps=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = recipe.build_optimizer(fine_tune, params, torch.device("cuda"))  # fused, as on CUDA
    side = config["sample_size"]
    batch = {
        "latents": torch.randn(batch_size, 16, side, side),  # (B, 16, H/8, W/8)
        "noise": torch.randn(batch_size, 16, side, side),
        "sigmas": torch.rand(batch_size),
        "prompt_embeds": torch.randn(batch_size, PROMPT_TOKENS, config["joint_attention_dim"]),
        "pooled_prompt_embeds": torch.randn(batch_size, config["pooled_projection_dim"]),
    }

    def step() -> None:
        for _ in range(micro_batches):
            with torch.autocast("cpu", torch.bfloat16):
                loss = recipe.loss_step(model, batch, fine_tune)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, fine_tune.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def kept() -> list[torch.Tensor]:
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return [*model.parameters(), *model.buffers(), *batch.values(), *state]

    return step, kept


def peak_bytes(step, kept, steps: int = 2, block: int = CUDA_BLOCK) -> tuple[int, int]:
    """(bytes alive before the first step, peak bytes over ``steps`` steps); with the default two, the second
    runs with the optimizer state the first created."""
    tracker = LiveBytes(block)
    for tensor in kept():
        tracker.track(tensor)
    start = tracker.live
    with tracker, cuda_autocast_norms():
        for _ in range(steps):
            step()
    return start, tracker.peak


def shapes_only(fake: bool):
    """(where to build the models, the mode to run them in): ``meta`` and fake tensors for an estimate, the CPU
    and real tensors to check one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if fake:
        return torch.device("meta"), FakeTensorMode(allow_non_fake_inputs=True)
    return torch.device("cpu"), contextlib.nullcontext()


def estimate(config: dict, batch_size: int, checkpointing: bool, rank: int = 64, fake: bool = True) -> dict:
    """Peak bytes of a fine-tune step of the transformer ``config`` at its native size, and what the frozen
    weights and the LoRA's training state take of it. ``fake=False`` runs it on real CPU tensors."""
    build, mode = shapes_only(fake)
    with build:
        model = lora_transformer(config, checkpointing, rank)
    with mode:
        if fake:
            fake_copy(model)
        step, kept = step_fn(model, config, batch_size)
        _, peak = peak_bytes(step, kept)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"frozen": frozen, "lora_state": 4 * lora, "peak": peak}  # LoRA: weights, gradients, AdamW's two


def estimate_generation(
    config: dict,
    vae_config: dict,
    batch_size: int,
    fused_qkv: bool = False,
    fake: bool = True,
    app_encoders=None,
    validation_rank: int | None = None,
) -> dict:
    """Peak bytes of ``generate-images`` at the native size, what stays resident (the bf16 transformer and VAE),
    and the peaks of its two phases: one guided transformer call on ``2 x batch_size`` inputs (prompts and the
    empty prompt), then the VAE decode of ``batch_size`` latents. ``fused_qkv``: the joined q/k/v projections
    generate adds on CUDA for SD3-medium (diffusers keeps the separate ones beside them). ``fake=False`` runs it
    on real CPU tensors.

    ``app_encoders``: the attention app's generation instead, its text encoders built by this callable (e.g.
    :func:`~sd3_lora_celeba.testing.published.text_encoders`). They stay resident too (the prompt's encoding, a
    few MiB of activations, is left out), and the app's default capture runs: its blocks, all text columns kept
    (the most a prompt keeps), one transformer call per default captured step (uncaptured steps leave nothing
    behind). The captured maps and features stay on the device through the decode, as in the app.

    ``validation_rank``: ``fine-tune --validation-fid-every``'s generation instead. The transformer is the one
    being trained (:func:`lora_transformer`, LoRA of this rank unfused, in eval mode), AdamW's two fp32 states
    stay resident beside it (the gradients were set to ``None`` by the step before), and its calls run under bf16
    autocast (accelerate keeps the autocast wrapper on the unwrapped model that validation gets). The Inception
    network runs after the images are written, on what generation freed, and is left out."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from sd3_lora_celeba.visualize.app import VisualizeConfig
    from sd3_lora_celeba.visualize.capture import capture_attention
    from sd3_lora_celeba.visualize.explorer import default_capture

    dtype, side, n = torch.bfloat16, config["sample_size"], 2 * batch_size
    app = app_encoders is not None
    build, mode = shapes_only(fake)
    with build:
        if validation_rank:
            transformer = lora_transformer(config, checkpointing=False, rank=validation_rank).eval()
        else:
            transformer = SD3Transformer2DModel(**config).to(dtype).eval()
        vae = AutoencoderKL(**vae_config).to(dtype).eval()
        encoders = [e.to(dtype) for e in app_encoders()] if app else []
    models = [transformer, vae, *encoders]
    app_steps = option_default(VisualizeConfig, "num_inference_steps")
    blocks, steps = default_capture(config["num_layers"], app_steps)
    capture = capture_attention(transformer, blocks=blocks, cfg=True) if app else contextlib.nullcontext()
    with mode:
        for model in models if fake else ():
            fake_copy(model)
        if fused_qkv:
            transformer.fuse_qkv_projections()
        latents = torch.randn(batch_size, 16, side, side, dtype=dtype)  # (B, 16, H/8, W/8)
        call = dict(
            timestep=torch.full((n,), 500.0, dtype=dtype),
            encoder_hidden_states=torch.randn(n, PROMPT_TOKENS, config["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(n, config["pooled_projection_dim"], dtype=dtype),
        )
        trained = [p for p in transformer.parameters() if p.requires_grad] if validation_rank else []
        adam_states = [torch.zeros_like(p) for p in trained for _ in range(2)]  # exp_avg, exp_avg_sq
        tracker = LiveBytes()
        weights = []  # bytes of each model, in the order of ``models``
        for model in models:
            before = tracker.live
            for tensor in (*model.parameters(), *model.buffers()):
                tracker.track(tensor)
            weights.append(tracker.live - before)
        for tensor in [*adam_states, latents, *call.values()]:
            tracker.track(tensor)
        resident = tracker.live
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=bool(validation_rank))
        with tracker, torch.inference_mode(), capture, cuda_autocast_norms():
            for _ in range(len(steps) if app else 1):
                with autocast:
                    noise_pred = transformer(
                        hidden_states=torch.cat([latents] * 2), return_dict=False, **call
                    )[0]
                uncond, text = noise_pred.chunk(2)
                latents = uncond + 7.0 * (text - uncond)  # guidance and the scheduler step, element-wise
                del noise_pred, uncond, text
            denoise, captured = tracker.peak, tracker.live - resident
            tracker.peak = tracker.live
            latents = latents / vae_config["scaling_factor"] + vae_config["shift_factor"]
            image = vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W)
            del image
            decode = tracker.peak
    transformer_bytes, vae_bytes, *encoder_bytes = weights
    # The app with --offload model: only the running model is on the device (the encoders one at a time, their
    # few MiB of activations left out); the captured maps stay through the decode.
    offload_peak = max(
        denoise - vae_bytes - sum(encoder_bytes),
        decode - transformer_bytes - sum(encoder_bytes),
        *encoder_bytes,
    )
    return {
        "resident": resident,
        "captured": captured,
        "denoise": denoise,
        "decode": decode,
        "peak": max(denoise, decode),
        "offload_peak": offload_peak,
    }


def main(argv: list[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=list(TRANSFORMER_CONFIGS), action="append")
    parser.add_argument(
        "--batch-size", type=int, action="append", help="fine-tune micro-batch (default: 1 and 3)"
    )
    parser.add_argument(
        "--generate-batch-size", type=int, action="append", help="images per call (default: 1, 4)"
    )
    parser.add_argument("--lora-rank", type=int, default=64)
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the bf16 cast's note on modules kept in float32 (there are none)
    families = args.family or list(TRANSFORMER_CONFIGS)
    print(
        f"Estimated peak CUDA memory at 1024 px, GiB (fake tensors, no GPU; {Path(__file__).name}'s docstring)"
    )
    print(f"\nsd3 fine-tune step: bf16 weights and autocast, fp32 LoRA rank {args.lora_rank} + AdamW")
    print(f"{'family':14s}{'batch':>6s}{'checkpointing':>15s}{'frozen':>9s}{'LoRA+opt':>10s}{'peak':>8s}")
    for family in families:
        for batch in args.batch_size or [1, 3]:
            for checkpointing in (True, False):
                e = estimate(TRANSFORMER_CONFIGS[family], batch, checkpointing, args.lora_rank)
                print(f"{family:14s}{batch:6d}{'on' if checkpointing else 'off':>15s}{e['frozen'] / GIB:9.2f}"
                      f"{e['lora_state'] / GIB:10.2f}{e['peak'] / GIB:8.2f}")  # fmt: skip
    print("\nsd3 generate-images: bf16 transformer and VAE, guidance (2 x batch through the transformer)")
    print(
        f"{'family':14s}{'batch':>6s}{'fused qkv':>11s}{'resident':>10s}{'denoise':>9s}{'decode':>8s}{'peak':>8s}"
    )
    for family in families:
        for batch in args.generate_batch_size or [1, 4]:
            for fused in (False, True) if family == "sd3-medium" else (False,):
                e = estimate_generation(TRANSFORMER_CONFIGS[family], SD3_VAE, batch, fused)
                print(f"{family:14s}{batch:6d}{'yes' if fused else 'no':>11s}{e['resident'] / GIB:10.2f}"
                      f"{e['denoise'] / GIB:9.2f}{e['decode'] / GIB:8.2f}{e['peak'] / GIB:8.2f}")  # fmt: skip
    from sd3_lora_celeba.train.recipe import FineTuneConfig

    default = option_default(FineTuneConfig, "validation_batch_size")
    print(
        f"\nsd3 fine-tune --validation-fid-every: the trained model (rank {args.lora_rank} LoRA unfused, AdamW state)"
        f" and the VAE; --validation-batch-size 1 and {default} (the default)"
    )
    print(f"{'family':14s}{'batch':>6s}{'resident':>10s}{'denoise':>9s}{'decode':>8s}{'peak':>8s}")
    for family in families:
        for batch in sorted({1, default}):
            e = estimate_generation(
                TRANSFORMER_CONFIGS[family], SD3_VAE, batch, validation_rank=args.lora_rank
            )
            print(f"{family:14s}{batch:6d}{e['resident'] / GIB:10.2f}{e['denoise'] / GIB:9.2f}"
                  f"{e['decode'] / GIB:8.2f}{e['peak'] / GIB:8.2f}")  # fmt: skip
    print(
        "\nsd3 visualize-attention-weights: the whole bf16 pipeline (three text encoders too), the default capture"
    )
    print(
        f"{'family':14s}{'resident':>10s}{'captured':>10s}{'denoise':>9s}{'decode':>8s}{'peak':>8s}"
        f"{'peak, --offload model':>23s}"
    )
    for family in families:
        e = estimate_generation(TRANSFORMER_CONFIGS[family], SD3_VAE, 1, app_encoders=text_encoders)
        print(f"{family:14s}{e['resident'] / GIB:10.2f}{e['captured'] / GIB:10.2f}{e['denoise'] / GIB:9.2f}"
              f"{e['decode'] / GIB:8.2f}{e['peak'] / GIB:8.2f}{e['offload_peak'] / GIB:23.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
