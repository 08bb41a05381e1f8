"""FID in-process, number for number the same as the ``pytorch-fid`` command: features, statistics, distance.

Everything that decides the value is pytorch-fid's: its ``InceptionV3`` (FID weights, bilinear resize to 299 px,
scaling to [-1, 1]), its preprocessing (RGB, ``ToTensor``'s division by 255), its file listing (image extensions
only, sorted), its float64 mean / ``np.cov`` and its ``calculate_frechet_distance``. The input pipeline is faster:
loader workers decode each file to uint8 and, on a CPU, already resize it to 299 px (the network's own resize is
then the identity); on CUDA the uint8 batches travel through pinned memory and are converted and resized on the
device, in larger batches; the network runs channels-last. The statistics stay those of pytorch-fid to float32
rounding (tested to 1e-6). What is added:

* ``--inception-weights FILE`` loads the FID Inception state dict from a file (machines without internet);
  by default pytorch-fid's own file in the torch hub cache is used (and downloaded there if missing).
* a statistics cache ``fid_stats.npz`` (layout.FID_STATS) in each image folder, readable by pytorch-fid (keys
  ``mu`` and ``sigma``) and reused only while the folder's fingerprint (file names, sizes, mtimes; dims; weights
  hash) is unchanged. It also keeps the features (float32 is exact: the network outputs float32) for KID.
* KID (polynomial kernel, unbiased MMD over random subsets) from the same features.
* one-line errors for unreadable images (naming the file) and one warning of the project's own when a set has
  fewer images than the feature size, instead of pytorch-fid's singular-matrix message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sd3_lora_celeba import layout
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.io import TMP_PREFIX, atomic_path, file_sha256
from sd3_lora_celeba.models.loading import resolve_device

log = logging.getLogger(__name__)

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # basename of pytorch_fid.inception.FID_WEIGHTS_URL
DIMS = (64, 192, 768, 2048)  # pytorch-fid's --dims choices (InceptionV3.BLOCK_INDEX_BY_DIM)
# Bump when anything that changes the features changes, so old caches are recomputed.
_CACHE_VERSION = 1


def default_inception_weights_path() -> Path:
    """Where pytorch-fid keeps its downloaded FID Inception weights: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


@dataclass
class FidInception:
    """pytorch-fid's InceptionV3 returning ``dims`` features, on ``device``, with the hash of its weights."""

    model: torch.nn.Module
    dims: int
    device: torch.device
    weights_sha256: str


def load_inception(
    dims: int = 2048, weights: Path | None = None, device: str | torch.device | None = None
) -> FidInception:
    """Build pytorch-fid's ``InceptionV3`` for ``dims`` features with the FID weights from ``weights``.

    ``weights=None`` lets pytorch-fid load its own file (downloading it into the torch hub cache if missing).
    """
    from pytorch_fid import inception as pf

    if dims not in DIMS:
        raise InputError(
            f"--dims {dims}: not a pytorch-fid feature size; use one of {', '.join(map(str, DIMS))}"
        )
    device = resolve_device(device)
    block = pf.InceptionV3.BLOCK_INDEX_BY_DIM[dims]
    if weights is None:
        path = default_inception_weights_path()
        try:
            model = pf.InceptionV3([block])
        except OSError as exc:  # URLError is an OSError: no internet and no cached file
            raise InputError(
                f"{path}: FID Inception weights not found and the download failed ({exc}); "
                f"pass --inception-weights FILE or put the file there"
            ) from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"{path}: Inception weights file not found; check --inception-weights")
        model = _inception_from_file(pf, block, path)
    # channels-last convolutions: 1.4x faster on a CPU (oneDNN) and the layout cuDNN prefers; the features
    # agree with pytorch-fid's contiguous ones to float32 rounding (tested: statistics to 1e-6).
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    return FidInception(model, dims, device, file_sha256(path))


def _inception_from_file(pf, block: int, path: Path) -> torch.nn.Module:
    """pytorch-fid's FID network with the weights of ``path``.

    pytorch-fid builds the network and loads the weights in one function, from the torch hub cache
    (``<hub dir>/checkpoints/<file name>``) when the file is there. So a private hub folder holding a link to
    ``path`` under that name is handed to it for the call: the architecture stays exactly pytorch-fid's.
    """
    import tempfile

    try:  # a readable state dict? (weights_only: no code runs from the file)
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors vary
        raise InputError(
            f"{path}: cannot read Inception weights ({type(exc).__name__}); pass a .pth state dict"
        ) from None
    # The raw setting (None = follow $TORCH_HOME), restored as it was: set_dir(get_dir()) would pin it.
    previous = getattr(torch.hub, "_hub_dir", None)
    with tempfile.TemporaryDirectory(prefix="sd3-fid-hub-") as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / FID_WEIGHTS_FILE).symlink_to(path.resolve())
        torch.hub.set_dir(hub)
        try:
            return pf.InceptionV3([block])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise InputError(
                f"{path}: not pytorch-fid's FID Inception state dict ({first}); use {FID_WEIGHTS_FILE}"
            ) from None
        finally:
            torch.hub._hub_dir = previous


# --- image folders -------------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[Path]:
    """The images pytorch-fid reads from ``folder``: its extensions, sorted; unfinished ``.tmp-`` files skipped."""
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS

    folder = Path(folder)
    files = sorted(p for ext in IMAGE_EXTENSIONS for p in folder.glob(f"*.{ext}"))
    return [p for p in files if not p.name.startswith(TMP_PREFIX)]


def folder_fingerprint(files: list[Path], dims: int, weights_sha256: str) -> str:
    """Hash of everything that decides a folder's statistics: file names, sizes and mtimes; dims; weights."""
    entries = []
    for p in files:
        st = p.stat()  # follows symlinks: a re-pointed link changes the fingerprint
        entries.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"version": _CACHE_VERSION, "dims": dims, "weights": weights_sha256, "files": entries}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


INCEPTION_SIZE = 299  # pytorch-fid resizes every image to 299 x 299 (bilinear, align_corners=False)


class DecodedImages(torch.utils.data.Dataset):
    """One image per item, decoded in a loader worker like pytorch-fid's ``ImagePathDataset`` + ``ToTensor``.

    Items are ``(tensor, (height, width), error)``: with ``resize`` the float [0, 1] image already resized to
    299 px (the CPU path: the work happens in the workers), else the uint8 (3, H, W) image (the CUDA path:
    a quarter of the bytes through pinned memory, converted on the device). An unreadable file gives
    ``error`` (one line naming it) instead of an exception, so the main process can report it as such.
    """

    def __init__(self, files: list[Path], resize: bool):
        self.files = files
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as img:
                array = np.array(img.convert("RGB"), copy=True)  # (H, W, 3) uint8, as ToTensor reads it
        except (OSError, SyntaxError, ValueError) as exc:  # truncated, corrupt or not an image
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            return torch.zeros(0), (0, 0), f"{path}: cannot read this image ({first}); replace or delete it"
        x = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
        size = (int(x.shape[1]), int(x.shape[2]))
        if self.resize:
            x = resize_for_inception(to_unit_float(x[None]))[0]
        return x, size, None


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] exactly as ``ToTensor`` does it (a division by 255, not a multiplication)."""
    return x.to(torch.float32).div(255)


def resize_for_inception(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, 299, 299), the interpolation of pytorch-fid's ``InceptionV3.forward``."""
    return torch.nn.functional.interpolate(
        x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
    )


def _collate(items):
    tensors, sizes, errors = zip(*items, strict=True)
    error = next((e for e in errors if e is not None), None)
    return (None if error else torch.stack(tensors)), list(sizes), error


def default_batch_size(device: torch.device) -> int:
    """pytorch-fid's 50 on a CPU; larger batches on CUDA, where a 50-image batch leaves the GPU idle."""
    return 200 if torch.device(device).type == "cuda" else 50


def image_features(
    files: list[Path],
    inception: FidInception,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    desc: str = "FID features",
) -> np.ndarray:
    """Inception features of ``files``, (N, dims) float32: pytorch-fid's ``get_activations``, faster input."""
    from tqdm.auto import tqdm

    on_cuda = inception.device.type == "cuda"
    # pytorch-fid clamps the batch size to the number of images.
    batch_size = max(1, min(batch_size or default_batch_size(inception.device), len(files)))
    loader = torch.utils.data.DataLoader(
        DecodedImages(files, resize=not on_cuda),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=on_cuda,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    features = np.empty((len(files), inception.dims), dtype=np.float32)
    first_size = None
    start = 0
    # disable=None: no bar when not a terminal; TQDM_DISABLE is how `sd3 --quiet` turns bars off.
    bar = tqdm(
        total=len(files), desc=desc, unit="img", disable=True if os.environ.get("TQDM_DISABLE") else None
    )
    with bar, torch.inference_mode():
        for batch, sizes, error in loader:
            if error is not None:
                raise InputError(error)
            first_size = first_size or sizes[0]
            if any(size != first_size for size in sizes):
                odd = files[start + next(i for i, size in enumerate(sizes) if size != first_size)]
                raise InputError(
                    f"{odd}: {odd.name} is not {first_size[1]}x{first_size[0]} like the others; FID (like "
                    f"pytorch-fid) needs one image size per folder"
                )
            batch = batch.to(inception.device, non_blocking=True)
            if on_cuda:
                batch = resize_for_inception(to_unit_float(batch))
            batch = batch.contiguous(memory_format=torch.channels_last)
            pred = inception.model(batch)[0]  # (B, dims, h, w); its resize of a 299 px input is the identity
            if pred.size(2) != 1 or pred.size(3) != 1:
                pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
            pred = pred.squeeze(3).squeeze(2).cpu().numpy()
            features[start : start + len(pred)] = pred
            start += len(pred)
            bar.update(len(pred))
    return features


# --- statistics ----------------------------------------------------------------------------------------------


@dataclass
class FidStats:
    """Mean and covariance of Inception features (float64, as pytorch-fid), plus the features when known."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    features: np.ndarray | None = None  # (N, D) float32

    @property
    def count(self) -> int | None:
        """Number of images behind the statistics (unknown for pytorch-fid's own .npz files)."""
        return None if self.features is None else int(len(self.features))

    @classmethod
    def from_features(cls, features: np.ndarray) -> FidStats:
        act = features.astype(np.float64)  # pytorch-fid accumulates into a float64 array
        return cls(mu=np.mean(act, axis=0), sigma=np.cov(act, rowvar=False), features=features)


def save_stats(path: Path, stats: FidStats, fingerprint: str | None = None) -> None:
    """Write a pytorch-fid compatible ``.npz`` (``mu``, ``sigma``) with our extras, atomically."""
    arrays: dict[str, np.ndarray] = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.features is not None:
        arrays["features"] = stats.features
    if fingerprint is not None:
        arrays["fingerprint"] = np.array(fingerprint)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file handle: np.savez would append .npz to a path
            np.savez_compressed(fh, **arrays)


def load_stats(path: Path) -> tuple[FidStats, str | None]:
    """Read a statistics ``.npz`` (ours or pytorch-fid's ``--save-stats``); returns (stats, fingerprint)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            stats = FidStats(
                mu=f["mu"][:],
                sigma=f["sigma"][:],
                features=f["features"][:] if "features" in f.files else None,
            )
            fingerprint = str(f["fingerprint"]) if "fingerprint" in f.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"{path}: not a statistics file with 'mu' and 'sigma' ({exc}); recompute it"
        ) from None
    return stats, fingerprint


def folder_statistics(
    folder: Path,
    inception: FidInception,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    use_cache: bool = True,
) -> FidStats:
    """Statistics of an image folder, from its ``fid_stats.npz`` cache when the folder has not changed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found")
    files = list_images(folder)
    if len(files) < 2:
        raise InputError(f"{folder}: {len(files)} image(s); FID needs at least 2 (png/jpg/... files)")
    cache = folder / layout.FID_STATS
    fingerprint = folder_fingerprint(files, inception.dims, inception.weights_sha256)
    if use_cache and cache.is_file():
        try:
            stats, cached_fingerprint = load_stats(cache)
        except InputError:
            cached_fingerprint = None
        if cached_fingerprint == fingerprint:
            log.info("%s: reusing cached FID statistics (%d images)", folder, len(files))
            return stats
    stats = FidStats.from_features(
        image_features(
            files, inception, batch_size=batch_size, num_workers=num_workers, desc=f"FID {folder.name}"
        )
    )
    if use_cache:
        try:
            save_stats(cache, stats, fingerprint)
        except OSError as exc:  # a read-only ground-truth folder still gets its FID
            log.warning("%s: cannot write the statistics cache (%s)", cache, exc)
    return stats


def path_statistics(path: Path, inception: FidInception | None, **kwargs) -> FidStats:
    """Statistics of an image folder or of a ``.npz`` file, as pytorch-fid accepts either."""
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise InputError(f"{path}: statistics file not found")
        return load_stats(path)[0]
    if inception is None:
        raise ValueError("an image folder needs the Inception network")
    return folder_statistics(path, inception, **kwargs)


# --- distances -----------------------------------------------------------------------------------------------


def warn_if_few_images(counts: dict[str, int], dims: int, what: str = "FID") -> None:
    """The project's one-line warning when a set has fewer images than the feature size: its covariance is
    then singular, and FID (or KID) on it is noisy and biased, whatever pytorch-fid prints."""
    few = {name: n for name, n in counts.items() if n is not None and n < dims}
    if few:
        listed = ", ".join(f"{name}: {n}" for name, n in few.items())
        log.warning(
            "%s on fewer images than the %d feature dimensions (%s): the value is not reliable; use at least "
            "%d images per set or a smaller --dims for a rough check",
            what,
            dims,
            listed,
            dims,
        )


def frechet_distance(a: FidStats, b: FidStats) -> float:
    """FID = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with pytorch-fid's stable implementation.

    pytorch-fid's own message about a singular product (and scipy's warnings) are kept off the terminal; the
    caller warns about small image counts once with :func:`warn_if_few_images`.
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    if a.mu.shape != b.mu.shape:
        raise InputError(
            f"feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}); compute both with the same --dims"
        )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    if printed.getvalue().strip():
        log.info("FID: the covariance product is singular; pytorch-fid's small diagonal offset was added")
    return value


def kernel_inception_distance(
    x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel k(a, b) = (a.b / D + 1)^3, averaged over random subsets.

    Binkowski et al. 2018, "Demystifying MMD GANs", eq. 3 estimator. Returns (mean, std) over the subsets.
    """
    x = np.asarray(x, dtype=np.float64)  # (N, D)
    y = np.asarray(y, dtype=np.float64)  # (M, D)
    d = x.shape[1]
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise InputError("KID needs at least 2 images in each set")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        k_aa = (a @ a.T / d + 1) ** 3
        k_bb = (b @ b.T / d + 1) ** 3
        k_ab = (a @ b.T / d + 1) ** 3
        values[i] = (
            (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
            + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
            - 2 * k_ab.mean()
        )
    return float(values.mean()), float(values.std())


def default_num_workers() -> int:
    """pytorch-fid's default: min(8, available CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, 8)
