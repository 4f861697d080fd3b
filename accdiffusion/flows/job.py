"""One generation job and the host-neutral tiled pass.

A :class:`Job` lives on ``p`` (``p.accdiffusion_job``) from the script's ``process`` to its
``postprocess``; it holds the settings, the WebUI object (:class:`accdiffusion.flows.webui.WebUI` or a
stand-in), the host backend (``a1111.A1111Backend`` / ``forge.ForgeBackend``) and every hook the
extension installs, so :meth:`Job.end_batch` can undo them all.

:func:`run_tiled_pass` is the progressive tiled sampling every flow shares (txt2img hires and the
Upscale button in :mod:`accdiffusion.flows.txt2img`, img2img in :mod:`accdiffusion.flows.img2img`): stages from
the source's size up to the target, per-tile prompts, dilated sampling, the skip residual. What it
starts from is a :class:`TiledPassSource` (a first pass with its recorded maps, or an upscaled init
image with probe maps); what it samples with is a :class:`TiledPassTarget`. The host's part of each stage goes through ``job.backend``
(``prepare_stage`` / ``hook_stage``) and every ``modules.*`` call through ``job.webui``.

Each stage runs the WebUI's own ``sampler.sample_img2img`` (A1111 processing.py:1454); the skip
residual is applied in place on the sampler's own ``x`` through a per-instance wrapper of
``sampler.model_wrap_cfg.forward`` (sd_samplers_cfg_denoiser.py:156 on A1111; Forge's CFG
denoiser has the same entry point). The sampler may be a k-diffusion one (its CFG denoiser gets
x and σ) or a timestep one (DDIM, DDIM CFG++, PLMS, UniPC: x_t and t, ε out); the backend's
:class:`~accdiffusion.method.timesteps.SamplerSpace` says which, and the pass itself stays in the
k-diffusion frame (:mod:`accdiffusion.method.timesteps`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import torch

from ..method.attention import AttentionRecorder
from ..method.batching import AutoTileBatch
from ..method.hires import (AccDiffusionError, EncodeCache, Stage, StageDenoiser, StageStats, cover_resize,
                            latent_stats, plan_stages, restandardise, restandardise_stage_output, should_tile_decode,
                            stage_windows, tiled_decode)
from ..method.prompts import ImagePromptPlan
from .rows import positive_texts
from ..method.settings import FIELDS, STEP_ASIDE_KEY, AccDiffusionSettings, infotext_key
from ..method.tileprompts import StageTilePrompts, WindowConditioning
from ..method.tiles import Window
from ..method.timesteps import SamplerSpace
from ..method.words import (Word, align_words, align_words_by_text, is_byte_level, split_words, template_spans,
                            token_bytes)

if TYPE_CHECKING:
    from .webui import WebUI

log = logging.getLogger("accdiffusion")

JOB_ATTR = "accdiffusion_job"  # the attribute of p that holds the job (webui_glue.JOB_ATTR too)
_AND = re.compile(r"\bAND\b")
_NO_ATTR = object()


def comment(p: Any, text: str) -> None:
    """A note under the image (and in the log)."""
    log.warning(text)
    if hasattr(p, "comment"):
        p.comment(text)


def step_aside(p: Any, reason: str, stock: str) -> None:
    """AccDiffusion does not run this job and the WebUI's own ``stock`` pass does: a note, and an
    infotext that says so. Every ``AccDiffusion …`` setting key is taken out (nothing of them ran;
    pasting the infotext back gives the same image, with AccDiffusion off) and
    ``AccDiffusion stepped aside: <reason>; the WebUI's own <stock> ran`` put in their place."""
    comment(p, f"AccDiffusion: {reason}; the WebUI's own {stock} ran instead.")
    ours = {infotext_key(f) for f in FIELDS}
    params = {k: v for k, v in (getattr(p, "extra_generation_params", None) or {}).items() if k not in ours}
    params[STEP_ASIDE_KEY] = f"{reason}; the WebUI's own {stock} ran"
    p.extra_generation_params = params  # a new dict: X/Y/Z cells are shallow copies of one p


def refusal(job: "Job") -> Exception:
    """The exception that stops a job whose settings were refused (``job.error``), after one line
    in the console: the host's client-error exception (the API answers HTTP 422 with the message,
    :meth:`accdiffusion.flows.webui.WebUI.refusal`), or an :class:`AccDiffusionError` without a host."""
    message = str(job.error)
    log.warning("%s (the request was refused)", message)
    make = getattr(job.webui, "refusal", None)
    return make(message) if make is not None else AccDiffusionError(message)


# --- the job ----------------------------------------------------------------------------------
@dataclass
class TileMapData:
    source: Any  # PIL image the map is drawn on (the first pass)
    windows: list[Window]
    prompts: list[str]
    latent_size: tuple[int, int]
    seed: int
    prompt: str
    pixels_per_latent: int = 8


@dataclass
class Job:
    """State of one generation job (all batches); everything the extension attaches is reachable
    from here and removed by :meth:`end_batch`."""
    settings: AccDiffusionSettings
    webui: "WebUI | Any"
    error: Exception | None = None
    backend: Any = None  # a1111.A1111Backend or forge.ForgeBackend
    recorder: AttentionRecorder | None = None
    tile_maps: list[TileMapData] = field(default_factory=list)
    stage_stats: list[StageStats] = field(default_factory=list)
    _restore: list[Callable[[], None]] = field(default_factory=list)  # pass and stage hooks
    _batch_restore: list[Callable[[], None]] = field(default_factory=list)  # p.sample overrides
    conditioning: Any = None  # the batch's positive conditioning (for a probe pass), set by p.sample
    unconditioning: Any = None  # and its negative one (a Forge probe passes both to the scripts)
    probe_stats: list[Any] = field(default_factory=list)  # probe.ProbeStats of each probe pass
    # tile_batch_size 0: one per job, so each window shape's memory is measured once (the backend
    # makes it: Forge reads free memory through its own memory management)
    auto_batch: AutoTileBatch | None = None
    # the encoded tile prompts of every batch, per encoding context (:func:`encoding_context`)
    encode_caches: dict[Hashable, EncodeCache] = field(default_factory=dict)
    # the host's latents carry a time axis [B, C, 1, H, W] (Neo's Qwen-Image and Anima, video-VAE
    # latents, processing.py:1480-1486): the job works on [B, C, H, W] and gives the model, the VAE
    # and the host back their own shape (:func:`host_latent`, :func:`flat_latent`)
    time_axis: bool = False

    # --- hooks -------------------------------------------------------------------------------
    def set_attr(self, obj: Any, name: str, value: Any, batch: bool = False) -> None:
        """Set an instance attribute and remember how to undo it exactly (a previous instance
        attribute, e.g. another extension's wrapper, is put back; else ours is removed)."""
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


def hook_skip_residual(job: Job, sampler: Any, denoiser: StageDenoiser, space: SamplerSpace) -> None:
    """The CFG denoiser is called with the sampler's own x: the skip residual goes in there (in the
    sampler's frame: a timestep sampler's x_t and t are read through ``space``). The wrapper calls
    the ``forward`` that was there before (bound method or another wrapper)."""
    cfg = sampler.model_wrap_cfg
    cfg_forward = cfg.forward

    def skip_residual_forward(x: torch.Tensor, level: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sigma, scale = space.noise_level(level)
        denoiser.skip_residual_(x, sigma, scale)
        return cfg_forward(x, level, *args, **kwargs)

    job.set_attr(cfg, "forward", skip_residual_forward)


# --- what the tiled pass starts from and samples with --------------------------------------------
@dataclass
class TiledPassSource:
    """What the tiled pass upscales: one latent per image at the base size, with what is known
    about each image. txt2img hires: the first pass and its recorded maps; later img2img and the
    Upscale button: the (encoded) init image and its probe maps."""
    latent: torch.Tensor  # [B, C, h, w] at the base size; also sets the stage plan's start
    pixels: torch.Tensor | None  # the same images decoded ([-1, 1]) for a pixel upscaler, or None
    plans: list[ImagePromptPlan | None]  # per image: its words and masks, or None (full prompt everywhere)
    seeds: list[int]  # per image; the first seeds the dilated sampling's shuffles
    prompts: list[str]  # per image, written on its tile-prompt map
    map_images: list[Any] | None = None  # per image, the PIL image its tile-prompt map is drawn on
    # img2img: the first stage's input at a stage size (the upscaled init image); None: the hires
    # upscaler on ``latent`` / ``pixels``
    first_input: Callable[[tuple[int, int]], torch.Tensor] | None = None
    stats_of: torch.Tensor | None = None  # the latent whose mean/std the stages keep (None: latent)
    # img2img's *Initial noise multiplier* (settings, or the API's ``initial_noise_multiplier``):
    # every stage's noise is scaled as the stock img2img scales its one pass's noise
    noise_multiplier: float = 1.0


@dataclass
class TiledPassTarget:
    """What the flow samples with at the target size."""
    latent_size: tuple[int, int]  # the final latent (after the host's crop for a changed aspect)
    width: int  # pixel size the tile prompts are encoded for
    height: int
    steps: int
    sampler_name: str  # a k-diffusion or timestep sampler (``webui.sampler_kind``)
    cond: Any  # the full prompt's conditioning (the WebUI's MulticondLearnedConditioning)
    uncond: Any
    image_conditioning: Callable[[torch.Tensor], torch.Tensor]


def _network_key(data: Any) -> tuple:
    """The extra networks of a parsed prompt (``{name: [ExtraNetworkParams]}``) as a hashable
    value; params compare by their ``items`` (extra_networks.py), so the key does too."""
    if not data:
        return ()
    def params_key(params: Any) -> tuple[str, ...]:
        return tuple(str(item) for item in getattr(params, "items", [params]))

    return tuple(sorted((str(name), tuple(params_key(params) for params in entries)) for name, entries in data.items()))


def encoding_context(p: Any, width: int, height: int) -> Hashable:
    """What an encoded tile prompt depends on besides its text, within one job: the extra
    networks the batch activated (a LoRA's text-encoder weights change the conditioning, and with
    wildcards each batch may name others; the WebUI's own cond cache keys on them too,
    processing.py:440-458) and the size the prompts are encoded for."""
    return (bool(getattr(p, "disable_extra_networks", False)), _network_key(getattr(p, "extra_network_data", None)),
            _network_key(getattr(p, "hr_extra_network_data", None)), width, height)


def run_tiled_pass(p: Any, job: Job, source: TiledPassSource, target: TiledPassTarget) -> torch.Tensor:
    """The progressive tiled pass; returns the last stage's latent (the source's latent if
    interrupted before the first stage). Needs ``p.rng``, ``p.sampler``, ``p.scripts`` as the
    WebUI's own pass does; the hooks of each stage are undone in a ``finally``.

    Every stage's input and output (the last one included, before decoding) is re-standardised
    to one reference: the source's ``stats_of`` (img2img: the init latent), else its latent (the
    first pass); per image, and a flow model's stage output per image and channel."""
    webui, settings, state = job.webui, job.settings, job.webui.state
    samples = source.latent
    base = (samples.shape[-2], samples.shape[-1])
    stages = plan_stages(base, target.latent_size, settings.progressive)
    webui.add_progress(len(stages) - 1, (len(stages) - 1) * target.steps)
    reference_latent = (source.stats_of if source.stats_of is not None else samples).float()
    mean, std = latent_stats(reference_latent)
    # each distinct tile prompt is encoded once per job, whichever batch, stage or step asks for it
    context = encoding_context(p, target.width, target.height)
    if context not in job.encode_caches:
        job.encode_caches[context] = EncodeCache(
            lambda prompts: webui.learned_conditioning(p, prompts, target.width, target.height))
    cache = job.encode_caches[context]
    positives = positive_texts(target.cond)
    if job.auto_batch is None:
        job.auto_batch = job.backend.auto_tile_batch()
    skip_scale = job.backend.skip_scale(p)
    sampling = job.backend.model_sampling(p)
    kind = webui.sampler_kind(target.sampler_name)  # k-diffusion or timesteps (hosts step aside for others)
    # a flow model's stage output drifts per channel: restandardise_stage_output says what was measured
    out_mean, out_std = latent_stats(reference_latent, per_channel=True) if sampling.flow else (mean, std)

    latent = samples
    batch_maps: list[TileMapData] = []
    note = batch_seed_note(source.seeds, settings)
    if note:
        comment(p, note)
    for stage in stages:
        if state.interrupted or state.skipped:
            break
        if stage.index == 1 and source.first_input is not None:
            x_up = source.first_input(stage.size)
        else:
            x_up = _stage_input(p, job, stage, latent, samples, source.pixels)
        x_up = restandardise(x_up.float(), mean, std).to(samples.dtype)
        state.nextjob()
        p.rng = webui.image_rng(x_up.shape[1:], p)
        noise = p.rng.next()
        if source.noise_multiplier != 1.0:
            noise = noise * source.noise_multiplier
        windows = stage_windows(stage, base, settings, align=sampling.size_multiple if sampling.flow else 1)
        tile_schedules, lookups = _tile_schedules(source.plans, stage, windows, settings, cache)
        sampler = webui.create_sampler(target.sampler_name, p.sd_model)
        p.sampler = sampler
        space = job.backend.sampler_space(p, sampler, kind)
        denoiser = StageDenoiser(stage, windows, settings, int(source.seeds[0]),
                                 sampling.sigma_to_t or space.sigma_to_t,
                                 reference=x_up, noise=noise, skip_scale=skip_scale, auto_batch=job.auto_batch,
                                 noise_scaling=sampling.noise_scaling if sampling.flow else None,
                                 **({"size_multiple": sampling.size_multiple} if sampling.flow else {}))
        job.backend.prepare_stage(p, job)
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p=p, x=x_up, noise=noise, c=target.cond, uc=target.uncond)
        try:
            job.backend.hook_stage(job, p, sampler, denoiser, space, positives, tile_schedules, windows)
            latent = sampler.sample_img2img(p, x_up, noise, target.cond, target.uncond, steps=target.steps,
                                            image_conditioning=target.image_conditioning(x_up))
        finally:
            job.undo_hooks()
        latent = restandardise_stage_output(latent.float(), out_mean, out_std).to(latent.dtype)
        job.stage_stats.append(denoiser.stats)
        _log_stage(stage, denoiser, settings, cache)
        map_windows, map_prompts = _shown_tiles(denoiser, windows, lookups)
        for i, prompts_i in enumerate(map_prompts):
            if prompts_i:
                log.debug("AccDiffusion stage %d image %d tile prompts: %s", stage.index, i, prompts_i)
        if settings.tile_prompt_map and source.map_images is not None:  # the last stage's tiles are shown
            batch_maps = [TileMapData(source.map_images[i], map_windows, t, stage.size, int(source.seeds[i]),
                                      source.prompts[i], latent_factor(p.sd_model))
                          for i, t in enumerate(map_prompts) if t]
    job.tile_maps.extend(batch_maps)  # every batch of the job (batch count > 1) keeps its maps
    return latent


def batch_seed_note(seeds: Sequence[int], settings: AccDiffusionSettings) -> str | None:
    """The windows of one batch are shared by its images, so their random offsets (shifted) and
    shuffles (window interaction) come from the first image's seed: an image after the first is
    remade by the whole batch, not by its own seed alone. Said where it applies."""
    seeded = settings.window_mode == "shifted" or (settings.dilated_sampling and settings.window_interaction)
    if not seeded or len(set(int(s) for s in seeds)) < 2:
        return None
    return (f"AccDiffusion: the window offsets and shuffles of this batch came from its first seed "
            f"({int(seeds[0])}); to remake a later image, run the whole batch again.")


def _tile_schedules(plans: Sequence[ImagePromptPlan | None], stage: Stage, windows: list[Window],
                    settings: AccDiffusionSettings, cache: EncodeCache[list]
                    ) -> tuple[list[Any], list[StageTilePrompts | None] | list[list[str] | None]]:
    """Per image, what its positive rows are tiled with, and how to name each window's prompt.
    overlap: the stage's windows are fixed, so a list (one schedule per window) and the prompts;
    shifted: the windows move every step, so a lookup ``window -> schedule`` that cuts the tile
    prompt from exactly the window denoised (:class:`StageTilePrompts`) and encodes each distinct
    prompt once through ``cache``."""
    threshold = settings.patch_prompt_threshold
    if settings.window_mode == "shifted":
        lookups = [StageTilePrompts(plan, stage.size, threshold) if plan else None for plan in plans]
        return [WindowConditioning(lookup, cache.get) if lookup else None for lookup in lookups], lookups
    prompts = [plan.tile_prompts(stage.size, windows, threshold) if plan else None for plan in plans]
    return [cache.get(t) if t else None for t in prompts], prompts


def _shown_tiles(denoiser: StageDenoiser, windows: list[Window],
                 lookups: Sequence[StageTilePrompts | list[str] | None]) -> tuple[list[Window], list[list[str] | None]]:
    """The windows the tile-prompt map (and the debug log) shows, and per image their prompts.
    overlap: the stage's windows. shifted: the windows of the stage's last step (they tile the
    latent without overlap; earlier steps had the same tiling moved)."""
    if not any(isinstance(lookup, StageTilePrompts) for lookup in lookups):
        return windows, [list(t) if t else None for t in lookups]  # type: ignore[arg-type]
    last = denoiser.windows_at(denoiser.stats.steps - 1) if denoiser.stats.steps else windows
    return last, [[lookup(w) for w in last] if isinstance(lookup, StageTilePrompts) else None for lookup in lookups]


def _log_stage(stage: Stage, denoiser: StageDenoiser, settings: AccDiffusionSettings, cache: EncodeCache) -> None:
    stats = denoiser.stats
    how = "set" if settings.tile_batch_size else "automatic"
    log.info("AccDiffusion stage %d (%dx%d latent, %s windows): %d windows per UNet call (%s), %d UNet calls, "
             "%d window evaluations, skipped %d local + %d dilated (branch weight < %g); %d tile prompts encoded so far",
             stage.index, stage.size[1], stage.size[0], settings.window_mode, stats.tile_batch, how, stats.unet_calls,
             stats.window_evals, stats.skipped_local_evals, stats.skipped_dilated_evals, denoiser.branch_epsilon,
             cache.encodes)


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
    f = latent_factor(p.sd_model)
    encoded = flat_latent(job.webui.pixel_upscale(p, decoded_samples, cover[1] * f, cover[0] * f))
    return cover_resize(encoded, stage.size, "nearest")


def image_plans(p: Any, job: Job, maps: Sequence[torch.Tensor | None] | None) -> list[ImagePromptPlan | None]:
    """Per image of the batch: words of its hires prompt with masks from its own ``maps`` (the
    recorder's, or later a probe's), or None (patch prompts off, no maps, or an AND prompt: every
    tile then takes the full prompt)."""
    webui = job.webui
    if maps is None or not job.settings.patch_prompts:
        return [None] * len(p.prompts)
    embedder = webui.text_embedder(p.sd_model)
    plans: list[ImagePromptPlan | None] = []
    for i, prompt in enumerate(p.prompts):
        hires_prompt = p.hr_prompts[i] if getattr(p, "hr_prompts", None) else prompt
        image_maps = maps[i]
        if _AND.search(prompt) or _AND.search(hires_prompt):
            comment(p, "AccDiffusion: prompts with AND keep the full prompt in every tile.")
            plans.append(None)
            continue
        if image_maps is None:
            # the hooks never saw the model's attention (e.g. a model whose attention layers moved):
            # the pass still runs, but the tiles' prompts, the heart of the method, are off — say so
            comment(p, f"AccDiffusion: no attention maps were recorded for image {i + 1} (the model's attention "
                       "was not reached); its tiles took the full prompt and it has no tile-prompt map.")
            plans.append(None)
            continue
        words = split_words(prompt)
        positions = word_positions(embedder, words, webui.final_prompt_variant(prompt, p.steps))
        plans.append(ImagePromptPlan.build(words, positions, image_maps, hires_prompt, split_words(hires_prompt),
                                           units=job.settings.prompt_units))
    return plans


def word_positions(embedder: Any, words: Sequence[Word], variant: str) -> list[list[int]]:
    """Each word's positions in the context the model sees for the prompt ``variant``, found with
    the host's own text engine. CLIP and T5 engines: by each word's ids (:func:`align_words`). LLM
    engines (Neo's Qwen3 / Qwen2.5-VL / Gemma engines: a chat template around every parsed piece,
    byte-level BPE): by text, the template's own text stepped over (:func:`align_words_by_text`),
    and through the engine's ``strip_template`` where it cuts the template off the output
    (Qwen-Image, qwen_engine.py:101)."""
    line, template = engine_line(embedder, variant)
    lined = embedder.tokenize_line(line)
    chunks = lined[0] if isinstance(lined, tuple) else lined  # Neo's LLM engines return the chunks alone
    if hasattr(chunks[0], "t5_tokens"):
        # Anima: the model attends to the LLM adapter's output, one token per T5 token of the prompt
        # (anima_engine.py:59-72, :117-122; EOS 1), so words are found among the T5 ids
        t5_ids = [t for chunk in chunks for t in chunk.t5_tokens]
        tokenize = lambda text: embedder.t5_tokenizer([text], add_special_tokens=False)["input_ids"][0]
        return align_words(words, t5_ids, {0, getattr(embedder, "id_end", 1)}, tokenize)
    context_ids = [t for chunk in chunks for t in chunk.tokens]
    if not (is_llm_engine(embedder) or is_bare_llm_engine(embedder)):
        # CLIP engines have a start token, Forge's T5 engine (t5_engine.py:28-29) only end and pad
        special = {getattr(embedder, "id_start", None), embedder.id_end, getattr(embedder, "id_pad", embedder.id_end)}
        return align_words(words, context_ids, special, lambda text: embedder.tokenize([text])[0])
    ids = [_as_int(t) for t in context_ids]
    tokenizer = text_tokenizer(embedder)
    names = tokenizer.convert_ids_to_tokens([t for t in ids if t is not None])
    spelled, byte_level = iter(names), is_byte_level(names)
    pieces = [token_bytes(next(spelled), byte_level) if t is not None else b"" for t in ids]
    if template is None:
        # no template: a special token (Ernie's <s> before the line) is never the prompt's text
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        pieces = [b"" if t in special else piece for t, piece in zip(ids, pieces)]
    positions = align_words_by_text(words, pieces, template_spans(b"".join(pieces), template))
    kept = kept_positions(embedder, context_ids)
    return [[kept[i] for i in found if i in kept] for found in positions]


def is_llm_engine(embedder: Any) -> bool:
    """Neo's LLM text engines: a chat template around every parsed piece (Qwen3 / Qwen2.5-VL,
    ``llama_template``) or a system prompt before the line (Lumina 2's Gemma engine,
    ``process_template``); their tokenizers are byte-level BPE or SentencePiece."""
    return getattr(embedder, "llama_template", None) is not None or callable(getattr(embedder, "process_template", None))


def is_bare_llm_engine(embedder: Any) -> bool:
    """An LLM engine that tokenizes the prompt as it is after a start token, with no template (Neo's
    Ministral-3 engine for Ernie-Image, ministral3_engine.py:28-60: emphasis off, so the line is one
    piece; a PixtralProcessor's tokenizer, byte-level BPE): a start token but no end token, unlike
    the CLIP and T5 engines, which all have ``id_end``."""
    return (not hasattr(embedder, "id_end") and hasattr(embedder, "id_start")
            and hasattr(text_tokenizer(embedder), "convert_ids_to_tokens"))


def text_tokenizer(embedder: Any) -> Any:
    """The engine's tokenizer, or the tokenizer inside its processor (Ernie's PixtralProcessor)."""
    tokenizer = getattr(embedder, "tokenizer", None)
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and not hasattr(tokenizer, "convert_ids_to_tokens") else tokenizer


def engine_line(embedder: Any, variant: str) -> tuple[str, str | None]:
    """The line the engine tokenizes for a prompt, and the ``str.format`` template the prompt sits
    in there (None: the whole line is the prompt's). Lumina 2's Gemma engine puts its system
    prompt (a WebUI option) before the line in ``__call__`` (gemma_engine.py:75-95), not in
    ``tokenize_line``: the line is built the same way here. A prompt that has its own
    ``<Prompt Start>`` is left as written, so all of it is the prompt's."""
    process = getattr(embedder, "process_template", None)
    if callable(process):
        line = process(variant, False)
        if not variant or line == variant or variant not in line:
            return line, None
        return line, line.replace(variant, "{}", 1)
    return variant, getattr(embedder, "llama_template", None)


def _as_int(token: Any) -> int | None:
    try:
        return int(token)
    except (TypeError, ValueError):
        return None  # an image placeholder (Qwen-Image's edit tokens are dicts)


def kept_positions(embedder: Any, context_ids: Sequence[Any]) -> dict[int, int]:
    """Token position -> position in the conditioning, through the engine's ``strip_template`` when
    it has one (called on position numbers, so the host's own rule decides what is cut)."""
    count = len(context_ids)
    strip = getattr(embedder, "strip_template", None)
    if strip is None:
        return {i: i for i in range(count)}
    # as wide as the encoder's output: Neo's rule compares that width with the template's end
    # (qwen_engine.py:122, out.shape[1])
    width = _encoder_width(embedder) or count + 4
    numbers = torch.arange(count).unsqueeze(-1).expand(count, width)
    kept = strip(numbers, list(context_ids))
    return {int(old): new for new, old in enumerate(kept[:, 0].tolist())}


def _encoder_width(embedder: Any) -> int | None:
    try:
        return int(embedder.text_encoder.get_input_embeddings().weight.shape[1])
    except (AttributeError, TypeError, IndexError):
        return None


def latent_factor(model: Any) -> int:
    """Image pixels per latent pixel: 8, or what the model's VAE says when it is an integer (Neo's
    Flux.2 VAE packs 2x2 into 128 channels: 16, vae.py:140; its video VAEs give a per-axis tuple
    whose spatial part is 8)."""
    vae = getattr(getattr(model, "forge_objects", None), "vae", None)
    ratio = getattr(vae, "downscale_ratio", 8)
    return ratio if isinstance(ratio, int) and ratio > 0 else 8


def flat_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] (a host latent with a time axis) -> [B, C, H, W]; a 4-d latent as it is."""
    return latent.squeeze(2) if latent.ndim == 5 else latent


def flat_pixels(images: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, 1, 3, H, W] (Neo's video VAEs, qwen.py decode_first_stage) -> [B, 3, H, W]."""
    return images.squeeze(1) if images.ndim == 5 else images


def host_latent(job: Job, latent: torch.Tensor) -> torch.Tensor:
    """A job latent in the host's own shape (its time axis put back)."""
    return latent.unsqueeze(2) if job.time_axis and latent.ndim == 4 else latent


def decode_image(p: Any, job: Job, latent: torch.Tensor) -> torch.Tensor:
    """One decode of job latents through the WebUI, as [B, 3, H, W] in [-1, 1]."""
    return flat_pixels(job.webui.decode(p.sd_model, host_latent(job, latent)))


def decode_latent(p: Any, job: Job, latent: torch.Tensor) -> Any:
    """The pass's result as the WebUI's decoded samples; tiled when large (settings.tiled_decode)."""
    webui = job.webui
    if not should_tile_decode(job.settings.tiled_decode, tuple(latent.shape[-2:])):
        return webui.decode_batch(p.sd_model, host_latent(job, latent))
    images = []
    for i in range(latent.shape[0]):
        image = tiled_decode(latent[i:i + 1], lambda z: decode_image(p, job, z).float().cpu())
        images.append(image[0])
    return webui.decoded_samples(images)


def to_pil(image: torch.Tensor) -> Any:
    import numpy as np
    from PIL import Image

    array = torch.clamp((image.float() + 1.0) / 2.0, 0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).astype(np.uint8))
