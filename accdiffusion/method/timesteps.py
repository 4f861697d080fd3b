"""The WebUI's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) seen from the tiled pass.

A k-diffusion sampler calls its CFG denoiser with x = x₀ + σ·ε and σ and wants the denoised x₀
back. A timestep sampler calls it with the DDPM latent x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε and the
training timestep t and wants ε back. Both describe one state:

    σ_t = √((1 − ᾱ_t) / ᾱ_t),   x = x_t / √ᾱ_t = x_t·√(σ_t² + 1),   x₀ = x − σ_t·ε.

So the tiled pass keeps working in the k-diffusion frame (its windows, dilated branch, skip
residual and cosine factors are written for it), and a host converts at the boundary: the call's
(x_t, t) becomes (x, σ) going in, each UNet evaluation of a window converts back to (x_t, t) with
the *same* t the sampler asked for, and the fused x₀ leaves as ε. Every conversion is linear in the
latent, so nothing inside the pass changes: the dilated branch's D(x_blur) + c_skip·(x − x_blur) and
the skip residual are the same expressions as for a k-diffusion sampler.

Pure torch; the hosts give the schedule (A1111: the model's ``alphas_cumprod``; Forge: its
predictor's sigmas) and the model call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .schedule import SigmaToT

# What the tiled pass can drive (``WebUI.sampler_kind``): samplers whose CFG denoiser takes σ and
# returns x₀, and samplers whose CFG denoiser takes a timestep and returns ε. Any other (A1111's LCM,
# with its own output scaling) makes AccDiffusion step aside.
KDIFFUSION = "k-diffusion"
TIMESTEPS = "timesteps"

# (x_t [N, C, h, w], t [N], one conditioning per row) -> ε [N, C, h, w]: a UNet evaluation as a
# timestep sampler's denoiser makes it
EpsModel = Callable[[torch.Tensor, torch.Tensor, Sequence[Any]], torch.Tensor]
# (x [N, C, h, w], σ [N], one conditioning per row) -> x₀: what the fused denoiser calls
RowModel = Callable[[torch.Tensor, torch.Tensor, Sequence[Any]], torch.Tensor]


class TimestepSchedule:
    """σ of a training timestep of a DDPM schedule given by its ᾱ (``alphas_cumprod``, one per
    timestep 0…T−1), and back.

    ``quantize=False`` (AUTOMATIC1111): log ᾱ is interpolated linearly between whole timesteps,
    which is exact for DDIM and PLMS (whole timesteps) and is how UniPC's discrete noise schedule
    reads the fractional timesteps it passes (log α_t piecewise linear); :meth:`sigma_to_t` is its
    exact inverse. ``quantize=True`` (Forge): the timestep is rounded to a whole one, as Forge's
    ``CFGDenoiserTimesteps`` does before it converts (sd_samplers_cfg_denoiser.py:163-169)."""

    def __init__(self, alphas_cumprod: torch.Tensor, quantize: bool = False):
        abar = alphas_cumprod.detach().double().cpu()
        self.quantize = quantize
        self.log_abar = abar.log()  # falls with t
        self.sigmas = ((1 - abar) / abar).sqrt()  # rises with t

    @property
    def steps(self) -> int:
        return int(self.log_abar.shape[0])

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().double().cpu().clamp(0, self.steps - 1)
        if self.quantize:
            return self.log_abar[t.round().long()]
        low = t.floor().long().clamp_max(self.steps - 2)
        w = t - low
        return (1 - w) * self.log_abar[low] + w * self.log_abar[low + 1]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_t for timesteps ``t`` (any shape), on t's device, float32."""
        sigma = (torch.expm1(-self.log_alpha_bar(t))).clamp_min(0).sqrt()
        return sigma.to(device=t.device, dtype=torch.float32)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep whose σ is ``sigma``: the inverse of :meth:`sigma` (rounded
        for a quantized schedule)."""
        target = -torch.log1p(sigma.detach().double().cpu() ** 2)  # log ᾱ of σ
        descending = self.log_abar
        # index of the last knot with log ᾱ ≥ target (log ᾱ falls with t)
        above = (descending[None, :] >= target.reshape(-1, 1)).sum(1) - 1
        low = above.clamp(0, self.steps - 2)
        span = descending[low] - descending[low + 1]
        w = ((descending[low] - target.reshape(-1)) / span).clamp(0, 1)
        t = (low.double() + w).reshape(sigma.shape)
        if self.quantize:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    t_to_sigma = sigma


@dataclass(frozen=True)
class SamplerSpace:
    """What a sampler's CFG denoiser is called with, for the tiled pass: k-diffusion samplers pass
    σ (``sigma_of_t`` None), timestep samplers pass t (``sigma_of_t`` gives its σ, as the host
    reads it). ``sigma_to_t`` is the model's schedule, for the cosine factors."""
    sigma_to_t: SigmaToT
    sigma_of_t: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def timesteps(self) -> bool:
        return self.sigma_of_t is not None

    def noise_level(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ per row, and the factor s with x_call = s·x) of a CFG call's noise level argument:
        for a timestep sampler s = √ᾱ_t = 1/√(σ² + 1), for a k-diffusion one 1."""
        level = torch.as_tensor(level).reshape(-1)
        if self.sigma_of_t is None:
            return level, torch.ones_like(level, dtype=torch.float32)
        sigma = self.sigma_of_t(level).reshape(-1)
        return sigma, (sigma.double() ** 2 + 1).rsqrt().float()


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def eps_through_sigma_space(denoise: Callable[[RowModel, torch.Tensor, torch.Tensor], torch.Tensor],
                            eps_model: EpsModel, x_t: torch.Tensor, t: torch.Tensor,
                            sigma_of_t: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ε for a timestep sampler's call (x_t, t), computed by ``denoise(row_model, x, σ)`` — the
    fused tiled denoiser, which works on x = x_t·√(σ² + 1) and σ and returns x₀. ``row_model``
    evaluates each window batch through ``eps_model`` at the timestep of the row it was cut from
    (the very t the sampler passed, not one recomputed from σ) and returns x₀ = x − σ·ε; the fused
    x₀ leaves as ε = (x − x₀)/σ."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x_t.shape[0])
    sigma = sigma_of_t(t).reshape(-1).to(x_t.device)
    x = x_t * _rows((sigma.double() ** 2 + 1).sqrt(), x_t)
    # every σ of a window batch is a copy of one of the call's rows: its t is looked up, exactly
    t_of_sigma = {float(s): tt for s, tt in zip(sigma.tolist(), t.tolist())}

    def row_model(xs: torch.Tensor, sigmas: torch.Tensor, conds: Sequence[Any]) -> torch.Tensor:
        ts = torch.tensor([t_of_sigma[float(s)] for s in sigmas.tolist()], dtype=t.dtype, device=t.device)
        eps = eps_model(xs * _rows((sigmas.double() ** 2 + 1).rsqrt(), xs), ts, conds)
        return xs - _rows(sigmas, xs) * eps

    denoised = denoise(row_model, x, sigma)
    return (x - denoised) / _rows(sigma, x)
