"""Benchmark one fine-tune step: this trainer vs a plain diffusers-style loop, on the full SD3-medium architecture.

    python benchmarks/bench_fine_tune.py                   # CUDA: SD3-medium shape (random weights), 1024 px
    python benchmarks/bench_fine_tune.py --device cpu --tiny   # smoke run of the code path on a CPU

Both loops get the same random inputs (latents 16x128x128, 154 prompt tokens of width 4096, pooled 2048) and the
same LoRA (blocks 4-22, rank 64, the 8 joint-attention linears); the frozen weights are fp32, as in the seed.

* ``ours``: the recipe's step (accelerate bf16 autocast, flow.py maths, fused AdamW, optional ``--compile``).
* ``plain``: the diffusers-script style (``torch.autocast`` fp16 + GradScaler, diffusers' density/weighting
  helpers, unfused AdamW, no compile).

Reports images/s, MFU (model FLOPs from ``torch.utils.flop_counter`` over H100 dense bf16 peak, 989 TFLOP/s) and
peak memory for each, their ratios, and peak memory of ours at batch 1 with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

H100_BF16_DENSE_FLOPS = 989e12
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)  # fmt: skip
TINY = dict(
    sample_size=8, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48, out_channels=16, pos_embed_max_size=32,
)  # fmt: skip


def build_model(arch: dict, rank: int, blocks: list[int], device: torch.device, checkpointing: bool):
    from diffusers import SD3Transformer2DModel

    from sd3_lora_celeba.models.lora import add_lora, lora_config, lora_target_modules

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**arch)
    add_lora(model, lora_config(lora_target_modules(model, blocks), rank))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.to(device).train()


def make_inputs(arch: dict, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    side = arch["sample_size"]
    return {
        "latents": torch.randn(batch, 16, side, side, generator=g).to(device),
        "prompt_embeds": torch.randn(batch, 154, arch["joint_attention_dim"], generator=g).to(device),
        "pooled_prompt_embeds": torch.randn(batch, arch["pooled_projection_dim"], generator=g).to(device),
        "sample_seeds": torch.arange(batch),
    }


def ours_step_fn(model, inputs, device, compile_model: bool):
    """The recipe's micro-step + optimizer step (see train/recipe.py), one accumulation step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sd3_lora_celeba.train import flow
    from sd3_lora_celeba.train.recipe import FineTuneConfig, draw_noise_and_sigmas

    AcceleratorState._reset_state(reset_partial_state=False)
    use_amp = device.type == "cuda"
    accelerator = Accelerator(mixed_precision="bf16" if use_amp else "no", cpu=device.type == "cpu")
    if compile_model:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    config = FineTuneConfig(train_dir=".", empty_prompt_dir=".", logit_mean=-0.5)

    def step():
        latents = inputs["latents"]
        noise, sigmas = draw_noise_and_sigmas(inputs["sample_seeds"], latents.shape, config, 3.0)
        noise, sigmas = noise.to(device), sigmas.to(device)
        noisy = flow.add_noise(latents, noise, sigmas)
        pred = model(
            hidden_states=noisy,
            timestep=flow.sigmas_to_timesteps(sigmas),
            encoder_hidden_states=inputs["prompt_embeds"],
            pooled_projections=inputs["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        loss = flow.weighted_mse(
            flow.precondition_outputs(pred, noisy, sigmas), latents, torch.ones_like(sigmas)
        )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def plain_step_fn(model, inputs, device):
    """A diffusers-script style step: fp16 autocast + GradScaler, index lookup of the shifted schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step():
        latents = inputs["latents"]
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], 0.0 - 0.5, 1.0, 1.29)
        idx = (u * 1000).long()
        timesteps = scheduler.timesteps[idx].to(device)
        sigmas = scheduler.sigmas[idx].to(device).view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * latents + sigmas * noise
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            pred = model(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=inputs["prompt_embeds"],
                pooled_projections=inputs["pooled_prompt_embeds"],
            ).sample
        pred = noisy - sigmas * pred
        w = compute_loss_weighting_for_sd3("logit_normal", sigmas)
        loss = (w.float() * (pred.float() - latents.float()) ** 2).flatten(1).mean(1).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, peak memory MiB)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (time.perf_counter() - start) / steps, peak


def run(name: str, make_step, arch, args, device, batch: int, checkpointing: bool = False) -> dict:
    model = build_model(arch, args.rank, list(range(4, 23)), device, checkpointing)
    inputs = make_inputs(arch, batch, device)
    step = make_step(model, inputs)
    step()  # build lazy state (optimizer, compile) before counting
    flops = (
        count_flops(step)
        if not args.compile or name != "ours"
        else count_flops(make_step_uncompiled(arch, args, device, batch))
    )
    seconds, peak = measure(step, device, args.warmup, args.steps)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"name": name, "s/step": seconds, "images/s": batch / seconds, "flops": flops,
            "mfu": flops / seconds / H100_BF16_DENSE_FLOPS, "peak_mib": peak}  # fmt: skip


def make_step_uncompiled(arch, args, device, batch):
    model = build_model(arch, args.rank, list(range(4, 23)), device, False)
    return ours_step_fn(model, make_inputs(arch, batch, device), device, compile_model=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny architecture (64 px) for a smoke run")
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile our transformer")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_fine_tune: no CUDA device here; run it on a GPU, or smoke-test with --device cpu --tiny")
        return 2
    device = torch.device(args.device)
    arch = TINY if args.tiny else SD3_MEDIUM
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = [
        run(
            "ours", lambda m, i: ours_step_fn(m, i, device, args.compile), arch, args, device, args.batch_size
        ),
        run("plain", lambda m, i: plain_step_fn(m, i, device), arch, args, device, args.batch_size),
    ]
    ckpt1 = run("ours b1 ckpt", lambda m, i: ours_step_fn(m, i, device, False), arch, args, device, 1, True)
    side = arch["sample_size"] * 8
    print(f"SD3 {'tiny' if args.tiny else 'medium'} architecture, {side} px, blocks 4-22, rank {args.rank}, "
          f"batch {args.batch_size}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")  # fmt: skip
    print(f"{'':14s}{'s/step':>10s}{'images/s':>10s}{'TFLOP/step':>12s}{'MFU':>8s}{'peak MiB':>11s}")
    for r in [*results, ckpt1]:
        print(f"{r['name']:14s}{r['s/step']:10.3f}{r['images/s']:10.2f}{r['flops'] / 1e12:12.2f}"
              f"{100 * r['mfu']:7.1f}%{r['peak_mib']:11.0f}")  # fmt: skip
    ours, plain = results
    print(f"ours/plain: speed x{ours['images/s'] / plain['images/s']:.2f}, "
          f"peak memory x{ours['peak_mib'] / plain['peak_mib']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
