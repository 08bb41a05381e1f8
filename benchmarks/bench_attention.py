"""Benchmark of the attention explorer: capture overhead per denoising step, the app's default capture, NCUT.

One denoising step = one SD3 transformer call on a classifier-free-guidance batch of 2 ([uncond, cond]), with a
real-length prompt's text tokens kept (42 CLIP + 50 T5 of the 77 + 256 text positions), as the app does.

Goals (``goals(device, quick)``, read by ``benchmarks/run_all.py``):

* ``capture-one-block``: one block of 24 captured, per denoising step, over plain: target <= 1.10x;
* ``capture-app-default``: a 28-step generation with the app's default capture set (4 middle blocks, every 4th
  step, the last included) over plain generation: target <= 1.25x (composed from per-step medians, see goals()).

``quick`` (CPU): a mid-size model, 24 blocks, width 384 (6 heads x 64), 64 x 64 latents (1024 image tokens).
Full size (``--device cuda``): SD3-medium's width 1536 (24 heads) at 1024 px (4096 image tokens), bf16.

NCUT (printed by ``main``): random features of 3 images x 4429 tokens x 1536 dims, one joint fit; eigenvectors
plus t-SNE colours are timed.

    python benchmarks/bench_attention.py                 # CPU, quick
    python benchmarks/bench_attention.py --device cuda   # full size
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch
from bench_fine_tune import interleaved
from run_all import print_goals

from sd3_lora_celeba.visualize.capture import capture_attention
from sd3_lora_celeba.visualize.explorer import default_capture
from sd3_lora_celeba.visualize.ncut import ncut_colors

TEXT_TOKENS = 77 + 256
KEPT = tuple(range(42)) + tuple(77 + j for j in range(50))  # a 35-word caption's real tokens
APP_STEPS = 28  # the app's default denoising steps


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _interleaved(fns: dict, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of each function, run in turn ``repeats`` times after one warm-up (bench_fine_tune's timer)."""
    return interleaved({name: (lambda fn=fn: fn) for name, fn in fns.items()}, device, repeats, warmup=1)


def _transformer(quick: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    heads, sample = (
        (6, 64) if quick else (24, 128)
    )  # width 384 / 1536; latents 64 / 128 -> 1024 / 4096 tokens
    model = SD3Transformer2DModel(
        sample_size=sample,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=heads * 64,
        caption_projection_dim=heads * 64,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=sample,
    )
    return model.to(device, dtype).eval(), sample


def _inputs(model, sample: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    width = model.config.joint_attention_dim
    return {
        "hidden_states": torch.randn(2, 16, sample, sample, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, width, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(2, 64, generator=g).to(device, dtype),
        "timestep": torch.full((2,), 500.0, device=device),
    }


def _rows(times: dict[str, list[float]], device: torch.device) -> list[list]:
    peak = _peak_mb(device)
    return [[name, statistics.median(t), min(t), round(peak, 1)] for name, t in times.items()]


@torch.no_grad()
def goals(device: str = "cpu", quick: bool = True) -> list[dict]:
    """The attention goals, measured side by side with interleaved repeats.

    Three kinds of denoising step are timed in turn: plain, one block captured, and the app's default blocks
    captured. A default generation of ``APP_STEPS`` steps captures ``len(steps)`` of them, so its time is
    ``APP_STEPS * plain + len(steps) * (captured - plain)``, composed from those medians (and mins).
    """
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    model, sample = _transformer(quick, dev, dtype)
    inputs = _inputs(model, sample, dev, dtype)
    repeats = 5  # with 3, one slow repeat of a neighbour's making set the median (1.15x once, 1.04x alone)
    blocks, steps = default_capture(len(model.transformer_blocks), APP_STEPS)

    def plain_step():
        model(**inputs)

    def captured_step(chosen):
        def run():
            with capture_attention(model, blocks=chosen, cfg=True, kept_columns=KEPT) as capture:
                model(**inputs)
            capture.result()

        return run

    default_label = f"app default blocks {','.join(map(str, blocks))} captured"
    times = _interleaved(
        {
            "plain step": plain_step,
            "1 of 24 blocks captured": captured_step([12]),
            default_label: captured_step(blocks),
        },
        dev,
        repeats,
    )
    rows = _rows(times, dev)
    plain, one, default = rows
    step_goal = {"name": "capture-one-block", "ratio": one[1] / plain[1], "op": "<=", "target": 1.10}
    step_goal["rows"] = [plain, one]

    def generation(row_plain, row_capture, index):
        return APP_STEPS * row_plain[index] + len(steps) * (row_capture[index] - row_plain[index])

    app_rows = [
        [f"plain generation, {APP_STEPS} steps", APP_STEPS * plain[1], APP_STEPS * plain[2], plain[3]],
        [
            f"app default capture ({default_label}, {len(steps)} of {APP_STEPS} steps)",
            generation(plain, default, 1),
            generation(plain, default, 2),
            default[3],
        ],
    ]
    app_goal = {
        "name": "capture-app-default",
        "ratio": app_rows[1][1] / app_rows[0][1],
        "op": "<=",
        "target": 1.25,
        "rows": app_rows,
    }
    return [step_goal, app_goal]


def bench_ncut(device: str, dim: int = 1536, n_eig: int = 20, repeats: int = 2) -> float:
    """Median seconds of joint NCUT eigenvectors + t-SNE colours of 3 x 4429 tokens."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 4096 + TEXT_TOKENS, dim, generator=g)
    times = _interleaved(
        {"ncut": lambda: ncut_colors(features, n_eig=n_eig, seed=0, device=device)},
        torch.device(device),
        repeats,
    )
    return statistics.median(times["ncut"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-ncut", action="store_true")
    args = parser.parse_args()
    quick = args.device == "cpu"
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, quick {quick}")
    print_goals(goals(args.device, quick))
    if not args.skip_ncut:
        seconds = bench_ncut(args.device)
        print(f"\njoint NCUT eigenvectors + t-SNE colours, 3 x 4429 tokens x 1536 dims: {seconds:.2f} s")


if __name__ == "__main__":
    main()
