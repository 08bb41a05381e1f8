"""Rectified-flow maths of SD3 training: pure functions of tensors, each tested alone.

References are to Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
(the SD3 paper, arXiv:2403.03206v1).

Conventions (diffusers' names): ``latents`` is the clean image latent x0, ``noise`` is eps ~ N(0, I), ``sigmas``
is the noise level s in [0, 1] (s = 1 is pure noise), ``timesteps = 1000 * sigmas`` is what the SD3 transformer
takes.

Which way does a negative ``--logit-mean`` push? It depends on how the density sample ``u`` becomes a sigma:

* ``density_convention="diffusers"`` (default, the seed's behaviour): the seed, like diffusers'
  ``train_dreambooth_lora_sd3.py``, looks ``u`` up in the *descending* shifted schedule
  ``scheduler.sigmas[int(u * 1000)]``, i.e. ``sigma = shift(1 - u)``. A negative logit mean puts more ``u`` near
  0, so **more samples at HIGH sigma (more noise: composition and coarse structure)**. With ``m = -0.5``,
  ``logit_std = 1`` and ``shift = 3`` the median sigma is 0.83 (0.75 for ``m = 0``, 0.64 for ``m = +0.5``).
* ``density_convention="paper"``: the paper's t is the noise level, ``sigma = shift(u)``. A negative logit mean
  puts **more samples at LOW sigma (less noise: fine detail)**. With ``m = -0.5`` and ``shift = 3`` the median
  sigma is 0.65.

In both conventions the shift (applied after the density, Eq. 23) moves every sample toward higher noise.
``tests/train/test_train_flow.py`` checks these numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sd3_lora_celeba.seeding import derive_seed

WeightingScheme = Literal["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"]
DensityConvention = Literal["diffusers", "paper"]
NUM_TRAIN_TIMESTEPS = 1000


def sample_density(
    weighting_scheme: str,
    batch_size: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``u`` in (0, 1) from the timestep density of ``weighting_scheme``; shape (B,), float32, CPU.

    * ``logit_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std)`` (paper Eq. 19, "lognorm(m, s)").
    * ``mode``: ``u = 1 - v - mode_scale * (cos(pi v / 2)^2 - 1 + v)``, ``v ~ U(0, 1)`` (paper Eq. 20, mode
      sampling with heavy tails); ``mode_scale`` must lie in [-1, 2/(pi-2)] for a valid density.
    * ``sigma_sqrt``, ``cosmap``, ``none``: uniform; those schemes act through the loss weight instead
      (:func:`loss_weighting`).
    """
    if weighting_scheme == "logit_normal":
        n = torch.randn(batch_size, generator=generator) * logit_std + logit_mean
        return torch.sigmoid(n)
    v = torch.rand(batch_size, generator=generator)
    if weighting_scheme == "mode":
        return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    return v


def density_to_sigmas(u: torch.Tensor, convention: str = "diffusers") -> torch.Tensor:
    """Unshifted noise level of a density sample (see the module docstring for the two conventions)."""
    if convention == "diffusers":
        # The seed indexes the descending schedule with u: index 0 is sigma = 1.
        return 1 - u
    if convention == "paper":
        return u
    raise ValueError(f"unknown density convention {convention!r}; use diffusers or paper")


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution-dependent timestep shift, paper Eq. 23: ``s' = shift * s / (1 + (shift - 1) * s)``.

    ``shift > 1`` spends more of the training on noisy inputs, which high resolutions need because a given
    noise level destroys less of a larger image. SD3-medium's scheduler uses ``shift = 3``.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """SD3 transformer timesteps for noise levels: ``1000 * sigma`` (diffusers' FlowMatchEulerDiscreteScheduler)."""
    return sigmas * NUM_TRAIN_TIMESTEPS


def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast over latents of shape (B, C, H, W)."""
    return sigmas.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified-flow forward process, paper Eq. 3 with a_t = 1 - t, b_t = t: ``x_t = (1 - s) x0 + s eps``."""
    s = _expand(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity ``dx_t/dt = eps - x0`` (paper Eq. 1 for the straight path), the model's output."""
    return noise - latents


def precondition_outputs(
    model_pred: torch.Tensor, noisy_latents: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """x0 estimate from a velocity prediction: ``x0_hat = x_t - s * v_hat``.

    Training on ``x0_hat`` against ``x0`` (the seed's choice) equals the velocity loss scaled by ``s^2``, since
    ``x0_hat - x0 = -s (v_hat - v)``; it down-weights low-noise samples.
    """
    return noisy_latents - _expand(sigmas, noisy_latents) * model_pred


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight, shape (B,).

    * ``sigma_sqrt``: ``s^-2`` (the paper's "eps-prediction" style weight, Section 3.1, w_t = t^-2 up to a_t);
    * ``cosmap``: ``2 / (pi (1 - 2 s + 2 s^2))`` (paper Eq. 21, the density of the cosine map);
    * otherwise 1: ``logit_normal`` and ``mode`` act through the timestep density instead.
    """
    if weighting_scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def weighted_mse(model_pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``weighting * mean((model_pred - target)^2)`` per sample; computed in fp32."""
    per_sample = (model_pred.float() - target.float()).square().flatten(1).mean(1)  # (B,)
    return (weighting.to(per_sample.device) * per_sample).mean()


def sigma_histogram(sigmas: torch.Tensor, bins: int = 10) -> list[int]:
    """Counts of ``sigmas`` in ``bins`` equal bins over [0, 1]: what noise levels a step actually trained on."""
    return [int(c) for c in torch.histc(sigmas.detach().float().cpu(), bins=bins, min=0.0, max=1.0)]


@dataclass(frozen=True)
class NoiseDraw:
    """Draws one training sample's diffusion noise and noise level from its sample seed.

    The cached dataset calls it in ``__getitem__`` (so in the loader workers): a sample's noise depends on its
    seed only, not on the batch it lands in, the process that reads it or whether the run was resumed.
    Picklable, for worker processes.
    """

    weighting_scheme: str
    shift: float
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    density_convention: str = "diffusers"

    def __call__(
        self, sample_seed: int, latent_shape: torch.Size, out: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"sigmas": () float32, "noise": latent_shape float32}``, drawn in this order from a generator of
        its own, seeded from ``sample_seed`` (apart from the dataset's draws of the same sample). ``out``: a
        float32 tensor of ``latent_shape`` to draw the noise into (a row of a batch buffer)."""
        generator = torch.Generator().manual_seed(derive_seed(sample_seed, "flow"))
        u = sample_density(
            self.weighting_scheme,
            1,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        sigmas = shift_sigmas(density_to_sigmas(u, self.density_convention), self.shift)
        return {"sigmas": sigmas[0], "noise": torch.randn(tuple(latent_shape), generator=generator, out=out)}
