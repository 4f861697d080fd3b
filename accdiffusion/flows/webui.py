"""Every ``modules.*`` call the extension makes, behind one object (``job.webui``).

The WebUI modules are imported lazily, in the constructor: the engine, the job and the passes stay
importable without the WebUI, and the tests drive everything with a stand-in of this class
(tests/a1111_standins.WebUIStandIn). Forge 2 keeps the same ``modules.*`` names, so one class
serves both hosts; the few Forge-only branches are marked. file:line references are A1111 v1.10.1.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch


@functools.lru_cache(maxsize=None)
def refusal_class(http_exception: type) -> type:
    """An :class:`~accdiffusion.method.hires.AccDiffusionError` that is also the host API's
    ``http_exception`` (fastapi's ``HTTPException``) with status 422 and the message as its
    detail; ``str()`` is the message alone (Starlette's would prefix the status)."""
    from ..method.hires import AccDiffusionError

    class AccDiffusionSettingsError(AccDiffusionError, http_exception):  # type: ignore[misc, valid-type]
        def __init__(self, message: str):
            AccDiffusionError.__init__(self, message)
            http_exception.__init__(self, status_code=422, detail=message)

        def __str__(self) -> str:
            return str(self.detail)

    AccDiffusionSettingsError.__qualname__ = "AccDiffusionSettingsError"  # as consoles print it
    return AccDiffusionSettingsError


def forge_alter_samplers() -> list | None:
    """The k-diffusion samplers a Forge-lineage host adds (DDPM and others): Forge 2's
    modules_forge/alter_samplers.py, Neo's and old Forge's modules_forge/forge_alter_samplers.py
    (``samplers_data_alter`` in each); None elsewhere."""
    import importlib

    for name in ("modules_forge.alter_samplers", "modules_forge.forge_alter_samplers"):
        try:
            return list(importlib.import_module(name).samplers_data_alter)
        except (ImportError, AttributeError):
            continue
    return None


_NO_VALUE = object()


class WebUI:
    """The few ``modules.*`` calls the extension makes (imported lazily)."""

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

    def sampler_kind(self, name: str | None) -> str | None:
        """How the tiled pass drives the sampler ``name`` (:data:`~accdiffusion.method.timesteps.KDIFFUSION`
        or :data:`~accdiffusion.method.timesteps.TIMESTEPS`), or None when it cannot: the k-diffusion list
        (sd_samplers_kdiffusion.py:11-34) and, on Forge, its extra k-diffusion sampler DDPM
        (modules_forge/alter_samplers.py: a KDiffusionSampler); the timestep samplers
        (sd_samplers_timesteps.py:11-16: DDIM, DDIM CFG++, PLMS, UniPC); not LCM
        (sd_samplers_lcm.py, its own output scaling)."""
        from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

        from ..method.timesteps import KDIFFUSION, TIMESTEPS

        config = self.sd_samplers.find_sampler_config(name)
        if config is None:
            return None
        listed = lambda data: any(config.name == c.name for c in data)
        if listed(sd_samplers_timesteps.samplers_data_timesteps):
            return TIMESTEPS
        if listed(sd_samplers_kdiffusion.samplers_data_k_diffusion):
            return KDIFFUSION
        alter = forge_alter_samplers()
        return KDIFFUSION if alter is not None and listed(alter) else None

    def refusal(self, message: str) -> Exception:
        """The exception that stops a job for the client's mistake (a bad setting): an
        ``HTTPException`` with status 422, so the API answers 422 with the message and prints no
        traceback (modules/api/api.py:167-181 ``handle_exception``, the same on Forge), and the UI
        shows "AccDiffusionSettingsError: <message>" (call_queue.py ``wrap_gradio_call_no_job``)."""
        from fastapi import HTTPException

        return refusal_class(HTTPException)(message)

    def image_rng(self, shape: Sequence[int], p: Any) -> Any:
        return self.rng.ImageRNG(shape, p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                                 seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)

    def latent_upscale_mode(self, name: str | None) -> dict | None:
        return getattr(self.shared, "latent_upscale_modes", {}).get(name) if name else None

    @staticmethod
    @contextmanager
    def own_encode(model: Any) -> Iterator[None]:
        """An encode of ours leaves the model as it was: Neo's Flux.2 Klein keeps the last encoded
        image as the next positive prompt's reference image (flux2.py:47-51, :66-71), and ours (a
        probe, an upscaled first pass) must not become the reference of a later job."""
        initial = model.__dict__.get("ini_latent", _NO_VALUE)
        try:
            yield
        finally:
            if initial is not _NO_VALUE:
                model.ini_latent = initial

    def pixel_upscale(self, p: Any, decoded: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The user's pixel upscaler on the decoded first pass, encoded back to a latent."""
        with self.own_encode(p.sd_model):
            return self._pixel_upscale(p, decoded, width, height)

    def _pixel_upscale(self, p: Any, decoded: torch.Tensor, width: int, height: int) -> torch.Tensor:
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

    def native_side(self, model: Any) -> int:
        """The model family's native image side (px): the probe pass's area."""
        from ..method.probe import NATIVE_SIDE

        if getattr(model, "is_sdxl", False):
            return NATIVE_SIDE["sdxl"]
        if getattr(model, "parameterization", None) == "v":  # A1111: ldm's v-prediction SD2 768
            return NATIVE_SIDE["sd2-v"]
        predictor = getattr(getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None),
                            "predictor", None)
        if getattr(predictor, "prediction_type", None) == "v_prediction":  # Forge
            return NATIVE_SIDE["sd2-v"]
        if getattr(predictor, "prediction_type", None) == "const":  # Forge's flow models: Flux, Chroma, SD 3.5
            return NATIVE_SIDE["dit"]
        return NATIVE_SIDE["sd1"]

    def probe_image(self, p: Any, image: Any, width: int, height: int) -> torch.Tensor:
        """An init image (PIL) at the probe size, [3, h, w] in [0, 1], resized as the WebUI resizes
        it for img2img (processing.py:1693-1697: flatten, then the user's resize mode; mode 3,
        latent upscale, resizes the pixels plainly here)."""
        import numpy as np

        image = self.images.flatten(image, self.opts.img2img_background_color)
        mode = getattr(p, "resize_mode", 0)
        image = self.images.resize_image(0 if mode == 3 else mode, image, width, height)
        array = np.moveaxis(np.array(image.convert("RGB")).astype(np.float32) / 255.0, 2, 0)
        return torch.from_numpy(array)

    def encode(self, model: Any, pixels: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """[B, 3, h, w] in [0, 1] → latent, with the user's VAE encode method.

        The VAE samples its posterior from torch's global RNG (ldm's and Forge's
        ``DiagonalGaussianDistribution.sample``), whose state is whatever the last request left
        where this runs before the WebUI seeds it (img2img's probe). With ``seed`` that draw is
        the seed's — the same request gives the same latent — and the global RNG is left as it was."""
        with self.own_encode(model):
            return self._encode(model, pixels, seed)

    def _encode(self, model: Any, pixels: torch.Tensor, seed: int | None) -> torch.Tensor:
        method = self.sd_samplers_common.approximation_indexes.get(self.opts.sd_vae_encode_method)
        pixels = pixels.to(self.shared.device, dtype=self.devices.dtype_vae)
        if seed is None:
            return self.sd_samplers_common.images_tensor_to_samples(pixels, method, model)
        kind = pixels.device.type
        with torch.random.fork_rng(devices=[] if kind == "cpu" else [pixels.device],
                                   device_type="cuda" if kind == "cpu" else kind):
            torch.manual_seed(int(seed))
            return self.sd_samplers_common.images_tensor_to_samples(pixels, method, model)

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
        # img2img's p has no hr_* fields: its own sampler and steps
        sampler_config = self.sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
        steps = getattr(p, "hr_second_pass_steps", None) or p.steps
        total = sampler_config.total_steps(steps) if sampler_config else steps
        texts = self.prompt_parser.SdConditioning(prompts, width=width, height=height)
        # Neo dropped the old-scheduling option and the argument (prompt_parser.py:163)
        old_scheduling = {}
        if "use_old_scheduling" in inspect.signature(self.prompt_parser.get_learned_conditioning).parameters:
            old_scheduling["use_old_scheduling"] = bool(getattr(self.opts, "use_old_scheduling", False))
        with self.autocast():
            return self.prompt_parser.get_learned_conditioning(p.sd_model, texts, p.firstpass_steps, total,
                                                               **old_scheduling)

    def final_prompt_variant(self, prompt: str, steps: int) -> str:
        schedules = self.prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)
        return schedules[0][-1][1]

    def text_embedder(self, model: Any) -> Any:
        """The embedder whose tokens the model sees first in its context: the CLIP one (SDXL: the
        first, CLIP-L; sd_models_xl.py:65-87; Forge's SD 3.5: CLIP-L, the first part of
        [CLIP-L|G; T5], sd35.py get_learned_conditioning), or T5 for Forge's Flux and Chroma (their
        context is T5's sequence alone; the CLIP of Flux gives only the pooled vector)."""
        if getattr(model, "text_processing_engine_t5", None) is not None and not getattr(model, "is_sd3", False):
            return model.text_processing_engine_t5
        for forge_engine in ("text_processing_engine_l", "text_processing_engine"):  # Forge
            if getattr(model, forge_engine, None) is not None:
                return getattr(model, forge_engine)
        # Neo's one-encoder families name their engine after it (zimage.py: ``text_processing_engine_gemma``
        # holds Qwen3; qwen.py ``_qwen``, anima.py ``_anima``)
        engines = [value for name, value in sorted(vars(model).items())
                   if name.startswith("text_processing_engine_") and hasattr(value, "tokenize_line")]
        if len(engines) == 1:
            return engines[0]
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
