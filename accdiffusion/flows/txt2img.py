"""The flows that replace a WebUI pass with the tiled pass (:func:`accdiffusion.flows.job.run_tiled_pass`).

Today: txt2img with Hires. fix. ``p.sample(...)`` is called as an attribute (A1111
processing.py:988) and ``self.sample_hr_pass(...)`` likewise (1362), so both are replaced per batch
on the instance (:func:`make_sample`, :func:`make_hr_pass`, installed by the facade from
``before_process_batch`` and removed in a ``finally`` when the batch's sampling ends). Each
replacement calls what ``p.sample`` / ``p.sample_hr_pass`` resolved to when it was installed
(another extension's instance wrapper, e.g. ControlNet's, or the bound class method), never the
class method directly. The first pass records attention; the hires pass builds a
:class:`~accdiffusion.flows.job.TiledPassSource` from the first pass and its maps.

The txt2img Upscale button (``p.firstpass_image`` set, no first pass) takes the same hires route
with maps from the probe pass (:func:`accdiffusion.flows.img2img.upscale_button_maps`); img2img lives in
:mod:`accdiffusion.flows.img2img`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..method.hires import AccDiffusionError
from .job import (Job, TiledPassSource, TiledPassTarget, comment, decode_latent, image_plans, run_tiled_pass,
                  to_pil)
from .img2img import upscale_button_maps


# --- txt2img: first pass -------------------------------------------------------------------------
def make_sample(p: Any, job: Job) -> Callable[..., Any]:
    """``p.sample`` for the batch: records the first pass's attention, then calls the previous one."""
    previous_sample = p.sample  # bound class method, or another extension's instance wrapper

    def sample(conditioning: Any, unconditional_conditioning: Any, seeds: Any, subseeds: Any,
               subseed_strength: Any, prompts: Any) -> Any:
        try:
            if job.error is not None:
                raise AccDiffusionError(str(job.error)) from job.error
            job.conditioning = conditioning  # the Upscale button's probe reads it
            job.unconditioning = unconditional_conditioning
            if job.settings.patch_prompts and getattr(p, "firstpass_image", None) is None:
                job.recorder = job.backend.start_recording(p, job, conditioning, prompts)
            return previous_sample(conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
                                   prompts)
        finally:
            job.end_batch()

    return sample


# --- txt2img: hires pass -------------------------------------------------------------------------
def make_hr_pass(p: Any, job: Job) -> Callable[..., Any]:
    """``p.sample_hr_pass`` for the batch: the tiled pass, or the previous one as a fallback."""
    previous_hr_pass = p.sample_hr_pass  # bound class method, or another extension's instance wrapper

    def sample_hr_pass(samples: Any, decoded_samples: Any, seeds: Any, subseeds: Any,
                       subseed_strength: Any, prompts: Any) -> Any:
        if job.recorder is not None:
            job.recorder.detach()
        reason = hires_fallback_reason(p, job, samples)
        if reason:
            comment(p, f"AccDiffusion: {reason}; the WebUI's own hires fix ran instead.")
            return previous_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)
        return run_hires(p, job, samples, decoded_samples)

    return sample_hr_pass


def hires_fallback_reason(p: Any, job: Job, samples: Any) -> str | None:
    sampler_name = p.hr_sampler_name or p.sampler_name
    if not job.webui.is_kdiffusion_sampler(sampler_name):
        return f"the hires sampler '{sampler_name}' is not a k-diffusion sampler (use Euler, DPM++, ...)"
    return None


def target_latent_size(p: Any) -> tuple[int, int]:
    """The hires latent after the WebUI's crop for a changed aspect ratio (processing.py:1427)."""
    return (p.hr_upscale_to_y // 8 - p.truncate_y, p.hr_upscale_to_x // 8 - p.truncate_x)


def run_hires(p: Any, job: Job, samples: torch.Tensor | None, decoded_samples: torch.Tensor | None) -> Any:
    """What the WebUI's ``sample_hr_pass`` does (processing.py:1364-1464), with the tiled pass in
    place of its one ``sample_img2img``. The Upscale button (``p.firstpass_image``) comes with
    ``samples`` None for a pixel upscaler (processing.py:1313-1318): its latent is encoded here,
    and its maps come from the probe pass."""
    webui, settings = job.webui, job.settings
    if webui.state.interrupted:
        return samples
    p.is_hr_pass = True
    try:
        if samples is None:
            samples = webui.encode(p.sd_model, torch.clamp((decoded_samples.float() + 1.0) / 2.0, 0, 1))
        if getattr(p, "firstpass_image", None) is not None:
            maps = upscale_button_maps(p, job, samples)
        else:
            recorder = job.recorder if settings.patch_prompts else None
            maps = [recorder.maps(i) for i in range(len(p.prompts))] if recorder is not None else None
        source = TiledPassSource(
            latent=samples, pixels=decoded_samples, plans=image_plans(p, job, maps),
            seeds=[int(s) for s in p.seeds], prompts=list(p.prompts),
            map_images=[to_pil(webui.decode(p.sd_model, samples[i:i + 1])[0]) for i in range(samples.shape[0])]
            if settings.tile_prompt_map else None)

        webui.activate_hr_networks(p)
        with webui.autocast():
            p.calculate_hr_conds()
        webui.token_merging(p, for_hr=True)
        if p.scripts is not None:
            p.scripts.before_hr(p)
        target = TiledPassTarget(
            latent_size=target_latent_size(p), width=p.hr_upscale_to_x, height=p.hr_upscale_to_y,
            steps=p.hr_second_pass_steps or p.steps, sampler_name=p.hr_sampler_name or p.sampler_name,
            cond=p.hr_c, uncond=p.hr_uc, image_conditioning=p.txt2img_image_conditioning)

        latent = run_tiled_pass(p, job, source, target)
        webui.token_merging(p, for_hr=False)
        p.sampler = None
        webui.torch_gc()
        return decode_latent(p, job, latent)
    finally:
        p.is_hr_pass = False
