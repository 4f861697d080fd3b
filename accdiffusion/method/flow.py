"""How a model family samples, as far as the tiled pass needs to know: the noise scaling, the
timestep the cosine factors read, the latent grid the model takes, the attention-map grid.

SD (ε / v, variance exploding in k-diffusion's terms): x_σ = x₀ + σ·ε; the cosine factors read the
sampler's own discrete timestep (0…1000).

Flow matching (Flux, Chroma, SD 3.5; Forge backend/modules/k_prediction.py ``prediction_type``
'const'): x_σ = (1 − σ)·x₀ + σ·ε with σ ∈ [0, 1] (``AbstractPrediction.noise_scaling``, :94-97),
and the model's denoised output is D(x) = x − σ·v(x) (``calculate_denoised``, :91-92), so
c_skip = 1 exactly as for ε: the dilated branch re-adds detail unscaled. The flow time σ is the
fraction of the schedule; the cosine factors read t = 1000·σ (Forge's SD 3.5 predictor says the
same, ``PredictionDiscreteFlow.timestep``; its Flux predictor hands the sampler t = σ, which on the
0…1000 scale of the factors would read as "no noise" at every step).

Both noise scalings are exact: the skip residual re-noises its reference with the very formula
the model was trained on and the sampler starts from (``sample_img2img`` calls the predictor's
``noise_scaling``, modules/sd_samplers_kdiffusion.py:147).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import NUM_TRAIN_TIMESTEPS, SigmaToT

# (sigma, noise, clean latent) -> the noisy latent at sigma
NoiseScaling = Callable[[torch.Tensor | float, torch.Tensor, torch.Tensor], torch.Tensor]


def ve_noise_scaling(sigma: torch.Tensor | float, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x₀ + σ·ε (ε- and v-prediction models in k-diffusion's parametrisation)."""
    return x0 + noise * _scalar_or_batch(sigma, noise)


def flow_noise_scaling(sigma: torch.Tensor | float, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(1 − σ)·x₀ + σ·ε (rectified flow)."""
    s = _scalar_or_batch(sigma, noise)
    return x0 * (1.0 - s) + noise * s


def _scalar_or_batch(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
        return sigma.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return float(torch.as_tensor(sigma).reshape(-1)[0])


def flow_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """The flow time on the cosine factors' 0…1000 scale."""
    return torch.as_tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS


def flow_t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class ModelSampling:
    """What the tiled pass needs to know about how a model samples (the backend builds it)."""
    noise_scaling: NoiseScaling = ve_noise_scaling
    # sigma -> t on the 0…1000 scale of the cosine factors; None: the sampler's own sigma_to_t
    sigma_to_t: SigmaToT | None = None
    # t (0…1000) -> sigma for the probe's levels; None: the sampler's own t_to_sigma
    t_to_sigma: SigmaToT | None = None
    # latent sizes the model takes: sub-latents are padded to it, window corners aligned to it
    size_multiple: int = 8
    # latent pixels per attention-map cell (SD: the recorded ds-4 level; DiT: its patch size)
    map_downsample: int = 4
    flow: bool = False


SD_SAMPLING = ModelSampling()
# Flux, Chroma and SD 3.5 on latent patches of 2×2 (Forge backend/nn/flux.py:404, mmditx.py:746)
FLOW_SAMPLING = ModelSampling(noise_scaling=flow_noise_scaling, sigma_to_t=flow_sigma_to_t,
                              t_to_sigma=flow_t_to_sigma, size_multiple=2, map_downsample=2, flow=True)
