"""``sd3 fid REAL GEN``: FID (and optionally KID) between two image folders or ``.npz`` statistics files.

Prints ``FID: <value>`` like the ``pytorch-fid`` command, and gives the same value on the same folders, but runs
in-process and caches each folder's statistics in ``fid_stats.npz`` (pytorch-fid compatible), so comparing many
generated folders with one ground truth extracts the ground-truth features once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from sd3_lora_celeba.config import argument, check_bounds, option
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.evaluate import fid as F

log = logging.getLogger(__name__)


@dataclass
class FidConfig:
    real: Path = argument("Ground-truth image folder, or a .npz statistics file (pytorch-fid's or ours).")
    gen: Path = argument("Generated image folder, or a .npz statistics file.")
    dims: int = option(2048, "Inception feature size (pytorch-fid's --dims): 64, 192, 768 or 2048.")
    batch_size: int | None = option(
        None, "Images per Inception forward pass; default 50 (pytorch-fid's) on a CPU, 200 on CUDA.", min=1
    )
    num_workers: int | None = option(
        None, "DataLoader worker processes (decode and resize); default min(8, CPUs) like pytorch-fid.", min=0
    )
    device: str | None = option(None, "Torch device, e.g. cpu, cuda, cuda:1; default cuda if available.")
    inception_weights: Path | None = option(
        None,
        "FID Inception weights file (pt_inception-2015-12-05-6726825d.pth); default pytorch-fid's own copy in "
        "$TORCH_HOME/hub/checkpoints/, downloaded there if missing.",
    )
    cache: bool = option(True, "Read and write each folder's fid_stats.npz statistics cache.")
    kid: bool = option(False, "Also compute KID (polynomial kernel) from the same features.")
    kid_subsets: int = option(100, "KID: number of random subsets.", min=1, max=100_000)
    kid_subset_size: int = option(1000, "KID: images per subset (capped at the smaller set size).", min=2)
    seed: int = option(0, "KID: seed of the subset sampling.")

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.dims not in F.DIMS:
            raise ValueError(f"--dims {self.dims}: use one of {', '.join(map(str, F.DIMS))}")


def fid(config: FidConfig) -> dict[str, Any]:
    """Compute FID (and KID) between ``config.real`` and ``config.gen``; print and return the values."""
    paths = [Path(config.real), Path(config.gen)]
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: not found; pass an image folder or a .npz statistics file")
    need_network = any(p.suffix != ".npz" for p in paths)
    inception = (
        F.load_inception(config.dims, config.inception_weights, config.device) if need_network else None
    )
    num_workers = F.default_num_workers() if config.num_workers is None else config.num_workers
    stats = [
        F.path_statistics(
            p, inception, batch_size=config.batch_size, num_workers=num_workers, use_cache=config.cache
        )
        for p in paths
    ]
    F.warn_if_few_images(
        {str(p): s.count for p, s in zip(paths, stats, strict=True)},
        stats[0].mu.shape[0],
        "FID/KID" if config.kid else "FID",
    )
    result: dict[str, Any] = {"fid": F.frechet_distance(*stats)}
    click.echo(f"FID: {result['fid']!r}")
    if config.kid:
        for p, s in zip(paths, stats, strict=True):
            if s.features is None:
                raise InputError(
                    f"{p}: holds no features (pytorch-fid statistics); pass the image folder for --kid"
                )
        mean, std = F.kernel_inception_distance(
            stats[0].features,
            stats[1].features,
            num_subsets=config.kid_subsets,
            subset_size=config.kid_subset_size,
            seed=config.seed,
        )
        result.update(kid=mean, kid_std=std)
        click.echo(f"KID: {mean!r} +- {std!r}")
    return result
