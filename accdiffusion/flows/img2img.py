"""The flows that start from an existing image: img2img and the txt2img *Upscale* button.

Neither has a first pass to record attention from, so their maps come from the probe pass
(:mod:`accdiffusion.method.probe`): the image at the probe size, a few noise levels, the positive prompt
through the UNet with the recorder attached (``job.backend.probe_unet``). The tiled pass itself is
the one txt2img hires uses (:func:`accdiffusion.flows.job.run_tiled_pass`).

img2img (A1111 processing.py:1598-1735, Forge the same): ``init()`` has resized every init image
to width×height (resize mode, img2img upscaler) and encoded it into ``p.init_latent``; its
``sample()`` would run one ``sample_img2img`` at the target size. ``p.sample`` is replaced per
batch on the instance (:func:`make_img2img_sample`): the probe runs on the init images, then the
progressive tiled pass from the probe size up to the target, with the upscaled init latent as the
first stage's input and the skip residual's reference; *Denoising strength* sets where each stage
starts, as for hires. Masks (inpainting) fall back to the previous ``p.sample``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ..method.attention import AttentionRecorder
from .job import (Job, TiledPassSource, TiledPassTarget, decode_latent, flat_latent, image_plans, latent_factor,
                  refusal, run_tiled_pass, step_aside, to_pil)
from ..method.probe import ProbeStats, probe_latent_size, probe_sigmas, run_probe
from ..method.tiles import cover_resize
from ..method.timesteps import KDIFFUSION

log = logging.getLogger("accdiffusion")


# --- the probe, host side ----------------------------------------------------------------------
def positive_conds(multicond: Any) -> list[Any | None]:
    """Per image, the conditioning of its positive prompt's final schedule entry (the variant the
    words are aligned to), or None for an AND prompt (its tiles keep the full prompt anyway)."""
    out = []
    for subprompts in multicond.batch:
        out.append(subprompts[0].schedules[-1].cond if len(subprompts) == 1 else None)
    return out


def probe_maps(p: Any, job: Job, latents: torch.Tensor, conditioning: Any,
               seeds: Sequence[int]) -> list[torch.Tensor | None]:
    """Per image: its token maps from the probe pass on ``latents`` (probe size), or None."""
    conds = positive_conds(conditioning)
    images = [i for i, c in enumerate(conds) if c is not None]
    out: list[torch.Tensor | None] = [None] * latents.shape[0]
    if not images:
        return out
    sampler = probe_sampler(p, job)
    schedule = sampler.model_wrap
    sampling = job.backend.model_sampling(p)
    t_to_sigma = sampling.t_to_sigma or (lambda t: schedule.t_to_sigma(t.to(schedule.sigmas.device)))
    sigmas = probe_sigmas(t_to_sigma)
    recorder = AttentionRecorder(tuple(latents.shape[-2:]), len(images), downsample=sampling.map_downsample)
    index = torch.tensor(images, device=latents.device)
    stats = ProbeStats()
    probed = latents.index_select(0, index)
    with job.backend.probe_unet(p, job, sampler, recorder, [conds[i] for i in images], probed, images) as call:
        run_probe(probed, [int(seeds[i]) for i in images], sigmas, call, stats,
                  noise_scaling=sampling.noise_scaling if sampling.flow else None)
    job.probe_stats.append(stats)
    log.info("AccDiffusion probe pass (%s): %d UNet calls at %dx%d latent, %d noise levels, maps for %d image(s)",
             "Upscale button" if getattr(p, "firstpass_image", None) is not None else "img2img", stats.unet_calls,
             stats.latent_size[1], stats.latent_size[0], stats.levels, len(images))
    for k, i in enumerate(images):
        out[i] = recorder.maps(k)
    return out


PROBE_SAMPLER = "Euler"  # a k-diffusion sampler of every host: the probe needs its model wrapper


def probe_sampler(p: Any, job: Job) -> Any:
    """The sampler whose k-diffusion model wrapper the probe calls and reads the schedule from
    (it samples nothing): the job's own when it is a k-diffusion sampler, else a fresh
    :data:`PROBE_SAMPLER` (a timestep sampler's wrapper takes t and returns ε; the probe's UNet
    calls are the same either way: the positive rows at timesteps 300, 500, 700)."""
    own = getattr(p, "sampler", None)
    if own is not None and getattr(own, "model_wrap", None) is not None \
            and job.webui.sampler_kind(p.sampler_name) == KDIFFUSION:
        return own
    return job.webui.create_sampler(PROBE_SAMPLER, p.sd_model)


# --- img2img -------------------------------------------------------------------------------------
def batch_init_images(p: Any, count: int) -> list[Any]:
    """The init image of each image of the batch (processing.py:1720-1729: one image serves the
    whole batch, else one per image)."""
    images = list(p.init_images)
    return images * count if len(images) == 1 else images[:count]


def probe_size_for(p: Any, webui: Any, images: Sequence[Any]) -> tuple[int, int]:
    """The probe latent size of an img2img job: the smallest any of its images allows."""
    f = latent_factor(p.sd_model)
    target = (p.height // f, p.width // f)
    native = webui.native_side(p.sd_model)
    sizes = [probe_latent_size(target, (image.height, image.width), native) for image in images]
    return min(sizes, key=lambda s: s[0] * s[1])


def img2img_fallback_reason(p: Any, webui: Any) -> str | None:
    """Why an img2img job runs the stock img2img (decided before anything is hooked), or None."""
    if getattr(p, "image_mask", None) is not None or getattr(p, "mask", None) is not None:
        return "inpainting (a mask, inpaint sketch) is not supported"
    if not getattr(p, "init_images", None):
        return "there is no init image"
    if webui.sampler_kind(p.sampler_name) is None:
        return (f"the sampler '{p.sampler_name}' is not supported (k-diffusion samplers and DDIM, DDIM CFG++, "
                f"PLMS, UniPC are)")
    probe = probe_size_for(p, webui, p.init_images)
    f = latent_factor(p.sd_model)
    if p.height // f <= probe[0] and p.width // f <= probe[1]:
        return (f"the target {p.width}×{p.height} is not larger than the probe size "
                f"{probe[1] * f}×{probe[0] * f} (upscale with 'Resize by' above 1)")
    return None


def make_img2img_sample(p: Any, job: Job) -> Callable[..., Any]:
    """``p.sample`` for an img2img batch: the tiled pass, or the previous ``p.sample`` (another
    extension's wrapper or the bound class method) when the batch has a mask after all."""
    previous_sample = p.sample

    def sample(conditioning: Any, unconditional_conditioning: Any, seeds: Any, subseeds: Any,
               subseed_strength: Any, prompts: Any) -> Any:
        try:
            if job.error is not None:
                raise refusal(job) from None
            if getattr(p, "mask", None) is not None:
                step_aside(p, "inpainting (a mask) is not supported", "img2img")
                return previous_sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
                                       prompts)
            return run_img2img(p, job, conditioning, unconditional_conditioning)
        finally:
            job.end_batch()

    return sample


def noise_multiplier(p: Any) -> float:
    """img2img's *Initial noise multiplier*, noted in the infotext as the stock img2img notes it
    (processing.py:1762-1764; ``__post_init__`` has resolved None from the setting)."""
    multiplier = getattr(p, "initial_noise_multiplier", None)
    if multiplier is None or float(multiplier) == 1.0:
        return 1.0
    p.extra_generation_params["Noise multiplier"] = multiplier
    return float(multiplier)


def run_img2img(p: Any, job: Job, conditioning: Any, unconditional_conditioning: Any) -> Any:
    """The probe on the batch's init images, then the tiled pass up to ``p.init_latent``'s size."""
    webui, settings = job.webui, job.settings
    job.conditioning, job.unconditioning = conditioning, unconditional_conditioning
    job.time_axis = p.init_latent.ndim == 5
    init_latent: torch.Tensor = flat_latent(p.init_latent)
    count = init_latent.shape[0]
    target = (int(init_latent.shape[-2]), int(init_latent.shape[-1]))
    images = batch_init_images(p, count)
    probe = probe_size_for(p, webui, images)
    f = latent_factor(p.sd_model)
    pixels = torch.stack([webui.probe_image(p, image, probe[1] * f, probe[0] * f) for image in images])
    with torch.no_grad():
        seeds = [int(s) for s in p.seeds]
        probe_latent = flat_latent(webui.encode(p.sd_model, pixels, seed=seeds[0])).to(init_latent)
        maps = probe_maps(p, job, probe_latent, conditioning, seeds) if settings.patch_prompts else None

        def first_input(size: tuple[int, int]) -> torch.Tensor:
            if size == target:
                return init_latent
            return cover_resize(init_latent, size, "bilinear", antialias=True)

        source = TiledPassSource(
            latent=probe_latent, pixels=None, plans=image_plans(p, job, maps), seeds=seeds, prompts=list(p.prompts),
            map_images=[to_pil(pixels[i] * 2 - 1) for i in range(count)] if settings.tile_prompt_map else None,
            first_input=first_input, stats_of=init_latent, noise_multiplier=noise_multiplier(p))
        target_spec = TiledPassTarget(
            latent_size=target, width=p.width, height=p.height, steps=p.steps, sampler_name=p.sampler_name,
            cond=conditioning, uncond=unconditional_conditioning, image_conditioning=p.txt2img_image_conditioning)
        own_sampler = p.sampler
        try:
            latent = run_tiled_pass(p, job, source, target_spec)
        finally:
            p.sampler = own_sampler  # the job's sampler (init() made it) serves every batch
        if latent is probe_latent:  # interrupted before the first stage
            latent = init_latent
        webui.torch_gc()
        return decode_latent(p, job, latent)


# --- the txt2img Upscale button ----------------------------------------------------------------------
def upscale_button_maps(p: Any, job: Job, samples: torch.Tensor) -> list[torch.Tensor | None] | None:
    """Maps for the Upscale button's existing first-pass image (``p.firstpass_image``; ``samples``
    is its latent): the probe at the probe size (the latent itself when that is its size)."""
    if not job.settings.patch_prompts or job.conditioning is None:
        return None
    webui = job.webui
    base = (int(samples.shape[-2]), int(samples.shape[-1]))
    image = p.firstpass_image  # RGB (facade.before_batch)
    probe = probe_latent_size(base, (image.height, image.width), webui.native_side(p.sd_model))
    if probe == base:
        latents = samples
    else:
        f = latent_factor(p.sd_model)
        pixels = webui.probe_image(p, image, probe[1] * f, probe[0] * f)[None].repeat(samples.shape[0], 1, 1, 1)
        latents = flat_latent(webui.encode(p.sd_model, pixels, seed=int(p.seeds[0]))).to(samples)
    return probe_maps(p, job, latents, job.conditioning, [int(s) for s in p.seeds])
