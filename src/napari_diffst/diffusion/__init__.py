"""Diffusion process and samplers of the Diff-ST engine (no network inside).

* :mod:`.schedule` — noise schedules, forward process (Diff-ST Eq. 1), posterior, reverse step (Eq. 2),
  ε / x₀ / v conversions, masked training loss, respacing;
* :mod:`.samplers` — DDPM / respaced / DDIM samplers as generators and the ``sample`` mean/std helper.
"""
from .schedule import (GaussianDiffusion, NoiseSchedule, SpacedDiffusion, alphas_cumprod_from_betas,
                       betas_from_alphas_cumprod, cosine_betas, linear_betas, make_betas, masked_mse,
                       space_timesteps, to_diffusion_units, to_model_units)
from .samplers import (ddim_sample_progressive, ddpm_sample_progressive, diffusion_for_model, final_sample,
                       sample, sample_progressive)

__all__ = [
    "GaussianDiffusion", "NoiseSchedule", "SpacedDiffusion", "alphas_cumprod_from_betas",
    "betas_from_alphas_cumprod", "cosine_betas", "linear_betas", "make_betas", "masked_mse", "space_timesteps",
    "to_diffusion_units", "to_model_units", "ddim_sample_progressive", "ddpm_sample_progressive",
    "diffusion_for_model", "final_sample", "sample", "sample_progressive",
]
