"""What the WebUI glue (scripts/accdiffusion.py) calls, and the choice of host backend.

Script callback → entry point: ``process`` → :func:`start_job` (or :func:`fail_job` for invalid
arguments), ``before_process_batch`` → :func:`before_batch`, ``process_before_every_sampling`` →
:func:`before_sampling`, ``postprocess`` → :func:`finish_job`. Only the glue imports this module;
the backends are imported only from here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from ..backends.a1111 import A1111Backend, detect_a1111
from ..backends.forge import ForgeBackend, ForgeParts, detect_forge_parts
from ..flows.job import JOB_ATTR, Job, comment, step_aside
from ..flows.txt2img import make_hr_pass, make_sample
from ..method.settings import AccDiffusionSettings
from ..method.timesteps import TIMESTEPS
from ..flows.img2img import img2img_fallback_reason, make_img2img_sample

log = logging.getLogger("accdiffusion")

__all__ = ["JOB_ATTR", "HostBackends", "announce_host", "backend_for", "before_batch", "before_sampling", "fail_job",
           "finish_job", "host_backends", "is_forge", "start_job", "unknown_host_note"]


def is_img2img(p: Any) -> bool:
    return getattr(p, "init_images", None) is not None


def is_forge(p: Any) -> bool:
    return hasattr(p.sd_model, "forge_objects")


def flow_sampler_reason(p: Any, backend: Any, webui: Any, img2img: bool) -> str | None:
    """A flow-matching model (Flux, Chroma, SD 3.5) is served with k-diffusion samplers only: the
    timestep samplers' boundary (x_t = √ᾱ_t·x, ε out) is the SD one, not tried on a flow predictor."""
    if not getattr(backend.model_sampling(p), "flow", False):
        return None
    name = p.sampler_name if img2img else (getattr(p, "hr_sampler_name", None) or p.sampler_name)
    if name in (None, "", "Use same sampler"):
        name = p.sampler_name
    if webui.sampler_kind(name) == TIMESTEPS:
        return f"the sampler '{name}' is a timestep sampler, served for SD models only (use a k-diffusion sampler)"
    return None


@dataclass(frozen=True)
class HostBackends:
    """What this WebUI has of what each backend calls (found once, :func:`host_backends`)."""
    forge: ForgeParts | None  # Forge 2 / Neo (backend.*) or old Forge (ldm_patched, modules_forge)
    a1111: str | None  # ldm / sgm UNets

    @property
    def name(self) -> str | None:
        if self.forge is not None:
            return f"the Forge backend ({self.forge.name})"
        if self.a1111 is not None:
            return f"the A1111 backend ({self.a1111})"
        return None


UNKNOWN_HOST = ("this WebUI is not one AccDiffusion knows (it has none of the building blocks of AUTOMATIC1111, "
                "Forge 2 / Neo or old Forge)")


@functools.lru_cache(maxsize=None)
def host_backends() -> HostBackends:
    """Found once per process, at load (:func:`announce_host`): the backend is chosen by what the
    host has, never by its version."""
    try:
        forge = detect_forge_parts()
    except Exception as error:  # a half-broken host package: not ours to crash on
        log.warning("AccDiffusion: the Forge building blocks could not be read (%s)", error)
        forge = None
    try:
        a1111 = detect_a1111()
    except Exception:
        a1111 = None
    return HostBackends(forge, a1111)


def unknown_host_note() -> str | None:
    """The accordion's note on a host no backend serves (None elsewhere)."""
    return None if host_backends().name else f"AccDiffusion: {UNKNOWN_HOST}; it leaves every job as it is."


def show_console_lines(logger: logging.Logger = log) -> None:
    """Our stage lines and notes are INFO and WARNING; a WebUI's root logger may hide them (Forge
    Neo's is at ERROR unless ``SD_WEBUI_LOG_LEVEL`` is set; A1111's at Python's WARNING). Then our
    logger prints its own lines to the console (stderr, as the WebUI's log lines) and no longer
    hands them to the root's handlers (no line twice). A WebUI whose log level already shows INFO
    is left as it is."""
    if logger.isEnabledFor(logging.INFO) or any(getattr(h, "accdiffusion", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    handler.accdiffusion = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def announce_host() -> None:
    """At load: our console lines made visible, and one line on which backend serves this WebUI,
    or that none does."""
    show_console_lines()
    name = host_backends().name
    print(f"[AccDiffusion] served by {name}" if name else f"[AccDiffusion] {UNKNOWN_HOST}: jobs run without it")


def backend_for(p: Any) -> Any:
    """The backend for this job's model, or None when the host has no backend for it (a model
    with Forge's objects on a host whose Forge building blocks were not found, or a host with
    neither)."""
    hosts = host_backends()
    if is_forge(p):
        return ForgeBackend(hosts.forge) if hosts.forge is not None else None
    return A1111Backend() if hosts.a1111 is not None else None


# Other extensions that tile the UNet themselves (title → what it is); their first script argument
# is their "enabled" switch: Tiled Diffusion and DemoFusion (pkuliyi2015/multidiffusion-upscaler-
# for-automatic1111 scripts/tilediffusion.py:93, tileglobal.py:50), Forge's built-in MultiDiffusion
# (extensions-builtin/sd_forge_multidiffusion/scripts/forge_multidiffusion.py:13).
UNET_TILERS = {"Tiled Diffusion": "Tiled Diffusion", "demofusion": "DemoFusion",
               "MultiDiffusion Integrated": "Forge's MultiDiffusion"}


def _size(image: Any) -> tuple[int, int]:
    size = getattr(image, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL: (width, height)
        return int(size[0]), int(size[1])
    return int(image.shape[-1]), int(image.shape[-2])  # a tensor stand-in: (..., height, width)


def tiled_diffusion_canvas(p: Any, args: Sequence[Any]) -> tuple[int, int]:
    """The pixel size Tiled Diffusion splits into tiles (its ``process``): txt2img's first pass, or
    its "overwrite size"; img2img's target size, the input image's size ("keep input size"), either
    scaled by its own upscaler's factor. Once its ``process`` has run it has put that size in
    ``p.width``/``p.height`` (and kept the user's as ``p.width_original_md``)."""
    if hasattr(p, "width_original_md"):
        return int(p.width), int(p.height)
    overwrite, keep, width, height, upscaler, factor = args[2], args[3], args[4], args[5], args[10], args[11]
    upscaled = upscaler not in (None, "None")
    if is_img2img(p) and len(p.init_images) > 0:
        if keep:
            w, h = _size(p.init_images[0])
            return (int(w * factor), int(h * factor)) if upscaled else (w, h)
        return (int(p.width * factor), int(p.height * factor)) if upscaled else (int(p.width), int(p.height))
    return (int(width), int(height)) if overwrite else (int(p.width), int(p.height))


def tiled_diffusion_idle(p: Any, args: Sequence[Any]) -> str | None:
    """Why Tiled Diffusion, enabled, does nothing in this job, or None when it tiles.

    Its ``process`` hooks the sampler only when the canvas latent (pixels // 8) is wider or taller
    than one tile (overlap does not matter), or region control is on, or img2img noise inversion
    is on; otherwise it returns without touching anything. Once hooked it tiles every UNet call of
    the canvas latent's size for the rest of the job — the hires pass reuses its sampler, and our
    hires windows and dilated sub-latents have that size (``window_size`` 0) — so then the hires
    pass would have two tilers. A plain hires latent (larger) it passes through untiled."""
    if len(args) < 19:  # not the argument list we know: assume it tiles (the safe side)
        return None
    width, height = tiled_diffusion_canvas(p, args)
    tile_w, tile_h, regions, inversion = int(args[6]), int(args[7]), bool(args[18]), bool(args[12])
    if width // 8 > tile_w or height // 8 > tile_h or regions or (inversion and is_img2img(p)):
        return None
    return (f"Tiled Diffusion is enabled but idle (one {tile_w}×{tile_h} tile covers the whole "
            f"{width // 8}×{height // 8} latent), so AccDiffusion tiles the hires pass")


def companion_tiler(p: Any) -> tuple[str | None, str | None]:
    """(the name of another UNet tiler that tiles in this job or None, a note on one that is enabled
    but stays idle or None)."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None) or ()
    idle = None
    for script in getattr(runner, "alwayson_scripts", None) or []:
        try:
            title = script.title()
        except Exception:
            continue
        start = getattr(script, "args_from", None)
        if title in UNET_TILERS and start is not None and start < len(args) and args[start] is True:
            if title == "Tiled Diffusion":
                idle = tiled_diffusion_idle(p, args[start:getattr(script, "args_to", None) or len(args)])
                if idle:
                    continue
            return UNET_TILERS[title], None
    return None, idle


def start_job(p: Any, settings: AccDiffusionSettings, webui: Any = None) -> Job | None:
    """Called from the script's ``process``. Returns the job, or None when nothing is attached
    (not enabled, no hires fix, unsupported model, an img2img job the tiled pass does not serve:
    the WebUI then runs exactly as without us)."""
    if not settings.enabled:
        return None
    img2img = is_img2img(p)
    if not img2img and not getattr(p, "enable_hr", False):
        log.info("AccDiffusion is enabled but Hires. fix is off: nothing to do")
        return None
    stock = "img2img" if img2img else "hires fix"
    backend = backend_for(p)
    if backend is None:
        step_aside(p, UNKNOWN_HOST, stock)
        return None
    reason = backend.unsupported_reason(p)
    if getattr(p, "refiner_checkpoint", None) not in (None, "", "None"):
        reason = "the refiner swaps the model during sampling, which the tiled pass cannot follow"
    tiler, idle = companion_tiler(p)
    if tiler:  # two tilers on one UNet call would fight: the other one was asked for explicitly
        reason = f"{tiler} is enabled and tiles the UNet itself (one tiler per job: {tiler} runs)"
    if webui is None:
        from ..flows.webui import WebUI

        webui = WebUI()
    if not reason and img2img:
        reason = img2img_fallback_reason(p, webui)
    if not reason:
        reason = flow_sampler_reason(p, backend, webui, img2img)
    if reason:
        step_aside(p, reason, stock)
        return None
    if idle:
        comment(p, f"AccDiffusion: {idle}.")
    job = Job(settings, webui, backend=backend)
    setattr(p, JOB_ATTR, job)
    # a new dict: X/Y/Z cells are shallow copies of one p and would share it
    p.extra_generation_params = {**p.extra_generation_params, **settings.infotext_params()}
    return job


def fail_job(p: Any, error: Exception, webui: Any = None) -> None:
    """Invalid arguments: the job must stop with this message. Script callbacks' exceptions are
    swallowed by the WebUI (scripts.py: every callback in a try/except), so the error is raised
    from the sampling call instead (``p.sample``, before anything is sampled), as the host's
    client error: HTTP 422 with the message from the API (:func:`accdiffusion.flows.job.refusal`)."""
    if webui is None:
        from ..flows.webui import WebUI

        webui = WebUI()
    setattr(p, JOB_ATTR, Job(AccDiffusionSettings(), webui, error=error))


def before_batch(p: Any) -> None:
    """Replace ``p.sample`` / ``p.sample_hr_pass`` (img2img: ``p.sample``) on the instance for this batch; the
    replacements chain to what was there and are undone when the batch's sampling ends."""
    job: Job | None = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    if is_img2img(p):
        job.set_attr(p, "sample", make_img2img_sample(p, job), batch=True)
        return
    image = getattr(p, "firstpass_image", None)
    if getattr(image, "mode", None) == "RGBA":
        # the Upscale button on a Forge image (stealth infotext in the alpha channel): the WebUI's
        # own p.sample would hand the VAE 4 channels for a latent upscaler (processing.py:1356-1364);
        # RGB, as its hires pass makes of it for a pixel upscaler (images.resize_image)
        job.set_attr(p, "firstpass_image", image.convert("RGB"), batch=True)
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
            from ..method.tilemap import draw_tile_prompt_map

            info = processed.infotexts[0] if getattr(processed, "infotexts", None) else ""
            for data in job.tile_maps:
                image = draw_tile_prompt_map(data.source, data.windows, data.prompts, data.latent_size,
                                             pixels_per_latent=data.pixels_per_latent)
                processed.images.append(image)
                processed.infotexts.append(info)
                job.webui.save_image(p, image, data.seed, data.prompt, info)
    finally:
        job.tile_maps.clear()
        p.__dict__.pop(JOB_ATTR, None)
