"""Benchmark of the attention visualisation: capture overhead per denoising step, and joint NCUT time.

One denoising step = one SD3 transformer call on a classifier-free-guidance batch of 2 ([uncond, cond]). The
capture records every block (the worst case). Two transformer sizes:

* ``tiny``: the test model (64 px, 16 image + 333 text tokens);
* ``mid``: a few MM-DiT blocks at SD3's 1024 px token count (64 x 64 = 4096 image + 77 CLIP + 256 T5 = 4429
  tokens); ``--mid-heads 24`` gives SD3-medium's block width (1536), for a GPU.

NCUT: random features of 3 images x 4429 tokens x ``--ncut-dim`` (1536, SD3-medium's width), joint fit; the
eigenvectors and the t-SNE colouring are timed separately.

    python benchmarks/bench_attention.py                 # CPU
    python benchmarks/bench_attention.py --device cuda --mid-heads 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sd3_lora_celeba.visualize.capture import capture_attention
from sd3_lora_celeba.visualize.ncut import ncut_colors, ncut_eigenvectors

TEXT_TOKENS = 77 + 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    return _time_pair(fn, None, device, repeats)[0]


def _time_pair(fn_a, fn_b, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn_a`` and ``fn_b``, run alternately so load changes on a shared machine hit both."""
    fns = [f for f in (fn_a, fn_b) if f is not None]
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:  # warm-up
        f()
    _sync(device)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    return medians[0], medians[-1]


def _transformer(kind: str, heads: int, layers: int, device: torch.device, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    if kind == "tiny":
        sample, heads, layers, joint = 8, 2, 24, 64
    else:
        sample, joint = 128, heads * 64  # latent 128 -> 64 x 64 patches = 4096 image tokens
    model = SD3Transformer2DModel(
        sample_size=sample,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=64 if kind == "mid" else 16,
        num_attention_heads=heads,
        joint_attention_dim=joint,
        caption_projection_dim=heads * (64 if kind == "mid" else 16),
        pooled_projection_dim=48,
        out_channels=16,
        pos_embed_max_size=sample,
    )
    return model.to(device, dtype).eval(), sample, joint


@torch.no_grad()
def bench_capture(kind: str, heads: int, layers: int, device: torch.device, dtype: torch.dtype, repeats: int):
    model, sample, joint = _transformer(kind, heads, layers, device, dtype)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 16, sample, sample, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(2, TEXT_TOKENS, joint, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(2, 48, generator=g).to(device, dtype),
        "timestep": torch.full((2,), 500.0, device=device),
    }

    def step_off():
        model(**inputs)

    def step_on():
        with capture_attention(model, cfg=True) as capture:
            model(**inputs)
        capture.maps()

    off, on = _time_pair(step_off, step_on, device, repeats)
    tokens = (sample // 2) ** 2 + TEXT_TOKENS
    blocks = len(model.transformer_blocks)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return f"{kind} ({blocks} blocks, width {width}, {tokens} tokens)", off, on


def bench_ncut(device: str, dim: int, n_eig: int, repeats: int):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 4096 + TEXT_TOKENS, dim, generator=g)  # 3 images x 4429 tokens
    dev = torch.device(device)
    eig = _time(lambda: ncut_eigenvectors(features, n_eig=n_eig, seed=0, device=device), dev, repeats)
    total = _time(
        lambda: ncut_colors(
            features.reshape(3, -1, dim)[:, :4096], (64, 64), n_eig=n_eig, seed=0, device=device
        ),
        dev,
        max(1, repeats // 2),
    )
    return eig, total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--mid-heads", type=int, default=4, help="heads (x 64 dims) of the mid-size model")
    parser.add_argument("--mid-layers", type=int, default=2)
    parser.add_argument("--ncut-dim", type=int, default=1536)
    parser.add_argument("--n-eig", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-mid", action="store_true", help="only the tiny model (fast)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    print(f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    rows = [bench_capture("tiny", 2, 24, device, dtype, 5 * args.repeats)]
    if not args.skip_mid:
        rows.append(bench_capture("mid", args.mid_heads, args.mid_layers, device, dtype, args.repeats))
    print("\ncapture overhead per denoising step (CFG batch 2, every block captured)")
    print(f"{'model':<48} {'off (ms)':>10} {'on (ms)':>10} {'ratio':>7}")
    for name, off, on in rows:
        print(f"{name:<48} {off * 1e3:>10.1f} {on * 1e3:>10.1f} {on / off:>7.2f}")

    eig, total = bench_ncut(args.device, args.ncut_dim, args.n_eig, max(1, args.repeats - 1))
    print(
        f"\njoint NCUT, 3 x 4429 tokens x {args.ncut_dim} dims, {args.n_eig} eigenvectors, on {args.device}"
    )
    print(f"{'eigenvectors (s)':>18} {'eigenvectors + t-SNE colours, 3 x 4096 (s)':>44}")
    print(f"{eig:>18.2f} {total:>44.2f}")


if __name__ == "__main__":
    main()
