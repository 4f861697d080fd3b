"""AUTOMATIC1111 1.10 backend: how the job hooks the A1111 objects (v1.10.1; file:line in
modules/processing.py unless named).

- The first pass records attention through per-instance ``attn2.forward`` wrappers on the ldm/sgm
  cross-attention modules (the WebUI swaps ``CrossAttention.forward`` at class level:
  sd_hijack_optimizations.py:88-91, so an instance attribute wins and is removed cleanly).
- Each hires stage runs the WebUI's own ``sampler.sample_img2img`` (1454) with two per-instance
  wrappers: ``model_wrap_cfg.forward`` (sd_samplers_cfg_denoiser.py:156; it receives the sampler's
  own ``x``, where the skip residual is applied in place: :func:`accdiffusion.flows.job.hook_skip_residual`)
  and the inner model's ``forward`` (``model_wrap_cfg.inner_model``, called at
  sd_samplers_cfg_denoiser.py:246-271 with the CFG rows), where the fused tiled denoiser runs. Both
  wrappers call the ``forward`` they replaced (bound method or another extension's wrapper). The
  inner model is k-diffusion's denoiser (x, σ → x₀) for a k-diffusion sampler, and
  ``CompVisTimestepsDenoiser`` (x_t, t → ε; sd_samplers_timesteps.py:26-71) for DDIM, DDIM CFG++,
  PLMS and UniPC, converted at this boundary (:mod:`accdiffusion.method.timesteps`).
- Rows are recognised by their place in the CFG denoiser's layout (:class:`CfgRows`,
  sd_samplers_cfg_denoiser.py:203-271), confirmed by content (:mod:`accdiffusion.flows.rows`). In the
  first pass the layout is read through the same two wrappers, installed on ``p.sampler`` from
  ``process_before_every_sampling`` (processing.py:1338, after the sampler is created).
- ControlNet (Mikubill/sd-webui-controlnet v1.1.455, file:line in its scripts/): its script (title
  "ControlNet") keeps ``latest_network`` (hook.py:377 ``UnetHook``) whose ``control_params`` hold one
  ``ControlParams`` (hook.py:162) per unit. In the hooked UNet forward it picks ``hr_hint_cond``
  when the input's height ×8 is not closer to ``hint_cond``'s (hook.py:518-534, ties go to the
  hires hint), skips units by ``guidance_stopped`` and ``disabled_by_hr_option`` (hook.py:221),
  multiplies the control by ``apply_effective_region_mask`` (hook.py:232) and adds it to the UNet
  (cldm.py ``h += guided_hint``: hint batch N or 1). So for every tiled call each unit's
  ``hr_hint_cond`` is set to the call's per-item hints (:class:`A1111Control`): ControlNet takes
  them as its hires hint (it believes it is in the hires pass: "Low res only"/"High res only" and
  the hires soft weighting work), and puts its own state back when the original returns.
  ControlNet marks cond/uncond rows with an extra first token (hook.py:48, :81); tile prompts get
  the mark of the row they replace.

Every ``modules.*`` call goes through ``job.webui`` (:class:`accdiffusion.flows.webui.WebUI`), so the
tests drive this backend with stand-ins on CPU.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..method.attention import AttentionRecorder, find_cross_attention
from ..method.batching import AutoTileBatch
from ..method.control import CallItems, StageHints, hint_rows_for, log_call, resize_hint
from ..method.flow import SD_SAMPLING, ModelSampling
from ..method.hires import StageDenoiser, v_prediction_c_skip
from ..flows.job import comment, hook_skip_residual
from ..flows.rows import UNPLACED, positive_texts, row_images, schedule_entry, split_cond, stack_cond, tile_conditions
from ..method.tiles import Window
from ..method.timesteps import TIMESTEPS, SamplerSpace, TimestepSchedule, eps_through_sigma_space

if TYPE_CHECKING:
    from ..flows.job import Job

log = logging.getLogger("accdiffusion")


def detect_a1111() -> str | None:
    """What this backend hooks, if the host has it: A1111's UNets are ldm's (SD1/SD2) and sgm's
    (SDXL) classes, called through the WebUI's k-diffusion CFG denoiser. Returns a name for the
    console, or None."""
    for package, name in (("ldm.modules.diffusionmodules.openaimodel", "ldm"),
                          ("sgm.modules.diffusionmodules.openaimodel", "sgm")):
        try:
            __import__(package)
        except ImportError:
            continue
        return f"AUTOMATIC1111 building blocks: {name} UNets"
    return None


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


class CfgRows:
    """Where the rows of the inner-model calls of one CFG step come from (A1111 v1.10.1,
    sd_samplers_cfg_denoiser.py:203-271): x_in holds, per image, one cond row per AND sub-prompt
    (repeats), then one uncond row per image. The inner model gets all of them in one call, or
    consecutive slices of them (batch_cond_uncond off: slices of batch-size rows; cond and uncond
    of different token counts: the cond rows in slices, then the uncond rows); skip-uncond
    (NGMS / skip early CFG) drops the uncond rows at the end. So the rows of each call are the
    next slice of the step's layout.

    :meth:`start_step` is called from the CFG denoiser's ``forward``, :meth:`take` from the inner
    model's; a call that does not fit the layout (an extension that changed x_in) is unplaced."""

    def __init__(self) -> None:
        self.places: list[int | None] | None = None
        self.offset = 0
        self.current: list[int | None] | None = None  # the places of the inner call in progress

    def start_step(self, cond: Any) -> None:
        batch = getattr(cond, "batch", None)
        if batch is None:
            self.places = None
            return
        places: list[int | None] = []
        for image, subprompts in enumerate(batch):
            places += [image if len(subprompts) == 1 else None] * len(subprompts)  # AND: no tile prompts
        self.places = places + [None] * len(batch)
        self.offset = 0

    def take(self, rows: int) -> list[int | None]:
        if self.places is None or self.offset + rows > len(self.places):
            self.current = [UNPLACED] * rows
        else:
            self.current = self.places[self.offset:self.offset + rows]
            self.offset += rows
        return self.current


def _cond_argument(args: tuple, kwargs: dict) -> Any:
    """``cond`` of CFGDenoiser.forward(x, sigma, uncond, cond, ...), by name (k-diffusion passes
    extra_args as keywords) or by position."""
    return kwargs["cond"] if "cond" in kwargs else (args[1] if len(args) > 1 else None)


def hook_cfg_rows(job: "Job", sampler: Any, layout: CfgRows) -> None:
    """Start the layout at every CFG step; the wrapper calls the ``forward`` that was there."""
    cfg = sampler.model_wrap_cfg
    cfg_forward = cfg.forward

    def rows_forward(x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        layout.start_step(_cond_argument(args, kwargs))
        return cfg_forward(x, sigma, *args, **kwargs)

    job.set_attr(cfg, "forward", rows_forward)


class A1111Backend:
    """How AUTOMATIC1111 is hooked: instance forwards on the ldm/sgm attn2 modules and on the
    sampler's k-diffusion denoiser."""

    def __init__(self) -> None:
        self.first_pass_rows = CfgRows()

    def unsupported_reason(self, p: Any) -> str | None:
        return unsupported_reason(p)

    def start_recording(self, p: Any, job: "Job", conditioning: Any, prompts: Sequence[str]) -> AttentionRecorder:
        """The recorder resolves each UNet call's rows by the place the layout gave them (see
        :meth:`before_sampling`); without it (no ``process_before_every_sampling``), by content."""
        recorder = AttentionRecorder((p.height // 8, p.width // 8), len(prompts))
        positives = positive_texts(conditioning)
        layout = self.first_pass_rows = CfgRows()

        def resolve(context: torch.Tensor) -> list[int | None]:
            places = layout.current if layout.current is not None and len(layout.current) == len(context) else None
            return row_images(list(context), positives, places)

        recorder.resolve_rows = resolve
        return recorder.attach(find_cross_attention(p.sd_model.model.diffusion_model, include_middle=False))

    def before_sampling(self, p: Any, job: "Job") -> None:
        """First pass (the sampler exists by now, processing.py:1308/1338): follow the CFG layout
        so the recorder knows each row's image. The attn2 wrappers stay for the whole pass."""
        sampler = getattr(p, "sampler", None)
        if p.is_hr_pass or job.recorder is None or sampler is None or not hasattr(sampler, "model_wrap_cfg"):
            return
        layout = self.first_pass_rows
        inner = sampler.model_wrap_cfg.inner_model
        inner_forward = inner.forward

        def placed_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            layout.take(x.shape[0])
            try:
                return inner_forward(x, *args, **kwargs)
            finally:
                layout.current = None

        hook_cfg_rows(job, sampler, layout)
        job.set_attr(inner, "forward", placed_forward)

    @contextmanager
    def probe_unet(self, p: Any, job: "Job", sampler: Any, recorder: AttentionRecorder, conds: Sequence[Any],
                   latents: torch.Tensor, images: Sequence[int]
                   ) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The probe pass's UNet call: the k-diffusion denoiser (``sampler.model_wrap``) on the
        positive rows only, with the cond dict the CFG denoiser would build for them
        (sd_samplers_cfg_denoiser.py:189-200); the recorder on the attn2 modules meanwhile.
        (``latents`` / ``images``, the probed latents and their places in the batch, are for
        Forge, whose scripts patch the UNet before every sampling.)"""
        recorder.row_images = list(range(len(conds)))
        is_dict = isinstance(conds[0], dict)
        rows = [dict(c) if is_dict else {"c_crossattn": c} for c in conds]
        like = {k: v for k, v in rows[0].items()} if is_dict else {"c_crossattn": [conds[0]]}

        def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            cond = stack_cond(rows, like)
            cond = {k: (v.to(x.device) if isinstance(v, torch.Tensor) else [t.to(x.device) for t in v])
                    for k, v in cond.items()}
            cond["c_concat"] = [p.txt2img_image_conditioning(x)]
            with job.webui.autocast(), whole_hints(p, (x.shape[-2] * 8, x.shape[-1] * 8)):
                return sampler.model_wrap(x, sigma, cond=cond)

        recorder.attach(find_cross_attention(p.sd_model.model.diffusion_model, include_middle=False))
        try:
            yield call
        finally:
            recorder.detach()

    def auto_tile_batch(self) -> AutoTileBatch:
        """tile_batch_size 0: CUDA free memory as torch reports it (A1111 keeps no count of its own)."""
        return AutoTileBatch()

    def model_sampling(self, p: Any) -> ModelSampling:
        """The models served here (SD 1.x, 2.x, SDXL) all noise as x₀ + σ·ε."""
        return SD_SAMPLING

    def skip_scale(self, p: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """c_skip(σ) for the dilated branch: A1111 wraps a v-model (``parameterization == "v"``: ldm
        for SD 2.x, sd_models_xl.py:99 for SGM) in k-diffusion's CompVisVDenoiser
        (sd_samplers_kdiffusion.py:61), whose c_skip is 1 / (σ² + 1); an ε-model needs none (c_skip = 1)."""
        return v_prediction_c_skip if getattr(p.sd_model, "parameterization", "eps") == "v" else None

    def sampler_space(self, p: Any, sampler: Any, kind: str | None) -> SamplerSpace:
        """A k-diffusion sampler's CFG denoiser gets σ; its wrapper maps σ to the timestep
        (CompVisDenoiser.sigma_to_t). A timestep sampler's ``CFGDenoiserTimesteps`` gets x_t and t
        and calls ``CompVisTimestepsDenoiser`` (ε; a v-model's output turned into ε) on the model's
        ``alphas_cumprod`` (sd_samplers_timesteps.py:26-71): σ of t from the same ᾱ."""
        if kind == TIMESTEPS:
            schedule = TimestepSchedule(p.sd_model.alphas_cumprod)
            return SamplerSpace(schedule.sigma_to_t, schedule.sigma)
        return SamplerSpace(sampler.model_wrap.sigma_to_t)

    def prepare_stage(self, p: Any, job: "Job") -> None:
        """Nothing to reset on A1111 between stages."""

    def hook_stage(self, job: "Job", p: Any, sampler: Any, denoiser: StageDenoiser, space: SamplerSpace,
                   positives: list[list[torch.Tensor]], tile_schedules: list[list | None],
                   windows: list[Window]) -> None:
        _hook_sampler(job, sampler, denoiser, positives, tile_schedules, windows,
                      job.webui.sdxl_crop_embedder(p.sd_model), A1111Control.for_stage(p, denoiser), space)


def _hook_sampler(job: Job, sampler: Any, denoiser: StageDenoiser, positives: list[list[torch.Tensor]],
                  tile_schedules: list[list | None], windows: list[Window],
                  crop_embed: Callable[[int, int], torch.Tensor] | None,
                  control: "A1111Control | None" = None, space: SamplerSpace | None = None) -> None:
    """The fused tiled denoiser in the inner model's ``forward``: a k-diffusion sampler's (x, σ →
    x₀) directly, a timestep sampler's (x_t, t → ε) through :func:`eps_through_sigma_space` (every
    window evaluated at the sampler's own t, the fused x₀ returned as ε)."""
    space = space or SamplerSpace(sampler.model_wrap.sigma_to_t)
    cfg = sampler.model_wrap_cfg
    inner = cfg.inner_model
    inner_forward = inner.forward
    layout = CfgRows()
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
        if control is not None:  # ControlNet's cond/uncond mark goes with the row
            key = "crossattn" if "crossattn" in out else "c_crossattn"
            out[key] = with_mark(row[key], out[key])
        return out

    def fused_forward(x: torch.Tensor, level: torch.Tensor, cond: dict | None = None, **kwargs: Any) -> torch.Tensor:
        rows = split_cond(cond)
        places = layout.take(x.shape[0])
        tiles = tile_conditions(rows, positives, tile_schedules, windows, tile_row, places)

        def model(xs: torch.Tensor, levels: torch.Tensor, conds: Sequence[dict]) -> torch.Tensor:
            """The inner model on a batch of windows: x₀ (k-diffusion) or ε (timesteps)."""
            tiled = control.tiled(denoiser.items, len(rows)) if control is not None else nullcontext()
            with tiled:
                return inner_forward(xs, levels, cond=stack_cond(conds, cond), **kwargs)

        if space.sigma_of_t is None:
            return denoiser(model, x, level, rows, tiles)
        return eps_through_sigma_space(lambda row_model, xk, sigma: denoiser(row_model, xk, sigma, rows, tiles),
                                       model, x, level, space.sigma_of_t)

    hook_skip_residual(job, sampler, denoiser, space)
    hook_cfg_rows(job, sampler, layout)
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


# --- ControlNet (sd-webui-controlnet) -------------------------------------------------------------
CONTROLNET_TITLE = "ControlNet"
MARK_TOKEN = 1024.0  # hook.py:36 POSITIVE_MARK_TOKEN (negative rows: -1024)
# ControlModelType names (scripts/enums.py:157) whose only spatial input is the hint: tiled
TILED_TYPES = {"ControlNet", "ControlLoRA", "InstantID", "ControlNetUnion"}
# no spatial input: the same on any batch of windows
GLOBAL_TYPES = {"IPAdapter", "ReVision", "T2I_StyleAdapter"}


def controlnet_network(p: Any) -> Any:
    """sd-webui-controlnet's ``UnetHook`` of this job (its script's ``latest_network``), or None."""
    scripts = getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []
    for script in scripts:
        try:
            title = script.title()
        except Exception:  # another extension's title() is not ours to debug
            continue
        if title == CONTROLNET_TITLE and getattr(script, "latest_network", None) is not None:
            return script.latest_network
    return None


def is_marked(token: torch.Tensor) -> bool:
    return bool(torch.all((token.abs() - MARK_TOKEN).abs() < 1e-3))


def with_mark(row_text: torch.Tensor, tile_text: torch.Tensor) -> torch.Tensor:
    """A tile prompt replacing a marked row carries the same mark as its first token."""
    if row_text.shape[0] > 0 and is_marked(row_text[0]) and not is_marked(tile_text[0]):
        return torch.cat([row_text[:1].to(tile_text), tile_text])
    return tile_text


def _name(value: Any) -> str:
    return str(getattr(value, "name", value))


def hint_attr(param: Any) -> str:
    """Where a unit's hint for the tiled pass goes: ``hr_hint_cond`` in a hires fix (ControlNet then
    believes it is in the hires pass, hook.py:518-534); img2img has none
    (scripts/controlnet.py:256-263), so ``hint_cond`` (its setter drops the cached ``used_hint_cond``)."""
    return "hr_hint_cond" if isinstance(getattr(param, "hr_hint_cond", None), torch.Tensor) else "hint_cond"


@contextmanager
def whole_hints(p: Any, size: tuple[int, int]) -> Iterator[None]:
    """For the probe pass (a whole small image): every tileable unit gets its whole hint resized to
    the probe's pixel size, as a first pass would; other units with a spatial input sit it out."""
    network = controlnet_network(p)
    saved: list[tuple[Any, str, Any]] = []

    def put(param: Any, name: str, value: Any) -> None:
        saved.append((param, name, getattr(param, name)))
        setattr(param, name, value)

    try:
        for param in list(getattr(network, "control_params", None) or []):
            kind = _name(param.control_model_type)
            if kind in TILED_TYPES and A1111Control._untileable(param) is None:
                source = param.hr_hint_cond if hint_attr(param) == "hr_hint_cond" else param.hint_cond
                put(param, "hint_cond", resize_hint(source, size))
                put(param, "hr_hint_cond", None)
            elif kind not in GLOBAL_TYPES:
                put(param, "guidance_stopped", True)
                put(param, "hr_hint_cond", None)
        yield
    finally:
        for param, name, value in reversed(saved):
            setattr(param, name, value)


class A1111Control:
    """sd-webui-controlnet's units during one stage: per tiled call, each unit's hires hint (and
    its effective-region mask) becomes the call's per-item hints; units that cannot be tiled sit
    the call out, with a note."""

    def __init__(self, p: Any, params: list[Any], denoiser: StageDenoiser):
        self.p = p
        self.params = params
        stage = denoiser.stage
        cut = lambda t: StageHints(t, stage.size, denoiser.windows, stage.dilation, denoiser.size_multiple)
        self.hints: dict[int, StageHints] = {}
        self.masks: dict[int, StageHints] = {}
        self.skipped: dict[int, str] = {}
        for i, param in enumerate(params):
            reason = self._untileable(param)
            if reason is None and _name(param.control_model_type) in TILED_TYPES:
                self.hints[i] = cut(param.hr_hint_cond if hint_attr(param) == "hr_hint_cond" else param.hint_cond)
                mask = getattr(param, "effective_region_mask", None)
                if isinstance(mask, torch.Tensor):
                    self.masks[i] = cut(mask)
            elif reason is not None:
                self.skip(i, reason)

    @staticmethod
    def for_stage(p: Any, denoiser: StageDenoiser) -> "A1111Control | None":
        network = controlnet_network(p)
        params = list(getattr(network, "control_params", None) or [])
        return A1111Control(p, params, denoiser) if params else None

    @staticmethod
    def _untileable(param: Any) -> str | None:
        kind = _name(param.control_model_type)
        if kind in GLOBAL_TYPES:
            return None if getattr(param, "effective_region_mask", None) is None else \
                "its effective region mask is not cut into tiles"
        if kind not in TILED_TYPES:
            return f"{kind} units are not cut into tiles"
        module = str((getattr(param, "preprocessor", None) or {}).get("name", ""))
        if "inpaint_only" in module or "colorfix" in module:
            return f"'{module}' encodes its hint with the VAE, which is not cut into tiles"
        hint, hr_hint = getattr(param, "hint_cond", None), getattr(param, "hr_hint_cond", None)
        if not (isinstance(hint, torch.Tensor) and hint.ndim == 4
                and (hr_hint is None or isinstance(hr_hint, torch.Tensor) and hr_hint.ndim == 4)):
            return "it has no hint image"
        return None

    def skip(self, index: int, reason: str) -> None:
        param = self.params[index]
        self.skipped[index] = reason
        if _name(getattr(param, "hr_option", "")) in ("LOW_RES_ONLY", "Low res only"):
            return  # off in the hires pass anyway
        module = (getattr(param, "preprocessor", None) or {}).get("name", "?")
        comment(self.p, f"AccDiffusion: ControlNet unit {index + 1} ({module}) was left out of the tiled hires "
                        f"pass: {reason}.")

    @contextmanager
    def tiled(self, items: CallItems | None, rows: int) -> Iterator[None]:
        saved: list[tuple[Any, str, Any]] = []

        def put(param: Any, name: str, value: Any) -> None:
            saved.append((param, name, getattr(param, name)))
            setattr(param, name, value)

        try:
            if items is not None:
                for i, param in enumerate(self.params):
                    hints = self.hints.get(i)
                    hint_rows = hint_rows_for(hints.batch, rows) if hints is not None else None
                    if hints is not None and hint_rows is None:
                        del self.hints[i]
                        self.skip(i, f"its {hints.batch} hint images do not match the batch")
                    if i in self.skipped:
                        put(param, "guidance_stopped", True)
                        put(param, "hr_hint_cond", None)  # so it does not vote on "hires or not"
                    elif hints is not None:
                        put(param, hint_attr(param), hints.for_call(items, hint_rows))
                        if i in self.masks:
                            mask_rows = hint_rows_for(self.masks[i].batch, rows) or [0] * rows
                            put(param, "effective_region_mask", self.masks[i].for_call(items, mask_rows))
                if log.isEnabledFor(logging.DEBUG):
                    log_call(items, {i + 1: h for i, h in self.hints.items()})
            yield
        finally:
            for param, name, value in reversed(saved):
                setattr(param, name, value)

