"""Each function of train/flow.py alone, against diffusers' training utilities and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sd3_lora_celeba.train import flow


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "sigma_sqrt", "cosmap", "none"])
def test_density_matches_diffusers(scheme):
    kwargs = {"logit_mean": -0.5, "logit_std": 1.3, "mode_scale": 1.29}
    ours = flow.sample_density(scheme, 4096, generator=torch.Generator().manual_seed(3), **kwargs)
    theirs = compute_density_for_timestep_sampling(
        scheme, 4096, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert ours.shape == (4096,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal", "mode", "none"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.05, 0.95, 19)
    torch.testing.assert_close(
        flow.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas)
    )


def test_shift_matches_scheduler_and_fixes_endpoints():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1.0, 1 / 1000, 1000)  # the scheduler's sigmas before its shift
    torch.testing.assert_close(
        flow.shift_sigmas(unshifted, 3.0), scheduler.sigmas.float(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(flow.shift_sigmas(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    assert float(flow.shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    torch.testing.assert_close(flow.shift_sigmas(unshifted, 1.0), unshifted)


def test_diffusers_convention_equals_the_seed_index_lookup():
    """The seed looks u up in the descending shifted schedule; our 'diffusers' convention is its continuous form."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = flow.sample_density("logit_normal", 2000, logit_mean=-0.5, generator=torch.Generator().manual_seed(0))
    seed_sigmas = scheduler.sigmas[(u * 1000).long()]
    ours = flow.shift_sigmas(flow.density_to_sigmas(u, "diffusers"), 3.0)
    assert (
        float((ours - seed_sigmas).abs().max()) < 3.1e-3
    )  # the seed rounds u to 1/1000; the shift slope is <= 3


def _median_sigma(mean: float, convention: str, shift: float = 3.0) -> float:
    u = flow.sample_density(
        "logit_normal", 20000, logit_mean=mean, generator=torch.Generator().manual_seed(1)
    )
    return float(flow.shift_sigmas(flow.density_to_sigmas(u, convention), shift).median())


def test_direction_of_a_negative_logit_mean():
    # Numbers stated in the flow.py docstring.
    assert _median_sigma(-0.5, "diffusers") == pytest.approx(0.83, abs=0.01)
    assert _median_sigma(0.0, "diffusers") == pytest.approx(0.75, abs=0.01)
    assert _median_sigma(0.5, "diffusers") == pytest.approx(0.64, abs=0.01)
    assert _median_sigma(-0.5, "paper") == pytest.approx(0.65, abs=0.01)
    # diffusers convention: negative mean -> more noise; paper convention: negative mean -> less noise.
    assert _median_sigma(-0.5, "diffusers") > _median_sigma(0.0, "diffusers")
    assert _median_sigma(-0.5, "paper") < _median_sigma(0.0, "paper")
    # The shift always moves samples toward noise.
    assert _median_sigma(-0.5, "paper", shift=3.0) > _median_sigma(-0.5, "paper", shift=1.0)


def test_mode_density_is_heavier_in_the_middle():
    u = flow.sample_density("mode", 20000, mode_scale=1.29, generator=torch.Generator().manual_seed(0))
    middle = ((u > 0.25) & (u < 0.75)).float().mean()
    assert float(middle) > 0.6  # uniform would give 0.5


def test_timesteps_and_noising():
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(flow.sigmas_to_timesteps(sigmas), torch.tensor([0.0, 250.0, 1000.0]))
    noisy = flow.add_noise(latents, noise, sigmas)
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])


def test_targets_and_preconditioning():
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigmas = torch.tensor([0.3, 0.8])
    noisy = flow.add_noise(latents, noise, sigmas)
    velocity = flow.velocity_target(latents, noise)
    # A perfect velocity prediction gives back x0 exactly.
    torch.testing.assert_close(
        flow.precondition_outputs(velocity, noisy, sigmas), latents, rtol=1e-5, atol=1e-5
    )
    # The x0 loss is the velocity loss scaled by sigma^2.
    pred = velocity + 0.1 * torch.randn_like(velocity)
    x0_err = (flow.precondition_outputs(pred, noisy, sigmas) - latents).square().flatten(1).mean(1)
    v_err = (pred - velocity).square().flatten(1).mean(1)
    torch.testing.assert_close(x0_err, sigmas**2 * v_err, rtol=1e-4, atol=1e-6)


def test_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    loss = flow.weighted_mse(pred, target, torch.tensor([1.0, 0.5]))
    assert float(loss) == pytest.approx((1.0 * 1 + 0.5 * 4) / 2)


def test_sigma_histogram():
    hist = flow.sigma_histogram(torch.tensor([0.0, 0.05, 0.55, 0.99, 1.0]))
    assert hist == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert sum(flow.sigma_histogram(torch.rand(100))) == 100
    assert not math.isnan(sum(hist))
