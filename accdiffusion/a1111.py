"""AUTOMATIC1111 1.10 adapter: the only module of the package that touches ``modules.*``.

Hook points (v1.10.1; file:line in modules/processing.py unless named):
- ``p.sample(...)`` is called as an attribute (988) and ``self.sample_hr_pass(...)`` likewise
  (1362), so both are replaced per batch on the instance, from ``before_process_batch``, and
  removed again in a ``finally`` when the batch's sampling ends.
- The first pass records attention through per-instance ``attn2.forward`` wrappers (the WebUI
  swaps ``CrossAttention.forward`` at class level: sd_hijack_optimizations.py:88-91).
- Each hires stage runs the WebUI's own ``sampler.sample_img2img`` (1454) with two per-instance
  wrappers: ``model_wrap_cfg.forward`` (sd_samplers_cfg_denoiser.py:156; it receives the sampler's
  own ``x``, where the skip residual is applied in place) and the k-diffusion denoiser's
  ``forward`` (``model_wrap_cfg.inner_model``, called at sd_samplers_cfg_denoiser.py:246-271 with
  the CFG rows), where the fused tiled denoiser runs.
- Rows are recognised by content: a row whose text conditioning equals an image's positive
  hires conditioning gets that image's tile prompts, every other row (negative prompt, AND
  sub-prompts, any batch layout) keeps its own conditioning in every tile.

Everything the adapter needs from the WebUI goes through :class:`WebUI`, so the tests can drive
the adapter with stand-ins on CPU.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .attention import AttentionRecorder, find_cross_attention
from .hires import (AccDiffusionError, EncodeCache, Stage, StageDenoiser, StageStats, cover_resize,
                    latent_stats, plan_stages, restandardise, should_tile_decode, stage_windows,
                    tiled_decode)
from .prompts import ImagePromptPlan
from .settings import AccDiffusionSettings
from .tiles import Window
from .words import align_words, split_words

log = logging.getLogger("accdiffusion")

JOB_ATTR = "accdiffusion_job"
TEXT_KEYS = ("c_crossattn", "crossattn")  # SD1/SD2 and SDXL names of the text conditioning
_AND = re.compile(r"\bAND\b")
_NO_ATTR = object()


# --- the WebUI facade ----------------------------------------------------------------------------
class WebUI:
    """The few ``modules.*`` calls the adapter makes (imported lazily: the engine stays importable
    without the WebUI)."""

    def __init__(self) -> None:
        from modules import (devices, extra_networks, images, processing, prompt_parser, rng,
                             sd_models, sd_samplers, sd_samplers_common, shared)

        self.devices, self.extra_networks, self.images = devices, extra_networks, images
        self.processing, self.prompt_parser, self.rng = processing, prompt_parser, rng
        self.sd_models, self.sd_samplers, self.sd_samplers_common = sd_models, sd_samplers, sd_samplers_common
        self.shared = shared

    @property
    def state(self) -> Any:
        return self.shared.state

    @property
    def opts(self) -> Any:
        return self.shared.opts

    def autocast(self):
        return self.devices.autocast()

    def create_sampler(self, name: str, model: Any) -> Any:
        return self.sd_samplers.create_sampler(name, model)

    def is_kdiffusion_sampler(self, name: str) -> bool:
        from modules import sd_samplers_kdiffusion

        config = self.sd_samplers.find_sampler_config(name)
        return config is not None and any(config.name == c.name for c in sd_samplers_kdiffusion.samplers_data_k_diffusion)

    def image_rng(self, shape: Sequence[int], p: Any) -> Any:
        return self.rng.ImageRNG(shape, p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                                 seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)

    def latent_upscale_mode(self, name: str | None) -> dict | None:
        return getattr(self.shared, "latent_upscale_modes", {}).get(name) if name else None

    def pixel_upscale(self, p: Any, decoded: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The user's pixel upscaler on the decoded first pass, encoded back to a latent."""
        import numpy as np
        from PIL import Image

        batch = []
        for image in torch.clamp((decoded + 1.0) / 2.0, 0, 1):
            pil = Image.fromarray((255.0 * image.permute(1, 2, 0).cpu().numpy()).astype(np.uint8))
            pil = self.images.resize_image(0, pil, width, height, upscaler_name=p.hr_upscaler)
            batch.append(np.moveaxis(np.array(pil).astype(np.float32) / 255.0, 2, 0))
        pixels = torch.from_numpy(np.array(batch)).to(self.shared.device, dtype=self.devices.dtype_vae)
        method = self.sd_samplers_common.approximation_indexes.get(self.opts.sd_vae_encode_method)
        return self.sd_samplers_common.images_tensor_to_samples(pixels, method, p.sd_model)

    def decode(self, model: Any, latent: torch.Tensor) -> torch.Tensor:
        return self.sd_samplers_common.decode_first_stage(model, latent)

    def decode_batch(self, model: Any, latent: torch.Tensor) -> list:
        return self.processing.decode_latent_batch(model, latent, target_device=self.devices.cpu, check_for_nans=True)

    def decoded_samples(self, images: list[torch.Tensor]) -> list:
        out = self.processing.DecodedSamples(images)
        out.already_decoded = True
        return out

    def learned_conditioning(self, p: Any, prompts: list[str], width: int, height: int) -> list:
        """Per prompt, the WebUI's schedule list [(end_at_step, cond)], encoded like the hires
        prompt (processing.py:1499-1511), so emphasis, BREAK, embeddings and LoRA apply."""
        sampler_config = self.sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        steps = p.hr_second_pass_steps or p.steps
        total = sampler_config.total_steps(steps) if sampler_config else steps
        texts = self.prompt_parser.SdConditioning(prompts, width=width, height=height)
        with self.autocast():
            return self.prompt_parser.get_learned_conditioning(
                p.sd_model, texts, p.firstpass_steps, total, self.opts.use_old_scheduling)

    def final_prompt_variant(self, prompt: str, steps: int) -> str:
        schedules = self.prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)
        return schedules[0][-1][1]

    def text_embedder(self, model: Any) -> Any:
        """The CLIP embedder whose tokens the UNet sees (SDXL: the first, CLIP-L; sd_models_xl.py:65-87)."""
        for forge_engine in ("text_processing_engine_l", "text_processing_engine"):  # Forge
            if getattr(model, forge_engine, None) is not None:
                return getattr(model, forge_engine)
        conditioner = getattr(model, "conditioner", None)
        if conditioner is not None:
            return next(e for e in conditioner.embedders if hasattr(e, "tokenize_line"))
        return model.cond_stage_model

    def sdxl_crop_embedder(self, model: Any) -> Callable[[int, int], torch.Tensor] | None:
        conditioner = getattr(model, "conditioner", None)
        if conditioner is None:
            return None
        embedder = next((e for e in conditioner.embedders
                         if getattr(e, "input_key", None) == "crop_coords_top_left"), None)
        if embedder is None:
            return None
        default = (int(self.opts.sdxl_crop_top), int(self.opts.sdxl_crop_left))

        def embed(top: int, left: int) -> torch.Tensor:
            with torch.no_grad(), self.autocast():
                return embedder(torch.tensor([[top, left]], device=self.shared.device))[0]

        embed.default = default  # type: ignore[attr-defined]
        return embed

    def activate_hr_networks(self, p: Any) -> None:
        if not p.disable_extra_networks:
            with self.autocast():
                self.extra_networks.activate(p, p.hr_extra_network_data)

    def token_merging(self, p: Any, for_hr: bool) -> None:
        self.sd_models.apply_token_merging(p.sd_model, p.get_token_merging_ratio(for_hr=for_hr))

    def add_progress(self, extra_jobs: int, extra_steps: int) -> None:
        state, total = self.state, self.shared.total_tqdm
        state.job_count += extra_jobs
        if getattr(total, "_tqdm", None) is not None:
            total.updateTotal(total._tqdm.total + extra_steps)

    def save_image(self, p: Any, image: Any, seed: int, prompt: str, info: str) -> None:
        if p.save_samples():
            self.images.save_image(image, p.outpath_samples, "", seed, prompt, self.opts.samples_format,
                                   info=info, p=p, suffix="-accdiffusion-tiles")

    def torch_gc(self) -> None:
        self.devices.torch_gc()


# --- supported models ---------------------------------------------------------------------------
def is_forge(p: Any) -> bool:
    return hasattr(p.sd_model, "forge_objects")


def unsupported_reason(p: Any) -> str | None:
    """Why the model cannot be served (the stock hires fix runs instead), or None."""
    model = p.sd_model
    if getattr(model, "is_sd3", False):
        return "SD3 models have no UNet cross-attention to read"
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None or not find_cross_attention(unet):
        return "this model has no UNet cross-attention layers (SD1.x, SD2.x and SDXL are supported)"
    if getattr(model, "is_sdxl_inpaint", False) or getattr(model, "conditioning_key", None) in ("hybrid", "concat"):
        return "inpainting models are not supported"
    return None


# --- conditioning rows ------------------------------------------------------------------------
def split_cond(cond: dict) -> list[dict]:
    """The CFG denoiser's cond dict ({key: tensor or [tensor]}) as one dict per row."""
    first = next(iter(cond.values()))
    rows = (first[0] if isinstance(first, list) else first).shape[0]
    out = []
    for r in range(rows):
        out.append({k: (v[0] if isinstance(v, list) else v)[r] for k, v in cond.items()})
    return out


def stack_cond(rows: Sequence[dict], like: dict) -> dict:
    """Inverse of :func:`split_cond`; text conditionings of different token counts are padded by
    repeating their last token, as the WebUI's ``stack_conds`` does."""
    out = {}
    for key, template in like.items():
        values = [row[key] for row in rows]
        if key in TEXT_KEYS:
            tokens = max(v.shape[0] for v in values)
            values = [v if v.shape[0] == tokens else torch.cat([v, v[-1:].expand(tokens - v.shape[0], -1)])
                      for v in values]
        stacked = torch.stack(values)
        out[key] = [stacked] if isinstance(template, list) else stacked
    return out


def text_of(row: dict) -> torch.Tensor:
    return next(row[k] for k in TEXT_KEYS if k in row)


def schedule_entry(schedule: Sequence[Any], step: int) -> Any:
    """The WebUI's rule (prompt_parser.reconstruct_cond_batch): the first entry whose end step is
    not yet passed."""
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry.cond
    return schedule[-1].cond


def positive_texts(multicond: Any) -> list[list[torch.Tensor]]:
    """Per image, every text conditioning its positive prompt can take (one per schedule entry);
    empty for an image whose prompt uses AND."""
    out = []
    for subprompts in multicond.batch:
        if len(subprompts) != 1:
            out.append([])
            continue
        out.append([text_of(e.cond) if isinstance(e.cond, dict) else e.cond for e in subprompts[0].schedules])
    return out


def row_image(text: torch.Tensor, positives: Sequence[Sequence[torch.Tensor]]) -> int | None:
    for image, candidates in enumerate(positives):
        for cand in candidates:
            n = min(cand.shape[0], text.shape[0])
            if cand.shape[-1] == text.shape[-1] and torch.equal(text[:n], cand[:n].to(text)):
                return image
    return None


# --- the job ----------------------------------------------------------------------------------
@dataclass
class TileMapData:
    source: Any  # PIL image of the first pass
    windows: list[Window]
    prompts: list[str]
    latent_size: tuple[int, int]
    seed: int
    prompt: str


@dataclass
class Job:
    """State of one generation job (all batches); everything the extension attaches is reachable
    from here and removed by :meth:`end_batch`."""
    settings: AccDiffusionSettings
    webui: Any
    error: Exception | None = None
    backend: Any = None  # A1111Backend or forge.ForgeBackend
    recorder: AttentionRecorder | None = None
    tile_maps: list[TileMapData] = field(default_factory=list)
    stage_stats: list[StageStats] = field(default_factory=list)
    _restore: list[Callable[[], None]] = field(default_factory=list)  # pass and stage hooks
    _batch_restore: list[Callable[[], None]] = field(default_factory=list)  # p.sample overrides

    # --- hooks -------------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any, batch: bool = False) -> None:
        """Set an instance attribute and remember how to undo it exactly."""
        previous = obj.__dict__.get(name, _NO_ATTR)
        setattr(obj, name, value)

        def undo() -> None:
            if previous is _NO_ATTR:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous

        (self._batch_restore if batch else self._restore).append(undo)

    def undo_hooks(self) -> None:
        while self._restore:
            self._restore.pop()()
        if self.recorder is not None:
            self.recorder.detach()

    def end_batch(self) -> None:
        self.undo_hooks()
        while self._batch_restore:
            self._batch_restore.pop()()
        self.recorder = None


class A1111Backend:
    """How AUTOMATIC1111 is hooked: instance forwards on the ldm/sgm attn2 modules and on the
    sampler's k-diffusion denoiser."""

    def unsupported_reason(self, p: Any) -> str | None:
        return unsupported_reason(p)

    def start_recording(self, p: Any, job: "Job", conditioning: Any, prompts: Sequence[str]) -> AttentionRecorder:
        recorder = AttentionRecorder((p.height // 8, p.width // 8), len(prompts))
        positives = positive_texts(conditioning)
        recorder.resolve_rows = lambda context: [row_image(t, positives) for t in context]
        return recorder.attach(find_cross_attention(p.sd_model.model.diffusion_model, include_middle=False))

    def before_sampling(self, p: Any, job: "Job") -> None:
        """Nothing to do here on A1111: the recorder is attached for the whole first pass."""

    def prepare_stage(self, p: Any, job: "Job") -> None:
        """Nothing to reset on A1111 between stages."""

    def hook_stage(self, job: "Job", p: Any, sampler: Any, denoiser: StageDenoiser,
                   positives: list[list[torch.Tensor]], tile_schedules: list[list | None],
                   windows: list[Window]) -> None:
        _hook_sampler(job, sampler, denoiser, positives, tile_schedules, windows,
                      job.webui.sdxl_crop_embedder(p.sd_model))


def backend_for(p: Any) -> Any:
    if is_forge(p):
        from .forge import ForgeBackend

        return ForgeBackend()
    return A1111Backend()


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
    if reason:
        _comment(p, f"AccDiffusion: {reason}; the WebUI's own hires fix ran instead.")
        return None
    job = Job(settings, webui or WebUI(), backend=backend)
    setattr(p, JOB_ATTR, job)
    # a new dict: X/Y/Z cells are shallow copies of one p and would share it
    p.extra_generation_params = {**p.extra_generation_params, **settings.infotext_params()}
    return job


def fail_job(p: Any, error: Exception, webui: Any = None) -> None:
    """Invalid arguments: the job must stop with this message. Script callbacks' exceptions are
    swallowed by the WebUI, so the error is raised from the sampling call instead."""
    setattr(p, JOB_ATTR, Job(AccDiffusionSettings(), webui, error=error))


def before_batch(p: Any) -> None:
    job: Job | None = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    job.set_attr(p, "sample", _make_sample(p, job), batch=True)
    job.set_attr(p, "sample_hr_pass", _make_hr_pass(p, job), batch=True)


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


def _comment(p: Any, text: str) -> None:
    log.warning(text)
    if hasattr(p, "comment"):
        p.comment(text)


# --- first pass -------------------------------------------------------------------------------
def _make_sample(p: Any, job: Job) -> Callable[..., Any]:
    cls_sample = type(p).sample

    def sample(conditioning: Any, unconditional_conditioning: Any, seeds: Any, subseeds: Any,
               subseed_strength: Any, prompts: Any) -> Any:
        try:
            if job.error is not None:
                raise AccDiffusionError(str(job.error)) from job.error
            if job.settings.patch_prompts and getattr(p, "firstpass_image", None) is None:
                job.recorder = job.backend.start_recording(p, job, conditioning, prompts)
            return cls_sample(p, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts)
        finally:
            job.end_batch()

    return sample


# --- hires pass --------------------------------------------------------------------------------
def _make_hr_pass(p: Any, job: Job) -> Callable[..., Any]:
    cls_hr_pass = type(p).sample_hr_pass

    def sample_hr_pass(samples: Any, decoded_samples: Any, seeds: Any, subseeds: Any,
                       subseed_strength: Any, prompts: Any) -> Any:
        if job.recorder is not None:
            job.recorder.detach()
        reason = _hires_fallback_reason(p, job, samples)
        if reason:
            _comment(p, f"AccDiffusion: {reason}; the WebUI's own hires fix ran instead.")
            return cls_hr_pass(p, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts)
        return run_hires(p, job, samples, decoded_samples)

    return sample_hr_pass


def _hires_fallback_reason(p: Any, job: Job, samples: Any) -> str | None:
    if getattr(p, "firstpass_image", None) is not None or samples is None:
        return "'Upscale' of an existing image has no first pass to read the attention of"
    sampler_name = p.hr_sampler_name or p.sampler_name
    if not job.webui.is_kdiffusion_sampler(sampler_name):
        return f"the hires sampler '{sampler_name}' is not a k-diffusion sampler (use Euler, DPM++, ...)"
    return None


def target_latent_size(p: Any) -> tuple[int, int]:
    """The hires latent after the WebUI's crop for a changed aspect ratio (processing.py:1427)."""
    return (p.hr_upscale_to_y // 8 - p.truncate_y, p.hr_upscale_to_x // 8 - p.truncate_x)


def run_hires(p: Any, job: Job, samples: torch.Tensor, decoded_samples: torch.Tensor | None) -> Any:
    webui, settings, state = job.webui, job.settings, job.webui.state
    if state.interrupted:
        return samples
    p.is_hr_pass = True
    try:
        base = (samples.shape[-2], samples.shape[-1])
        stages = plan_stages(base, target_latent_size(p), settings.progressive)
        steps = p.hr_second_pass_steps or p.steps
        webui.add_progress(len(stages) - 1, (len(stages) - 1) * steps)
        mean, std = latent_stats(samples.float())
        plans = _image_plans(p, job)
        if settings.tile_prompt_map:
            sources = [_to_pil(webui.decode(p.sd_model, samples[i:i + 1])[0]) for i in range(samples.shape[0])]

        webui.activate_hr_networks(p)
        with webui.autocast():
            p.calculate_hr_conds()
        webui.token_merging(p, for_hr=True)
        if p.scripts is not None:
            p.scripts.before_hr(p)
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        cache: EncodeCache[list] = EncodeCache(lambda prompts: webui.learned_conditioning(p, prompts, width, height))
        positives = positive_texts(p.hr_c)

        latent = samples
        batch_maps: list[TileMapData] = []
        for stage in stages:
            if state.interrupted or state.skipped:
                break
            x_up = _stage_input(p, job, stage, latent, samples, decoded_samples)
            x_up = restandardise(x_up.float(), mean, std).to(samples.dtype)
            state.nextjob()
            p.rng = webui.image_rng(x_up.shape[1:], p)
            noise = p.rng.next()
            windows = stage_windows(stage, base, settings)
            tile_prompts = [plan.tile_prompts(stage.size, windows, settings.patch_prompt_threshold)
                            if plan else None for plan in plans]
            for i, prompts_i in enumerate(tile_prompts):
                if prompts_i:
                    log.debug("AccDiffusion stage %d image %d tile prompts: %s", stage.index, i, prompts_i)
            tile_schedules = [cache.get(t) if t else None for t in tile_prompts]
            sampler = webui.create_sampler(p.hr_sampler_name or p.sampler_name, p.sd_model)
            p.sampler = sampler
            denoiser = StageDenoiser(stage, windows, settings, int(p.seeds[0]), sampler.model_wrap.sigma_to_t,
                                     reference=x_up, noise=noise)
            job.backend.prepare_stage(p, job)
            if p.scripts is not None:
                p.scripts.process_before_every_sampling(p=p, x=x_up, noise=noise, c=p.hr_c, uc=p.hr_uc)
            try:
                job.backend.hook_stage(job, p, sampler, denoiser, positives, tile_schedules, windows)
                latent = sampler.sample_img2img(p, x_up, noise, p.hr_c, p.hr_uc, steps=steps,
                                                image_conditioning=p.txt2img_image_conditioning(x_up))
            finally:
                job.undo_hooks()
            job.stage_stats.append(denoiser.stats)
            if settings.tile_prompt_map:  # the last stage's tiles are the ones shown
                batch_maps = [TileMapData(sources[i], windows, t, stage.size, int(p.seeds[i]), p.prompts[i])
                              for i, t in enumerate(tile_prompts) if t]
        job.tile_maps.extend(batch_maps)  # every batch of the job (batch count > 1) keeps its maps
        webui.token_merging(p, for_hr=False)
        p.sampler = None
        webui.torch_gc()
        return _decode(p, job, latent)
    finally:
        p.is_hr_pass = False


def _stage_input(p: Any, job: Job, stage: Stage, latent: torch.Tensor, samples: torch.Tensor,
                 decoded_samples: torch.Tensor | None) -> torch.Tensor:
    """The first jump uses the user's hires upscaler (latent or pixel); later stages bicubic."""
    if stage.index > 1:
        return cover_resize(latent, stage.size, "bicubic")
    mode = job.webui.latent_upscale_mode(p.hr_upscaler) if p.latent_scale_mode is not None else None
    if mode is not None or decoded_samples is None:
        mode = mode or {"mode": "bilinear", "antialias": False}
        return cover_resize(samples, stage.size, mode["mode"], antialias=mode["antialias"])
    # pixel upscaler: upscale to cover the stage size, encode, crop like the latent path
    h, w = samples.shape[-2:]
    scale = max(stage.size[0] / h, stage.size[1] / w)
    cover = (max(stage.size[0], round(h * scale)), max(stage.size[1], round(w * scale)))
    encoded = job.webui.pixel_upscale(p, decoded_samples, cover[1] * 8, cover[0] * 8)
    return cover_resize(encoded, stage.size, "nearest")


def _image_plans(p: Any, job: Job) -> list[ImagePromptPlan | None]:
    """Per image of the batch: words of its hires prompt with masks from its own maps, or None
    (patch prompts off, no maps, or an AND prompt: every tile then takes the full prompt)."""
    recorder, webui = job.recorder, job.webui
    if recorder is None or not job.settings.patch_prompts:
        return [None] * len(p.prompts)
    embedder = webui.text_embedder(p.sd_model)
    special = {embedder.id_start, embedder.id_end, getattr(embedder, "id_pad", embedder.id_end)}
    tokenize = lambda text: embedder.tokenize([text])[0]
    plans: list[ImagePromptPlan | None] = []
    for i, prompt in enumerate(p.prompts):
        hires_prompt = p.hr_prompts[i] if getattr(p, "hr_prompts", None) else prompt
        maps = recorder.maps(i)
        if maps is None or _AND.search(prompt) or _AND.search(hires_prompt):
            if _AND.search(prompt) or _AND.search(hires_prompt):
                _comment(p, "AccDiffusion: prompts with AND keep the full prompt in every tile.")
            plans.append(None)
            continue
        variant = webui.final_prompt_variant(prompt, p.steps)
        chunks, _ = embedder.tokenize_line(variant)
        context_ids = [t for chunk in chunks for t in chunk.tokens]
        words = split_words(prompt)
        positions = align_words(words, context_ids, special, tokenize)
        plans.append(ImagePromptPlan.build(words, positions, maps, hires_prompt, split_words(hires_prompt)))
    return plans


def hook_skip_residual(job: Job, sampler: Any, denoiser: StageDenoiser) -> None:
    """The CFG denoiser is called with the sampler's own x: the skip residual goes in there."""
    cfg = sampler.model_wrap_cfg
    cfg_forward = cfg.forward

    def skip_residual_forward(x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        denoiser.skip_residual_(x, sigma)
        return cfg_forward(x, sigma, *args, **kwargs)

    job.set_attr(cfg, "forward", skip_residual_forward)


def tile_conditions(rows: Sequence[dict], positives: list[list[torch.Tensor]],
                    tile_schedules: list[list | None], windows: list[Window],
                    tile_row: Callable[[dict, list, Window], dict]) -> list[list[dict] | None]:
    """Per row of a model call: one conditioning per window when the row carries an image's
    positive prompt, else None (the row keeps its own conditioning in every window)."""
    out: list[list[dict] | None] = []
    for row in rows:
        image = row_image(text_of(row), positives)
        schedule = tile_schedules[image] if image is not None else None
        out.append([tile_row(row, schedule[w], win) for w, win in enumerate(windows)] if schedule else None)
    return out


def _hook_sampler(job: Job, sampler: Any, denoiser: StageDenoiser, positives: list[list[torch.Tensor]],
                  tile_schedules: list[list | None], windows: list[Window],
                  crop_embed: Callable[[int, int], torch.Tensor] | None) -> None:
    cfg = sampler.model_wrap_cfg
    inner = cfg.inner_model
    inner_forward = inner.forward
    crop_offset: dict[Any, Any] = {}  # the crop segment's offset and per-window embeddings

    def tile_row(row: dict, schedule: list, window: Window) -> dict:
        cond = schedule_entry(schedule, cfg.step)
        out = dict(row)
        if isinstance(cond, dict):  # SDXL: crossattn + vector (pooled text, sizes, crop)
            out["crossattn"] = cond["crossattn"]
            vector = cond["vector"]
            if crop_embed is not None:
                vector = _with_crop(vector, crop_embed, window, crop_offset)
            out["vector"] = vector
        else:
            out["c_crossattn"] = cond
        return out

    def fused_forward(x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None, **kwargs: Any) -> torch.Tensor:
        rows = split_cond(cond)

        def row_model(xs: torch.Tensor, sigmas: torch.Tensor, conds: Sequence[dict]) -> torch.Tensor:
            return inner_forward(xs, sigmas, cond=stack_cond(conds, cond), **kwargs)

        return denoiser(row_model, x, sigma, rows, tile_conditions(rows, positives, tile_schedules, windows, tile_row))

    hook_skip_residual(job, sampler, denoiser)
    job.set_attr(inner, "forward", fused_forward)


def _with_crop(vector: torch.Tensor, crop_embed: Callable[[int, int], torch.Tensor], window: Window,
               offsets: dict[Any, Any]) -> torch.Tensor:
    """SDXL: the crop conditioning of a tile is its pixel offset (as in the reference); find the
    crop segment once by locating the default crop's embedding in the vector."""
    if "crop" not in offsets:
        default = crop_embed(*crop_embed.default).to(vector)  # type: ignore[attr-defined]
        n = default.shape[0]
        offsets["crop"] = next((o for o in range(vector.shape[0] - n + 1)
                                if torch.equal(vector[o:o + n], default)), None)
        if offsets["crop"] is None:
            log.debug("AccDiffusion: SDXL crop conditioning not found in the vector; left as is")
    offset = offsets["crop"]
    if offset is None:
        return vector
    key = (window.top, window.left)  # one embedding per window, not one per window per step
    if key not in offsets:
        offsets[key] = crop_embed(window.top * 8, window.left * 8)
    embedded = offsets[key].to(vector)
    out = vector.clone()
    out[offset:offset + embedded.shape[0]] = embedded
    return out


def _decode(p: Any, job: Job, latent: torch.Tensor) -> Any:
    webui = job.webui
    if not should_tile_decode(job.settings.tiled_decode, tuple(latent.shape[-2:])):
        return webui.decode_batch(p.sd_model, latent)
    images = []
    for i in range(latent.shape[0]):
        image = tiled_decode(latent[i:i + 1], lambda z: webui.decode(p.sd_model, z).float().cpu())
        images.append(image[0])
    return webui.decoded_samples(images)


def _to_pil(image: torch.Tensor) -> Any:
    import numpy as np
    from PIL import Image

    array = torch.clamp((image.float() + 1.0) / 2.0, 0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).astype(np.uint8))
