"""What the WebUI glue (scripts/accdiffusion.py) calls, and the choice of host backend.

Script callback → entry point: ``process`` → :func:`start_job` (or :func:`fail_job` for invalid
arguments), ``before_process_batch`` → :func:`before_batch`, ``process_before_every_sampling`` →
:func:`before_sampling`, ``postprocess`` → :func:`finish_job`. Only the glue imports this module;
the backends are imported only from here.
"""

from __future__ import annotations

import logging
from typing import Any

from .a1111 import A1111Backend
from .forge import ForgeBackend
from .job import JOB_ATTR, Job, comment
from .passes import make_hr_pass, make_sample
from .settings import AccDiffusionSettings

log = logging.getLogger("accdiffusion")

__all__ = ["JOB_ATTR", "backend_for", "before_batch", "before_sampling", "fail_job", "finish_job", "is_forge",
           "start_job"]


def is_forge(p: Any) -> bool:
    return hasattr(p.sd_model, "forge_objects")


def backend_for(p: Any) -> Any:
    return ForgeBackend() if is_forge(p) else A1111Backend()


# Other extensions that tile the UNet themselves (title → what it is); their first script argument
# is their "enabled" switch: Tiled Diffusion and DemoFusion (pkuliyi2015/multidiffusion-upscaler-
# for-automatic1111 scripts/tilediffusion.py:93, tileglobal.py:50), Forge's built-in MultiDiffusion
# (extensions-builtin/sd_forge_multidiffusion/scripts/forge_multidiffusion.py:13).
UNET_TILERS = {"Tiled Diffusion": "Tiled Diffusion", "demofusion": "DemoFusion",
               "MultiDiffusion Integrated": "Forge's MultiDiffusion"}


def companion_tiler(p: Any) -> str | None:
    """The name of another UNet tiler enabled in this job, or None."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None) or ()
    for script in getattr(runner, "alwayson_scripts", None) or []:
        try:
            title = script.title()
        except Exception:
            continue
        start = getattr(script, "args_from", None)
        if title in UNET_TILERS and start is not None and start < len(args) and args[start] is True:
            return UNET_TILERS[title]
    return None


def start_job(p: Any, settings: AccDiffusionSettings, webui: Any = None) -> Job | None:
    """Called from the script's ``process``. Returns the job, or None when nothing is attached
    (not enabled, no hires fix, unsupported model: the WebUI then runs exactly as without us)."""
    if not settings.enabled:
        return None
    if not getattr(p, "enable_hr", False):
        log.info("AccDiffusion is enabled but Hires. fix is off: nothing to do")
        return None
    backend = backend_for(p)
    reason = backend.unsupported_reason(p)
    if getattr(p, "refiner_checkpoint", None) not in (None, "", "None"):
        reason = "the refiner swaps the model during sampling, which the tiled pass cannot follow"
    tiler = companion_tiler(p)
    if tiler:  # two tilers on one UNet call would fight: the other one was asked for explicitly
        reason = f"{tiler} is enabled and tiles the UNet itself (one tiler per job)"
    if reason:
        comment(p, f"AccDiffusion: {reason}; the WebUI's own hires fix ran instead.")
        return None
    if webui is None:
        from .webui import WebUI

        webui = WebUI()
    job = Job(settings, webui, backend=backend)
    setattr(p, JOB_ATTR, job)
    # a new dict: X/Y/Z cells are shallow copies of one p and would share it
    p.extra_generation_params = {**p.extra_generation_params, **settings.infotext_params()}
    return job


def fail_job(p: Any, error: Exception, webui: Any = None) -> None:
    """Invalid arguments: the job must stop with this message. Script callbacks' exceptions are
    swallowed by the WebUI, so the error is raised from the sampling call instead."""
    setattr(p, JOB_ATTR, Job(AccDiffusionSettings(), webui, error=error))


def before_batch(p: Any) -> None:
    """Replace ``p.sample`` / ``p.sample_hr_pass`` on the instance for this batch; the
    replacements chain to what was there and are undone when the batch's sampling ends."""
    job: Job | None = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    job.set_attr(p, "sample", make_sample(p, job), batch=True)
    job.set_attr(p, "sample_hr_pass", make_hr_pass(p, job), batch=True)


def before_sampling(p: Any) -> None:
    """From the script's ``process_before_every_sampling`` (Forge installs its patches there)."""
    job: Job | None = getattr(p, JOB_ATTR, None)
    if job is not None and job.error is None and job.backend is not None:
        job.backend.before_sampling(p, job)


def finish_job(p: Any, processed: Any) -> None:
    """Append the tile-prompt maps (when asked for) and drop the job's state."""
    job: Job | None = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    try:
        job.end_batch()
        if job.settings.tile_prompt_map and job.tile_maps:
            from .tilemap import draw_tile_prompt_map

            info = processed.infotexts[0] if getattr(processed, "infotexts", None) else ""
            for data in job.tile_maps:
                image = draw_tile_prompt_map(data.source, data.windows, data.prompts, data.latent_size)
                processed.images.append(image)
                processed.infotexts.append(info)
                job.webui.save_image(p, image, data.seed, data.prompt, info)
    finally:
        job.tile_maps.clear()
        p.__dict__.pop(JOB_ATTR, None)
