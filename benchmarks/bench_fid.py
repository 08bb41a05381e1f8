"""Benchmark: images/s of ``sd3 fid``'s in-process statistics vs the ``pytorch-fid`` command, same folder.

Both sides compute the Inception statistics of one folder of synthetic images (pytorch-fid:
``pytorch-fid --save-stats FOLDER out.npz``, a fresh process as a user runs it; ours: ``folder_statistics`` in
this process, first without the cache, then with the cache hit). The Frechet distance itself (a 2048 x 2048
``sqrtm``, about a minute on one CPU core, identical code on both sides) is left out. Random Inception weights
are used so that it runs offline; the speed does not depend on the weight values.

    python benchmarks/bench_fid.py [--num-images 64] [--device cpu] [--batch-size 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images in px")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args()

    import torch

    from sd3_lora_celeba.evaluate import fid as F
    from sd3_lora_celeba.testing.inception import install_inception_weights, write_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.num_images):
            Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
        weights = write_random_inception_weights(root / "inception.pth")
        torch_home = root / "torch-home"
        install_inception_weights(weights, torch_home)

        exe = str(Path(sys.executable).with_name("pytorch-fid"))
        env = {**os.environ, "TORCH_HOME": str(torch_home)}
        cmd = [exe, "--save-stats", "--device", args.device, "--batch-size", str(args.batch_size)]
        cmd += ["--num-workers", str(args.num_workers), str(folder), str(root / "theirs.npz")]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        theirs_s = time.perf_counter() - start

        start = time.perf_counter()
        inception = F.load_inception(2048, weights, args.device)
        kwargs = dict(batch_size=args.batch_size, num_workers=args.num_workers)
        ours_stats = F.folder_statistics(folder, inception, use_cache=True, **kwargs)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        F.folder_statistics(folder, inception, use_cache=True, **kwargs)
        cached_s = time.perf_counter() - start

        with np.load(root / "theirs.npz") as f:
            same = np.allclose(f["mu"], ours_stats.mu, atol=1e-6) and np.allclose(
                f["sigma"], ours_stats.sigma, atol=1e-6
            )

    n = args.num_images
    print(
        f"device {args.device}, {n} images {args.size}px, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"pytorch-fid command (new process): {theirs_s:7.2f} s  {n / theirs_s:7.2f} img/s")
    print(f"sd3 fid in-process (no cache):      {ours_s:7.2f} s  {n / ours_s:7.2f} img/s")
    print(f"sd3 fid in-process (cache hit):     {cached_s:7.2f} s  {n / cached_s:7.1f} img/s")
    print(f"speed-up vs pytorch-fid: {theirs_s / ours_s:.2f}x uncached, {theirs_s / cached_s:.0f}x cached")
    print(f"statistics identical to pytorch-fid's: {same}")


if __name__ == "__main__":
    main()
