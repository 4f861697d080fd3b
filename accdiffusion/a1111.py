"""AUTOMATIC1111 1.10 backend: how the job hooks the A1111 objects (v1.10.1; file:line in
modules/processing.py unless named).

- The first pass records attention through per-instance ``attn2.forward`` wrappers on the ldm/sgm
  cross-attention modules (the WebUI swaps ``CrossAttention.forward`` at class level:
  sd_hijack_optimizations.py:88-91, so an instance attribute wins and is removed cleanly).
- Each hires stage runs the WebUI's own ``sampler.sample_img2img`` (1454) with two per-instance
  wrappers: ``model_wrap_cfg.forward`` (sd_samplers_cfg_denoiser.py:156; it receives the sampler's
  own ``x``, where the skip residual is applied in place: :func:`accdiffusion.job.hook_skip_residual`)
  and the k-diffusion denoiser's ``forward`` (``model_wrap_cfg.inner_model``, called at
  sd_samplers_cfg_denoiser.py:246-271 with the CFG rows), where the fused tiled denoiser runs. Both
  wrappers call the ``forward`` they replaced (bound method or another extension's wrapper).
- Rows are recognised by content (:mod:`accdiffusion.rows`).

Every ``modules.*`` call goes through ``job.webui`` (:class:`accdiffusion.webui.WebUI`), so the
tests drive this backend with stand-ins on CPU.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .attention import AttentionRecorder, find_cross_attention
from .hires import StageDenoiser
from .job import hook_skip_residual
from .rows import positive_texts, row_image, schedule_entry, split_cond, stack_cond, tile_conditions
from .tiles import Window

if TYPE_CHECKING:
    from .job import Job

log = logging.getLogger("accdiffusion")


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

    @contextmanager
    def probe_unet(self, p: Any, job: "Job", sampler: Any, recorder: AttentionRecorder,
                   conds: Sequence[Any]) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The probe pass's UNet call: the k-diffusion denoiser (``sampler.model_wrap``) on the
        positive rows only, with the cond dict the CFG denoiser would build for them
        (sd_samplers_cfg_denoiser.py:189-200); the recorder on the attn2 modules meanwhile."""
        recorder.row_images = list(range(len(conds)))
        is_dict = isinstance(conds[0], dict)
        rows = [dict(c) if is_dict else {"c_crossattn": c} for c in conds]
        like = {k: v for k, v in rows[0].items()} if is_dict else {"c_crossattn": [conds[0]]}

        def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            cond = stack_cond(rows, like)
            cond = {k: (v.to(x.device) if isinstance(v, torch.Tensor) else [t.to(x.device) for t in v])
                    for k, v in cond.items()}
            cond["c_concat"] = [p.txt2img_image_conditioning(x)]
            with job.webui.autocast():
                return sampler.model_wrap(x, sigma, cond=cond)

        recorder.attach(find_cross_attention(p.sd_model.model.diffusion_model, include_middle=False))
        try:
            yield call
        finally:
            recorder.detach()

    def prepare_stage(self, p: Any, job: "Job") -> None:
        """Nothing to reset on A1111 between stages."""

    def hook_stage(self, job: "Job", p: Any, sampler: Any, denoiser: StageDenoiser,
                   positives: list[list[torch.Tensor]], tile_schedules: list[list | None],
                   windows: list[Window]) -> None:
        _hook_sampler(job, sampler, denoiser, positives, tile_schedules, windows,
                      job.webui.sdxl_crop_embedder(p.sd_model))


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
