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

from .job import (Job, TiledPassSource, TiledPassTarget, decode_image, decode_latent, flat_latent, flat_pixels,
                  image_plans, latent_factor, refusal, run_tiled_pass,
                  step_aside, to_pil)
from .img2img import upscale_button_maps


# --- txt2img: first pass -------------------------------------------------------------------------
def make_sample(p: Any, job: Job) -> Callable[..., Any]:
    """``p.sample`` for the batch: records the first pass's attention, then calls the previous one."""
    previous_sample = p.sample  # bound class method, or another extension's instance wrapper

    def sample(conditioning: Any, unconditional_conditioning: Any, seeds: Any, subseeds: Any,
               subseed_strength: Any, prompts: Any) -> Any:
        try:
            if job.error is not None:
                raise refusal(job) from None
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
        reason = hires_fallback_reason(p, job, samples, decoded_samples)
        if reason:
            step_aside(p, reason, "hires fix")
            return previous_hr_pass(samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)
        return run_hires(p, job, samples, decoded_samples)

    return sample_hr_pass


def hires_fallback_reason(p: Any, job: Job, samples: Any, decoded_samples: Any = None) -> str | None:
    """Why the hires pass of this batch runs the WebUI's own hires fix, or None: a sampler the tiled
    pass cannot drive, or a hires size that is not larger than the first pass (nothing to tile)."""
    sampler_name = p.hr_sampler_name or p.sampler_name
    if job.webui.sampler_kind(sampler_name) is None:
        return (f"the hires sampler '{sampler_name}' is not supported (k-diffusion samplers and DDIM, "
                f"DDIM CFG++, PLMS, UniPC are)")
    first = samples if samples is not None else decoded_samples
    if first is not None:
        f = latent_factor(p.sd_model)
        base = (int(first.shape[-2]), int(first.shape[-1]))
        if samples is None:  # decoded pixels (the Upscale button with a pixel upscaler)
            base = (base[0] // f, base[1] // f)
        target = target_latent_size(p)
        if target[0] <= base[0] and target[1] <= base[1]:
            return (f"the hires size {target[1] * f}×{target[0] * f} is not larger than the first pass "
                    f"{base[1] * f}×{base[0] * f}")
    return None


def target_latent_size(p: Any) -> tuple[int, int]:
    """The hires latent after the WebUI's crop for a changed aspect ratio (processing.py:1427)."""
    f = latent_factor(p.sd_model)
    return (p.hr_upscale_to_y // f - p.truncate_y, p.hr_upscale_to_x // f - p.truncate_x)


def begin_hires_pass(p: Any) -> None:
    """What the host's own ``sample_hr_pass`` does before it samples, for the tiled pass that
    replaces it. Forge Neo sets the model's shift for the pass (processing.py:1433
    ``set_shift``, which Forge 2's models do not have) and writes the hires fields of the
    infotext there (:1435-1454), where A1111, Forge 2 and old Forge wrote them in ``init``
    already — so they are written here only when ``init`` did not ("Denoising strength" is
    absent), the way Neo writes them."""
    model = p.sd_model
    if hasattr(model, "set_shift") and hasattr(p, "hr_distilled_cfg"):
        model.set_shift(shift=p.hr_distilled_cfg)
    params = p.extra_generation_params
    if "Denoising strength" in params:
        return
    if getattr(model, "use_distilled_cfg_scale", False):
        params["Hires Distilled CFG Scale"] = p.hr_distilled_cfg
    if getattr(model, "use_shift", False):
        params["Hires Shift"] = p.hr_distilled_cfg
    if p.hr_sampler_name is not None and p.hr_sampler_name != p.sampler_name:
        params["Hires sampler"] = p.hr_sampler_name
    if getattr(p, "hr_scheduler", None) is not None and p.hr_scheduler != getattr(p, "scheduler", None):
        params["Hires schedule type"] = p.hr_scheduler
    if p.hr_upscaler is not None:
        params["Hires upscaler"] = p.hr_upscaler
    if p.hr_second_pass_steps:
        params["Hires steps"] = p.hr_second_pass_steps
    params["Denoising strength"] = p.denoising_strength
    params["Hires CFG Scale"] = getattr(p, "hr_cfg", None)
    for key, reader in (("Hires prompt", "get_hr_prompt"), ("Hires negative prompt", "get_hr_negative_prompt")):
        if hasattr(p, reader):
            params[key] = getattr(p, reader)


def run_hires(p: Any, job: Job, samples: torch.Tensor | None, decoded_samples: torch.Tensor | None) -> Any:
    """What the WebUI's ``sample_hr_pass`` does (processing.py:1364-1464), with the tiled pass in
    place of its one ``sample_img2img``. The Upscale button (``p.firstpass_image``) comes with
    ``samples`` None for a pixel upscaler (processing.py:1313-1318): its latent is encoded here,
    and its maps come from the probe pass."""
    webui, settings = job.webui, job.settings
    if webui.state.interrupted:
        return samples
    begin_hires_pass(p)
    p.is_hr_pass = True
    try:
        if samples is not None:
            job.time_axis = samples.ndim == 5
            samples = flat_latent(samples)
        if decoded_samples is not None:
            decoded_samples = flat_pixels(decoded_samples)
        if samples is None:
            samples = webui.encode(p.sd_model, torch.clamp((decoded_samples.float() + 1.0) / 2.0, 0, 1))
            job.time_axis = samples.ndim == 5
            samples = flat_latent(samples)
        if getattr(p, "firstpass_image", None) is not None:
            maps = upscale_button_maps(p, job, samples)
        else:
            recorder = job.recorder if settings.patch_prompts else None
            maps = [recorder.maps(i) for i in range(len(p.prompts))] if recorder is not None else None
        source = TiledPassSource(
            latent=samples, pixels=decoded_samples, plans=image_plans(p, job, maps),
            seeds=[int(s) for s in p.seeds], prompts=list(p.prompts),
            map_images=[to_pil(decode_image(p, job, samples[i:i + 1])[0]) for i in range(samples.shape[0])]
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
