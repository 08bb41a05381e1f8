"""Benchmark the Inception statistics of ``sd3 fid`` against pytorch-fid's own functions, same images.

    python benchmarks/bench_fid.py --quick                 # CPU goal: CPU time, 32 images of 512 px
    python benchmarks/bench_fid.py --device cuda           # GPU goal: wall time, 1000 images of 1024 px

Both sides run in this process, on the same network weights (pytorch-fid's ``InceptionV3``, random weights so
that it runs offline: the speed does not depend on the values) and the same folder of generated-looking PNGs,
statistics cache off:

* ``pytorch-fid``: ``pytorch_fid.fid_score.calculate_activation_statistics`` (what the ``pytorch-fid`` command
  runs per folder) with its defaults: batch 50, ``min(8, CPUs)`` workers.
* ``ours``: ``evaluate.fid.image_features`` + ``FidStats.from_features`` (``sd3 fid``'s path) with its defaults:
  decode (and on a CPU resize) in the workers, channels-last convolutions, uint8 through pinned memory and
  batch 200 on CUDA.

The Frechet distance itself (identical code on both sides) is left out. Repeats are interleaved (3), with
``gc.collect()`` between configurations. CPU time counts this process and its reaped loader workers
(``os.times``), so work moved into the workers is not hidden. Goal ``fid``: pytorch-fid / ours >= 1.0 in CPU
time on a CPU, >= 2.0 in wall time on CUDA; the statistics must agree to 1e-6.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from run_all import print_goals


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """Smooth random images (PNG, like generate-images writes), so decoding costs what real ones do."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"hq-{i:05d}.png")
    from sd3_lora_celeba.evaluate import fid as F

    return F.list_images(folder)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(device: torch.device, quick: bool, repeats: int = 3) -> dict:
    from pytorch_fid.fid_score import calculate_activation_statistics

    from sd3_lora_celeba.evaluate import fid as F
    from sd3_lora_celeba.testing.inception import write_random_inception_weights

    cuda = device.type == "cuda"
    n, size = (1000, 1024) if cuda else ((32, 512) if quick else (64, 512))
    workers = F.default_num_workers()
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        root = Path(tmp)
        files = write_images(root / "images", n, size)
        inception = F.load_inception(2048, write_random_inception_weights(root / "inception.pth"), device)

        # pytorch-fid's network as pytorch-fid builds it (ours runs channels-last).
        plain_model = copy.deepcopy(inception.model).to(memory_format=torch.contiguous_format)

        def theirs():
            mu, sigma = calculate_activation_statistics(
                [str(f) for f in files], plain_model, batch_size=50, dims=2048, device=device,
                num_workers=workers,
            )  # fmt: skip
            return mu, sigma

        def ours():
            stats = F.FidStats.from_features(F.image_features(files, inception, num_workers=workers))
            return stats.mu, stats.sigma

        configs = {"pytorch-fid": theirs, "ours": ours}
        wall: dict[str, list[float]] = {k: [] for k in configs}
        cpu: dict[str, list[float]] = {k: [] for k in configs}
        results = {}
        for _ in range(repeats):
            for name, run in configs.items():
                gc.collect()
                if cuda:
                    torch.cuda.synchronize()
                w0, c0 = time.perf_counter(), _cpu_seconds()
                results[name] = run()
                if cuda:
                    torch.cuda.synchronize()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(_cpu_seconds() - c0)
        (mu_a, sig_a), (mu_b, sig_b) = results["pytorch-fid"], results["ours"]
        diff = max(float(np.abs(mu_a - mu_b).max()), float(np.abs(sig_a - sig_b).max()))
    return {"wall": wall, "cpu": cpu, "n": n, "size": size, "workers": workers, "max_stat_diff": diff}


def goals(device: str, quick: bool) -> list[dict]:
    m = measure(torch.device(device), quick)
    rows = []
    for name in m["wall"]:
        rows.append(
            [
                f"{name} wall, {m['n']} x {m['size']} px",
                statistics.median(m["wall"][name]),
                min(m["wall"][name]),
                None,
            ]
        )
        rows.append(
            [
                f"{name} CPU time ({m['workers']} workers)",
                statistics.median(m["cpu"][name]),
                min(m["cpu"][name]),
                None,
            ]
        )
    rows.append([f"max |difference| of mu and sigma: {m['max_stat_diff']:.2e}", None, None, None])
    key, target = ("wall", 2.0) if device.startswith("cuda") else ("cpu", 1.0)
    ratio = statistics.median(m[key]["pytorch-fid"]) / statistics.median(m[key]["ours"])
    if m["max_stat_diff"] > 1e-6:
        ratio = 0.0  # not the same statistics: the goal cannot be met
    return [{"name": "fid", "ratio": ratio, "op": ">=", "target": target, "rows": rows}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_fid: no CUDA device here; use --device cpu")
        return 2
    print_goals(goals(args.device, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
