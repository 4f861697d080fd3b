"""The probe pass: per-word cross-attention maps for an image that was not generated in this job
(img2img, the txt2img Upscale button), where there is no first pass to record.

The UNet is shown the image itself: the image is encoded at the *probe size* (its area about the
model's native area, never larger than the image or the target), seeded noise is added at a few
noise levels from the middle of the schedule, and the positive prompt alone goes through the UNet
once per level (no CFG) with the :class:`~accdiffusion.method.attention.AttentionRecorder` attached. The
recorder averages the maps exactly as during a first pass; words, masks, the opening and the tile
prompts are then built as for txt2img.

Why these levels (measured on the reference host, ``python -m accdiffusion.lab.bench --probe-agreement``): at
high noise the UNet hardly sees the image and attends by prior, at low noise it attends to texture;
the middle of the schedule is where the per-word layout of a first pass forms. See
:data:`PROBE_TIMESTEPS` for the numbers.

Pure torch: the host supplies the encoded latents and one call that runs its UNet on noisy latents
(with the recorder attached); nothing here imports the WebUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# Native image side of a model family (pixels): the probe's area is about its square.
NATIVE_SIDE = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024, "dit": 1024}  # dit: Flux, Chroma, SD 3.5

# Timesteps (of 1000) the probe looks at, one UNet call each. Chosen by measurement
# (``python -m accdiffusion.lab.bench --probe-agreement``): mean IoU of the probe's word masks with the
# first pass's own recorded masks on generated images is 0.89 for these three levels on the tiny
# SD1-like and SDXL-like UNets, against 0.85 for the best single level (t = 500) and 0.89-0.90 for
# five or six levels (twice the calls); the control (another image's masks) is 0.32-0.38.
PROBE_TIMESTEPS: tuple[int, ...] = (300, 500, 700)

LATENT_MULTIPLE = 8  # probe latents are a multiple of 8 (64 px): every SD UNet takes that size

SigmaOfT = Callable[[torch.Tensor], torch.Tensor]
# (noisy latents [B, C, h, w], sigmas [B]) -> anything; the host runs its UNet on the positive
# prompt of each row's image with the recorder attached (row i belongs to image i)
ProbeCall = Callable[[torch.Tensor, torch.Tensor], Any]


def probe_latent_size(target: tuple[int, int], image: tuple[int, int], native_side: int,
                      multiple: int = LATENT_MULTIPLE) -> tuple[int, int]:
    """Latent (h, w) of the probe for a target latent ``target`` and a source image of ``image``
    pixels (h, w): the target's aspect ratio, the area of the smallest of the model's native
    area, the image and the target (never upscaled), rounded down to a multiple the UNet takes
    (at least one multiple per side)."""
    th, tw = target
    ih, iw = image
    area = min(native_side * native_side / 64.0, ih * iw / 64.0, float(th * tw))
    scale = math.sqrt(area / (th * tw))
    side = lambda n: max(multiple, int(n * scale) // multiple * multiple)
    return side(th), side(tw)


def probe_sigmas(sigma_of_t: SigmaOfT, timesteps: Sequence[int] = PROBE_TIMESTEPS) -> list[float]:
    """The k-diffusion sigmas of the probe's timesteps, through the host's own schedule."""
    t = torch.tensor([float(x) for x in timesteps])
    return [float(s) for s in sigma_of_t(t).reshape(-1).cpu()]


def probe_noise(shape: Sequence[int], seed: int, level: int) -> torch.Tensor:
    """Noise for one image at one probe level, from its seed alone (CPU generator): the same seed
    gives the same maps on every device and host."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * (level + 1)) % (2 ** 63))
    return torch.randn(tuple(shape), generator=generator)


@dataclass
class ProbeStats:
    unet_calls: int = 0
    levels: int = 0
    latent_size: tuple[int, int] = (0, 0)


@torch.no_grad()
def run_probe(latents: torch.Tensor, seeds: Sequence[int], sigmas: Sequence[float], call: ProbeCall,
              stats: ProbeStats | None = None, noise_scaling: Any = None) -> ProbeStats:
    """One UNet call per noise level on ``latents + sigma · noise`` (all images of the batch in one
    call, row i = image i, noise seeded by ``seeds[i]``); ``noise_scaling(sigma, noise, latents)``
    replaces that sum for a model that noises otherwise (flow matching: (1 − σ)·x + σ·ε). What
    is recorded is up to the host's recorder; this only drives the calls."""
    if latents.shape[0] != len(seeds):
        raise ValueError(f"probe: {latents.shape[0]} latents but {len(seeds)} seeds")
    stats = stats or ProbeStats()
    stats.latent_size = (int(latents.shape[-2]), int(latents.shape[-1]))
    for level, sigma in enumerate(sigmas):
        noise = torch.stack([probe_noise(latents.shape[1:], seed, level) for seed in seeds])
        x = latents + noise.to(latents) * sigma if noise_scaling is None else \
            noise_scaling(float(sigma), noise.to(latents), latents)
        call(x, torch.full((latents.shape[0],), float(sigma), device=latents.device, dtype=latents.dtype))
        stats.unet_calls += 1
        stats.levels += 1
    return stats


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per word: |a ∩ b| / |a ∪ b| of two [words, h, w] boolean masks (1 where both are empty)."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
