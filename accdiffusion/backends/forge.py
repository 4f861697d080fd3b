"""The Forge backend: how the job hooks the WebUIs built on Forge's model patcher — Forge 2
(lllyasviel/stable-diffusion-webui-forge main) and Forge Neo (its continuation), whose building
blocks live in ``backend.*``, and the old Forge backend of Forge Classic and reForge
(``ldm_patched.*`` and ``modules_forge.*``, the same lineage under other names). What differs
between them is found once, by what the host has (:func:`detect_forge_parts`,
:func:`model_predictor`, :func:`control_takes_options`); file:line references without a host name
are Forge 2's.

Forge has no ldm/sgm modules and its CFG denoiser never calls a k-diffusion denoiser: it runs
``backend.sampling.sampling_function`` on ``p.sd_model.forge_objects.unet`` (a ``UnetPatcher``)
and its ``model_options``. So, with Forge's own patching (backend/patcher/base.py, unet.py):

- first pass: from ``process_before_every_sampling`` (processing.py:1377), a clone of
  ``forge_objects.unet`` gets an ``attn2`` replace patch on every cross-attention position
  (base.py:179); the patch receives the projected q and k, feeds the recorder, and returns the
  same ``attention_function(q, k, v, heads)`` the module would (backend/nn/unet.py:255-265, :155).
  Forge resets ``forge_objects`` before every sampling (processing.py:1373, :1518), and may call
  the hook twice per pass: installing on a fresh clone each time is idempotent.
- hires stages: a clone with a ``model_function_wrapper`` (base.py:146; called at
  sampling_function.py:270 with ``apply_model`` and {"input", "timestep" (= sigma), "c",
  "cond_or_uncond"}) runs the fused tiled denoiser; the memory estimators are told that the peak
  is one batch of windows, not the full latent (unet.py:121, base.py:197, sampling_function.py:208).
  The wrapper always sees σ: for DDIM, DDIM CFG++, PLMS and UniPC Forge's ``CFGDenoiserTimesteps``
  converts x_t and t to x and σ before the sampling function and returns ε after it
  (sd_samplers_cfg_denoiser.py:163-169, :224-226); only the skip residual, applied to the
  sampler's own x_t before that, reads t (:meth:`ForgeBackend.sampler_space`).
- the batch comes as chunks in ``cond_or_uncond`` order (Forge runs [uncond, cond]), each chunk
  holding the batch's images in order: a row's image is its place in its chunk
  (:func:`cond_rows_to_images`), confirmed by content in the hires pass (:mod:`accdiffusion.flows.rows`);
  the recorder gets projected q/k only, so there the place alone decides.
- ControlNet (built in: extensions-builtin/sd_forge_controlnet, backend/patcher/controlnet.py):
  units are a linked list of ``ControlBase`` objects on the UnetPatcher (``controlnet_linked_list``,
  via ``previous_controlnet``); sampling_function.py:261-268 calls the head's ``get_control(x, t,
  cond, batched_number)`` on the full batch and passes ``control`` / ``control_model`` to the
  model. ``ControlNet.get_control`` (controlnet.py:292) resizes ``cond_hint_original`` to x×8 unless
  ``cond_hint`` already has that size, broadcasts its batch, skips outside ``timestep_range`` and
  weights by ``advanced_mask_weighting`` / ``transformer_options`` (:86-150). In a stage the head's
  full-size call is turned off (an instance ``get_control`` returning None) and the wrapper calls the
  original per tiled call with ``cond_hint`` (and the mask) set to the call's per-item hints
  (:class:`ForgeControl`). Forge's ControlNet reads ``p.is_hr_pass`` itself (hires modes).
- Flux, Chroma and SD 3.5 (joint-attention transformers, :mod:`accdiffusion.jointattention`):
  their forward takes no ``transformer_options`` patches, so the first pass records through a
  ``model_function_wrapper`` on a clone (chaining to one that was there) that holds forward hooks
  on the recorded blocks for the duration of each model call (:func:`_joint_recording_unet`).
  Their conditioning is {"c_crossattn", "y", "guidance"} (Flux), {"c_crossattn"} (Chroma),
  {"c_crossattn", "y"} (SD 3.5) (backend/sampling/condition.py:91-119): a tile row takes the tile
  prompt's text and pooled vector and keeps its own distilled guidance. Their forward builds the
  position ids (Flux/Chroma, nn/flux.py:410-416) or crops the position table (SD 3.5,
  mmditx.py:867-886) from the size of the latent it is given, so each window and sub-latent is
  positioned as an image of its own size. The flow predictor (k_prediction.py 'const') gives the
  noise scaling (:meth:`ForgeBackend.model_sampling`).
- the probe pass (img2img, the Upscale button) runs on the UNet a sampling would use: before it,
  ``forge_objects`` are reset and the scripts' ``process_before_every_sampling`` runs (ControlNet
  attaches its units, other extensions patch the UNet); each probe call evaluates the chain on its
  positive rows as one cond chunk and hands ``control`` to ``apply_model``
  (:meth:`ForgeBackend.probe_unet`). Everything is put back afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..method.attention import MIDDLE_BLOCK_NAMES, AttentionRecorder
from ..method.batching import AutoTileBatch, planned_tile_batch
from ..method.control import CallItems, StageHints, hint_rows_for, log_call
from ..method.flow import FLOW_SAMPLING, SD_SAMPLING, ModelSampling
from ..method.hires import StageDenoiser, v_prediction_c_skip
from ..flows.job import _NO_ATTR, comment, hook_skip_residual, is_bare_llm_engine, is_llm_engine, latent_factor
from ..method.jointattention import JointAttentionCapture, joint_family
from ..flows.rows import TEXT_KEYS, schedule_entry, split_cond, stack_cond, tile_conditions
from ..method.tiles import Window
from ..method.timesteps import TIMESTEPS, SamplerSpace, TimestepSchedule

if TYPE_CHECKING:
    from ..flows.job import Job

log = logging.getLogger("accdiffusion")

TENSOR_KEYS = ("c_crossattn", "y", "c_concat", "guidance")

@dataclasses.dataclass(frozen=True)
class ForgeParts:
    """The host functions the backend calls, found by :func:`detect_forge_parts`."""
    name: str  # which building blocks, for the console
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]
    sampling_prepare: Callable[[Any, torch.Tensor], None]
    sampling_cleanup: Callable[[Any], None]
    free_memory: Callable[[Any], int]
    # Neo's ``backend.args.dynamic_args``: the reference latents its Kontext / Klein / Qwen-Edit /
    # Anima models append to the image tokens (args.py:171), or None (a host without them)
    references: Any = None


def _forge2_parts() -> ForgeParts:
    """Forge 2 and Neo: ``backend.nn.unet.attention_function`` is what attn2 calls (Forge 2
    backend/nn/unet.py:155; Neo imports it there from backend.attention, unet.py:8, :149),
    sampling_prepare/cleanup in backend/sampling/sampling_function.py (Neo :365, :391),
    get_free_memory in backend/memory_management.py (Neo :1095)."""
    from backend import memory_management
    from backend.nn import unet as forge_unet
    from backend.sampling import sampling_function

    attention = forge_unet.attention_function
    try:
        from backend.args import dynamic_args
    except ImportError:  # Forge 2
        dynamic_args = None
    references = dynamic_args if isinstance(getattr(dynamic_args, "ref_latents", None), list) else None
    return ForgeParts("Forge 2 / Neo building blocks: backend.*",
                      lambda q, k, v, heads, extra: attention(q, k, v, heads),
                      sampling_function.sampling_prepare, sampling_function.sampling_cleanup,
                      lambda device: int(memory_management.get_free_memory(device)), references)


def _old_forge_parts() -> ForgeParts:
    """Forge Classic and reForge (old Forge: ldm_patched, a port of ComfyUI's model code):
    attn2 calls ``ldm_patched.ldm.modules.attention.optimized_attention`` (reForge passes the
    block's ``attn_precision``, attention.py:755; Classic's takes none, attention.py:124, :393),
    sampling_prepare/cleanup in modules_forge/forge_sampler.py (reForge :121, :146; Classic :99,
    :131), get_free_memory in ldm_patched/modules/model_management.py."""
    import inspect

    from ldm_patched.ldm.modules import attention as patched_attention
    from ldm_patched.modules import model_management
    from modules_forge import forge_sampler

    takes_precision = "attn_precision" in inspect.signature(patched_attention.optimized_attention).parameters

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra: dict) -> torch.Tensor:
        # the module global, read per call: the host may pick the attention kernel after import
        function = patched_attention.optimized_attention
        if takes_precision:
            return function(q, k, v, heads, attn_precision=extra.get("attn_precision"))
        return function(q, k, v, heads)

    return ForgeParts("old Forge building blocks: ldm_patched, modules_forge", attention,
                      forge_sampler.sampling_prepare, forge_sampler.sampling_cleanup,
                      lambda device: int(model_management.get_free_memory(device)))


def detect_forge_parts() -> ForgeParts | None:
    """The building blocks of the Forge-lineage host this runs in, or None (A1111, or a host we do
    not know): each candidate is tried by importing what the backend will call."""
    for candidate in (_forge2_parts, _old_forge_parts):
        try:
            return candidate()
        except (ImportError, AttributeError):
            continue
    return None


# ldm_patched's ModelType names (model_base.py) → the prediction types of Forge 2's k_prediction.py
_MODEL_TYPE_PREDICTION = {"EPS": "epsilon", "V_PREDICTION": "v_prediction", "V_PREDICTION_EDM": "edm",
                          "EDM": "edm", "FLOW": "const"}


@dataclasses.dataclass
class OldForgePredictor:
    """Old Forge's ``model.model_sampling`` (ComfyUI's ModelSamplingDiscrete: ``sigmas``,
    ``timestep(σ)``, ``sigma_data``) and ``model.model_type`` seen as Forge 2's predictor."""
    sampling: Any
    prediction_type: str

    @property
    def sigmas(self) -> torch.Tensor:
        return self.sampling.sigmas

    @property
    def sigma_data(self) -> float:
        return float(getattr(self.sampling, "sigma_data", 1.0))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sampling.timestep(sigma)

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(sigma, noise, latent)


def model_predictor(unet_patcher: Any) -> Any:
    """The model's predictor: Forge 2 / Neo ``model.predictor`` (backend/modules/k_prediction.py),
    old Forge ``model.model_sampling`` with ``model.model_type`` (:class:`OldForgePredictor`), or None."""
    model = getattr(unet_patcher, "model", None)
    predictor = getattr(model, "predictor", None)
    if predictor is not None:
        return predictor
    sampling = getattr(model, "model_sampling", None)
    if sampling is None:
        return None
    kind = getattr(getattr(model, "model_type", None), "name", "EPS")
    return OldForgePredictor(sampling, _MODEL_TYPE_PREDICTION.get(kind, "epsilon"))


def control_takes_options(cnet: Any) -> bool:
    """reForge's ControlNets take the call's transformer_options as a fifth argument
    (ldm_patched/modules/controlnet.py:217, samplers.py:329); Forge 2's, Neo's and Classic's take
    four (Forge 2 backend/patcher/controlnet.py:292, Classic controlnet.py:265). Read from the
    class's method: another extension's instance wrapper may hide the signature."""
    import inspect

    method = getattr(type(cnet), "get_control", None)
    try:
        return "transformer_options" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
  # guidance: Flux's distilled CFG, one value per row


def joint_transformer(unet_patcher: Any) -> torch.nn.Module | None:
    """The joint-attention transformer (Flux, Chroma, SD 3.5) a UnetPatcher runs, or None (a UNet)."""
    model = getattr(getattr(unet_patcher, "model", None), "diffusion_model", None)
    return model if model is not None and joint_family(model) is not None else None


def is_joint_model(p: Any) -> bool:
    return joint_transformer(p.sd_model.forge_objects.unet) is not None


def reference_tokens(holder: Any, patch: int) -> int:
    """How many tokens the host's reference latents add after the image's own in a model call
    (Neo flux.py:583-611: each reference patched like the image, padded to the patch)."""
    if holder is None or not holder.ref_latents:
        return 0
    return sum(-(-int(ref.shape[-2]) // patch) * -(-int(ref.shape[-1]) // patch) for ref in holder.ref_latents)


def _joint_recording_unet(unet_patcher: Any, recorder: AttentionRecorder, references: Any = None) -> Any:
    """A clone of a UnetPatcher whose model calls feed the recorder from the joint-attention blocks
    (:class:`JointAttentionCapture`, hooks held for the call only), with the rows' images from
    ``cond_or_uncond`` (sampling_function.py:271). A model_function_wrapper that was there (another
    extension's) is called inside, with the same arguments."""
    unet = unet_patcher.clone()
    previous = unet.model_options.get("model_function_wrapper")
    if hasattr(previous, "accdiffusion_previous"):  # ours (Forge may call the hook twice): replace, not stack
        previous = previous.accdiffusion_previous
    model = unet.model.diffusion_model

    def recording(apply_model: Callable[..., torch.Tensor], args: dict) -> torch.Tensor:
        rows = cond_rows_to_images(args.get("cond_or_uncond", [0]), int(args["input"].shape[0]))
        trailing = reference_tokens(references, int(getattr(model, "patch_size", 2)))
        with JointAttentionCapture(model, recorder, rows, trailing_tokens=trailing):
            if previous is not None:
                return previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

    recording.accdiffusion_previous = previous  # type: ignore[attr-defined]
    unet.set_model_unet_function_wrapper(recording)
    return unet


def with_time_axis(apply_model: Callable[..., torch.Tensor], time_axis: bool) -> Callable[..., torch.Tensor]:
    """``apply_model`` for job latents [B, C, H, W] when the model takes the host's [B, C, 1, H, W]
    (Neo's Qwen-Image: qwen.py:371-372 reads five dimensions)."""
    if not time_axis:
        return apply_model

    def call(x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = apply_model(x.unsqueeze(2) if x.ndim == 4 else x, t, *args, **kwargs)
        return out.squeeze(2) if out.ndim == 5 else out

    return call


@contextmanager
def without_references(holder: Any, seen: list[bool] | None = None) -> Iterator[None]:
    """A model call of ours without the host's reference latents: a window or sub-latent is an
    image of its own, and the reference (Klein's img2img / edit image, a Kontext image) is of the
    whole picture, at another size (Neo flux.py:583-611 appends its tokens to every call, anima.py:462-466
    concatenates it on the time axis). ``seen`` gets True when there were any."""
    if holder is None or not holder.ref_latents:
        yield
        return
    if seen is not None:
        seen.append(True)
    saved = holder.ref_latents
    holder.ref_latents = []
    try:
        yield
    finally:
        holder.ref_latents = saved


REFERENCE_NOTE = ("AccDiffusion: the tiled pass ran without the model's reference image (Flux.2 Klein / "
                  "Kontext / Edit): each window is denoised from the upscaled image alone.")


def joint_tile_row(row: dict, cond: Any) -> dict:
    """A Flux / Chroma / SD 3.5 row with a tile prompt's conditioning: its text sequence and
    pooled vector (Flux: CLIP-L's; SD 3.5: CLIP-L|G's); the row's own distilled guidance stays."""
    out = dict(row)
    if isinstance(cond, dict):
        out["c_crossattn"] = cond["crossattn"]
        if "y" in row and "vector" in cond:
            out["y"] = cond["vector"]
    else:
        out["c_crossattn"] = cond
    return out


def by_text_length(conds: Sequence[dict]) -> list[list[int]]:
    """Row indices grouped by text length, in order of first appearance. A transformer attends to
    every text token, so rows of different lengths are run apart rather than padded (Chroma's T5
    is not padded, t5_engine.py:20 min_length; a Flux prompt past 255 tokens is longer than its
    tile prompts)."""
    groups: dict[int, list[int]] = {}
    for i, cond in enumerate(conds):
        text = next((cond[k] for k in TEXT_KEYS if k in cond), None)
        groups.setdefault(int(text.shape[0]) if text is not None else 0, []).append(i)
    return list(groups.values())


def attn2_positions(unet: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(block name, block number, transformer index) of every attn2 outside the middle block, the
    keys of Forge's ``attn2`` replace patches."""
    out = []
    for name, _ in unet.named_modules():
        parts = name.split(".")
        if parts[-1] != "attn2" or any(p in MIDDLE_BLOCK_NAMES for p in parts):
            continue
        block = {"input_blocks": "input", "output_blocks": "output"}.get(parts[0])
        if block is None or "transformer_blocks" not in parts:
            continue
        out.append((block, int(parts[1]), int(parts[parts.index("transformer_blocks") + 1])))
    return out


def cond_rows_to_images(cond_or_uncond: Sequence[int], rows: int) -> list[int | None]:
    """Forge batches one chunk per entry of ``cond_or_uncond`` (0 = cond, 1 = uncond), each
    chunk holding the batch's images in order."""
    chunk = rows // max(1, len(cond_or_uncond))
    out: list[int | None] = []
    for kind in cond_or_uncond:
        out += list(range(chunk)) if kind == 0 else [None] * chunk
    return out


def transformer_options_for(options: dict, cond_or_uncond: Sequence[int], blocks: int,
                            sigmas: torch.Tensor) -> dict:
    """transformer_options for a call of ``blocks`` copies of the original chunk layout (what
    sampling_function.py:253-259 computes for the full batch)."""
    layout = list(cond_or_uncond) * blocks
    chunk = int(sigmas.shape[0]) // max(1, len(layout))
    out = dict(options)
    out["cond_or_uncond"] = layout
    out["sigmas"] = sigmas[:chunk]
    out["cond_mark"] = torch.tensor([float(k) for k in layout for _ in range(chunk)]).to(sigmas)
    out["cond_indices"] = [i * chunk + j for i, k in enumerate(layout) if k == 0 for j in range(chunk)]
    out["uncond_indices"] = [i * chunk + j for i, k in enumerate(layout) if k != 0 for j in range(chunk)]
    return out


def _recording_unet(unet_patcher: Any, recorder: AttentionRecorder, attention: Callable[..., torch.Tensor]) -> Any:
    """A clone of a UnetPatcher whose attn2 replace patches feed the recorder with the cond rows
    and return what attn2 would have computed without them: another extension's attn2 replace
    patch at that position (IP-Adapter's, backend/nn/unet.py:254-265 looks it up by (block,
    number, index), then (block, number); old Forge's attention.py:887-898 the same), else
    ``attention``, the function attn2 itself calls (:attr:`ForgeParts.attention`)."""
    unet = unet_patcher.clone()
    tokens = recorder.grid[0] * recorder.grid[1]
    existing = unet.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})

    def recording(previous: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor]:
        def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
            heads = extra["n_heads"]
            if q.shape[1] == tokens:
                images = cond_rows_to_images(extra.get("cond_or_uncond", [0]), q.shape[0])
                rows = [r for r, img in enumerate(images) if img is not None]
                if rows:
                    index = torch.tensor(rows, device=q.device)
                    recorder.add_qk(q.index_select(0, index), k.index_select(0, index), heads,
                                    [images[r] for r in rows])
            if previous is not None:
                return previous(q, k, v, extra)
            return attention(q, k, v, heads, extra)

        record.accdiffusion_replaced = previous  # type: ignore[attr-defined]
        return record

    for block, number, index in attn2_positions(unet.model.diffusion_model):
        previous = existing.get((block, number, index), existing.get((block, number)))
        if hasattr(previous, "accdiffusion_replaced"):  # ours (Forge may call the hook twice): replace, not stack
            previous = previous.accdiffusion_replaced
        unet.set_model_attn2_replace(recording(previous), block, number, index)
    return unet


# model_options Forge's CFG loop runs around the UNet call (sampling_function.py:325-363 and
# sampling_function_inner); a probe call (one positive chunk, no CFG) cannot run them
CONDITIONING_MODIFIERS = "conditioning_modifiers"


def probe_hint_rows(chain: Sequence[Any], images: Sequence[int]) -> list[tuple[Any, str, Any]]:
    """Give each ControlNet of the chain the hint (and mask) rows of the probed images: Forge's
    ControlNet batched them to the job's batch size (scripts/controlnet.py:352-376), and its
    broadcast_image_to would take the first rows for a probe of fewer images. Returns what was
    replaced, to put back."""
    saved: list[tuple[Any, str, Any]] = []
    rows = list(images)
    for cnet in chain:
        for name in ("cond_hint_original", "advanced_mask_weighting"):
            value = getattr(cnet, name, None)
            if isinstance(value, torch.Tensor) and value.ndim == 4 and 1 < value.shape[0] and max(rows) < value.shape[0] \
                    and rows != list(range(value.shape[0])):
                saved.append((cnet, name, value))
                setattr(cnet, name, value.index_select(0, torch.tensor(rows, device=value.device)))
    return saved


def probe_control(chain: Sequence[Any], x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> dict:
    """``control`` and ``control_model`` for a probe call, as sampling_function.py:261-268 computes
    them for a call of one chunk (the positive rows): every ControlNet of the chain gets the call's
    transformer_options (cond_or_uncond [0], sigmas, cond_mark: the soft/zero weighting reads them),
    and the head evaluates the chain on x (its hints resized to x × 8, batched_number 1)."""
    if not chain:
        return {}
    for cnet in chain:
        cnet.transformer_options = cond["transformer_options"]
    return {"control": evaluate_control(chain[0], chain[0].get_control, x, sigma, cond, 1), "control_model": chain[0]}


def evaluate_control(head: Any, get_control: Callable[..., Any], x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                     batched_number: int) -> Any:
    """The head's ``get_control`` as the host's sampling function calls it (reForge also hands it
    the call's transformer_options, :func:`control_takes_options`)."""
    if control_takes_options(head):
        return get_control(x, sigma, dict(cond), batched_number, cond["transformer_options"])
    return get_control(x, sigma, dict(cond), batched_number)


def is_sdxl_refiner(model: Any) -> bool:
    """The SDXL refiner (OpenCLIP-G alone: no CLIP-L for the word alignment), told by what the
    model has: Forge 2 / Neo build ``text_processing_engine_l`` for the base model only
    (backend/diffusion_engine/sdxl.py); old Forge keeps sgm's conditioner, whose refiner has an
    aesthetic-score embedder (sd_xl_refiner.yaml) and the base model none."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        return any(getattr(e, "input_key", None) == "aesthetic_score" for e in getattr(conditioner, "embedders", []))
    return getattr(model, "text_processing_engine_l", None) is None


class ForgeBackend:
    def __init__(self, parts: ForgeParts):
        self.parts = parts

    def unsupported_reason(self, p: Any) -> str | None:
        model = p.sd_model
        served = ("SD 1.x, SD 2.x, SDXL, Flux.1, Flux.2 Klein, Chroma, SD 3.5, Z-Image, Lumina 2, Qwen-Image, "
                  "Anima and Ernie-Image models are")
        transformer = joint_transformer(model.forge_objects.unet)
        if transformer is not None and isinstance(model_predictor(model.forge_objects.unet), OldForgePredictor):
            # reForge loads SD 3 into ldm_patched's MMDiT: its flow sampling there is not what was measured
            return f"{type(model).__name__} models are not supported on the old Forge backend (SD 1.x, SD 2.x and SDXL are)"
        if transformer is not None and joint_family(transformer) in ("qwen", "anima"):
            return None
        if transformer is not None and joint_family(transformer) == "ernie":
            # Ernie-Image: its Ministral-3 engine tokenizes the prompt after a start token, with no
            # template (ministral3_engine.py:28-60); the words are found by their text (flows.job.word_positions)
            if not any(is_bare_llm_engine(engine) for name, engine in vars(model).items()
                       if name.startswith("text_processing_engine")):
                return f"{type(model).__name__} models are not supported yet ({served})"
            return None
        if transformer is not None and joint_family(transformer) == "nextdit":
            # Z-Image: its Qwen3 engine wraps the prompt in a chat template (qwen3_engine.py:31);
            # Lumina 2 / Neta (same class): its Gemma engine puts a system prompt before it
            # (gemma_engine.py:75-95). The words are found inside either (flows.job.engine_line)
            if not any(is_llm_engine(engine) for name, engine in vars(model).items()
                       if name.startswith("text_processing_engine")):
                return f"{type(model).__name__} models are not supported yet ({served})"
            return None
        if transformer is not None:
            # Neo's Flux.2 (Klein) runs Flux's class with one shared modulation, patch 1 and a Qwen3
            # text encoder (Neo backend/nn/flux.py:436-443, diffusion_engine/flux2.py): its words are
            # found inside the Qwen3 chat template (klein_engine.py:32) and its windows on its own
            # patch grid (model_sampling), never on Flux.1's T5 and 2x2 patches
            if getattr(transformer, "global_modulation", False):
                engine = getattr(model, "text_processing_engine_gemma", None)
                if getattr(engine, "llama_template", None) is None:
                    return f"{type(model).__name__} models are not supported yet ({served})"
                return None
            if not any(getattr(model, engine, None) is not None
                       for engine in ("text_processing_engine_t5", "text_processing_engine_l")):
                return f"{type(model).__name__} models are not supported yet ({served})"
            return None
        if not (getattr(model, "is_sd1", False) or getattr(model, "is_sd2", False)
                or getattr(model, "is_sdxl", False)):
            return f"{type(model).__name__} models are not supported ({served})"
        if getattr(model, "is_sdxl", False) and is_sdxl_refiner(model):
            return "the SDXL refiner model is not supported"
        if getattr(model, "is_inpaint", False):
            return "inpainting models are not supported"
        return None

    # --- first pass ---------------------------------------------------------------------------
    def start_recording(self, p: Any, job: Job, conditioning: Any, prompts: Sequence[str]) -> AttentionRecorder:
        """Created here, installed by :meth:`before_sampling` (Forge resets the UNet in between).
        A transformer's maps are on its token grid (latent / patch size)."""
        f = latent_factor(p.sd_model)
        return AttentionRecorder((p.height // f, p.width // f), len(prompts),
                                 downsample=self.model_sampling(p).map_downsample)

    def before_sampling(self, p: Any, job: Job) -> None:
        recorder = job.recorder
        if p.is_hr_pass or recorder is None:
            return
        objects = p.sd_model.forge_objects
        if is_joint_model(p):
            job.set_attr(objects, "unet", _joint_recording_unet(objects.unet, recorder, self.parts.references))
        else:
            job.set_attr(objects, "unet", _recording_unet(objects.unet, recorder, self.parts.attention))

    def model_sampling(self, p: Any) -> ModelSampling:
        """From the model's predictor (backend/modules/k_prediction.py): a flow predictor
        (``prediction_type`` 'const': Flux, Chroma, SD 3.5) noises with its own ``noise_scaling``
        ((1 − σ)·x₀ + σ·ε, :94-97); everything else as SD (x₀ + σ·ε)."""
        predictor = model_predictor(p.sd_model.forge_objects.unet)
        if getattr(predictor, "prediction_type", None) != "const":
            return SD_SAMPLING

        def noise_scaling(sigma: Any, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
            sigma = torch.as_tensor(sigma, dtype=latent.dtype, device=latent.device)
            if sigma.numel() > 1:
                sigma = sigma.reshape(-1, *([1] * (latent.ndim - 1)))
            return predictor.noise_scaling(sigma, noise, latent)

        # windows, sub-latents and maps on the model's patch grid (Flux.2 Klein: patch 1, flux.py:378)
        patch = getattr(joint_transformer(p.sd_model.forge_objects.unet), "patch_size", None)
        patch = patch if isinstance(patch, int) and patch > 0 else FLOW_SAMPLING.size_multiple
        return dataclasses.replace(FLOW_SAMPLING, noise_scaling=noise_scaling, size_multiple=patch,
                                   map_downsample=patch)

    @contextmanager
    def probe_unet(self, p: Any, job: Job, sampler: Any, recorder: AttentionRecorder, conds: Sequence[Any],
                   latents: torch.Tensor, images: Sequence[int]
                   ) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The probe pass's UNet call: the positive rows only, straight to the model's
        ``apply_model`` as sampling_function.py:261-273 calls it for one cond chunk, on the UNet a
        sampling would use (:meth:`_probe_patched_unet`: LoRA, ControlNet units and other
        extensions' per-sampling patches) with the recording attn2 patches; loaded and released like
        a sampling (sampling_prepare / sampling_cleanup: ControlNet's pre_run and cleanup, which
        drops its size-keyed hint cache). ``latents`` are the probed images' latents, ``images``
        their places in the batch. Afterwards ``forge_objects`` and ``p.modified_noise`` are as
        before, also on error."""
        sampling_prepare, sampling_cleanup = self.parts.sampling_prepare, self.parts.sampling_cleanup
        model = p.sd_model
        objects_before = model.forge_objects
        noise_before = p.__dict__.get("modified_noise", _NO_ATTR)
        saved: list[tuple[Any, str, Any]] = []
        loaded: list[Any] = []
        try:
            patched = self._probe_patched_unet(p, job, latents)
            if is_joint_model(p):
                call = self._joint_probe_call(p, patched, recorder, conds, loaded, sampling_prepare, job.time_axis,
                                              self.parts.references)
                yield call
                return
            unet = _recording_unet(patched, recorder, self.parts.attention)
            chain = control_chain(unet)
            saved += probe_hint_rows(chain, images)
            if chain:
                log.info("AccDiffusion probe pass: %d ControlNet(s) in the UNet call (hints at %dx%d px)",
                         len(chain), latents.shape[-1] * latent_factor(p.sd_model),
                         latents.shape[-2] * latent_factor(p.sd_model))
            sdxl = isinstance(conds[0], dict)
            crossattn = stack_cond([{"c_crossattn": c["crossattn"] if sdxl else c} for c in conds],
                                   {"c_crossattn": None})["c_crossattn"]
            vector = torch.stack([c["vector"] for c in conds]) if sdxl else None

            def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                if not loaded:  # sized by the probe's input, once
                    sampling_prepare(unet, x)
                    loaded.append(unet)
                cond: dict = {"c_crossattn": crossattn.to(x.device)}
                if vector is not None:
                    cond["y"] = vector.to(x.device)
                cond["transformer_options"] = transformer_options_for(
                    unet.model_options.get("transformer_options", {}), [0], 1, sigma)
                return unet.model.apply_model(x, sigma, **cond, **probe_control(chain, x, sigma, cond))

            yield call
        finally:
            try:
                if loaded:
                    sampling_cleanup(loaded[0])
            finally:
                for obj, name, value in reversed(saved):
                    setattr(obj, name, value)
                model.forge_objects = objects_before
                if noise_before is _NO_ATTR:
                    p.__dict__.pop("modified_noise", None)
                else:
                    p.modified_noise = noise_before

    @staticmethod
    def _joint_probe_call(p: Any, unet: Any, recorder: AttentionRecorder, conds: Sequence[Any],
                          loaded: list[Any], sampling_prepare: Callable[[Any, torch.Tensor], None],
                          time_axis: bool = False, references: Any = None
                          ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The probe's model call for Flux / Chroma / SD 3.5: the positive rows' conditioning
        (text, pooled vector, distilled guidance as encoded) straight to ``apply_model``, the
        blocks hooked for the call. ControlNet units sit out (Forge's ControlNet serves SD and
        SDXL only)."""
        model = unet.model.diffusion_model
        if isinstance(conds[0], dict):
            cond = {"c_crossattn": stack_cond([{"c_crossattn": c["crossattn"]} for c in conds],
                                              {"c_crossattn": None})["c_crossattn"]}
            if "vector" in conds[0]:
                cond["y"] = torch.stack([c["vector"] for c in conds])
            if "guidance" in conds[0]:
                cond["guidance"] = torch.stack([torch.as_tensor(c["guidance"]).reshape(()) for c in conds])
        else:
            cond = {"c_crossattn": stack_cond([{"c_crossattn": c} for c in conds], {"c_crossattn": None})["c_crossattn"]}

        def call(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            if not loaded:
                sampling_prepare(unet, x)
                loaded.append(unet)
            args = {k: v.to(x.device) for k, v in cond.items()}
            args["transformer_options"] = transformer_options_for(
                unet.model_options.get("transformer_options", {}), [0], 1, sigma)
            with JointAttentionCapture(model, recorder, list(range(x.shape[0]))), without_references(references):
                return with_time_axis(unet.model.apply_model, time_axis)(x, sigma, **args)

        return call

    @staticmethod
    def _probe_patched_unet(p: Any, job: Job, latents: torch.Tensor) -> Any:
        """The UNet a sampling would run: what Forge does before every sampling (processing.py:
        1373-1381: ``forge_objects`` from the LoRA-applied ones, then the scripts'
        ``process_before_every_sampling``, so ControlNet attaches its units for this pass, with the
        hires hint when ``p.is_hr_pass``, and other extensions patch the UNet); ``x`` is the probe
        latent, as img2img passes its init latent, ``noise`` zeros (the probe's noise differs per
        level), ``c``/``uc`` the batch's conditioning (:attr:`Job.conditioning`). An extension that needs Forge's CFG loop
        (a conditioning modifier: reference-only records its style there, Fooocus inpaint switches
        the model) cannot be served by a probe call: then only the ControlNet units are kept, with
        a note."""
        model = p.sd_model
        base = model.forge_objects_after_applying_lora
        model.forge_objects = base.shallow_copy()
        if getattr(p, "scripts", None) is not None:
            p.scripts.process_before_every_sampling(p=p, x=latents, noise=torch.zeros_like(latents),
                                                    c=job.conditioning, uc=job.unconditioning)
        patched = model.forge_objects.unet
        if patched.model_options.get(CONDITIONING_MODIFIERS):
            comment(p, "AccDiffusion: an extension patches Forge's sampling loop (e.g. a ControlNet reference "
                       "preprocessor); the probe pass used the UNet with the ControlNet units only.")
            plain = base.unet.clone()
            plain.controlnet_linked_list = patched.controlnet_linked_list
            return plain
        return patched

    # --- hires -------------------------------------------------------------------------------
    def auto_tile_batch(self) -> AutoTileBatch:
        """tile_batch_size 0: free memory as Forge counts it (backend/memory_management.py:1008
        ``get_free_memory``: the device's free memory plus what torch holds reserved but inactive),
        so the batch sees what Forge's own model loading left (old Forge: model_management.py)."""
        return AutoTileBatch(free_bytes=self.parts.free_memory)

    def skip_scale(self, p: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """c_skip(σ) for the dilated branch from the model's predictor (backend/modules/k_prediction.py:
        ``prediction_type`` 'v_prediction' and 'edm' both denoise as x·σd²/(σ² + σd²) + …, so
        c_skip = σd²/(σ² + σd²)); ε-models need none (c_skip = 1)."""
        predictor = model_predictor(p.sd_model.forge_objects.unet)
        if getattr(predictor, "prediction_type", None) in ("v_prediction", "edm"):
            return functools.partial(v_prediction_c_skip, sigma_data=float(predictor.sigma_data))
        return None

    def sampler_space(self, p: Any, sampler: Any, kind: str | None) -> SamplerSpace:
        """A k-diffusion sampler's CFG denoiser gets σ (ForgeScheduleLinker: σ → t by the
        predictor, k_diffusion/external.py). A timestep sampler's ``CFGDenoiserTimesteps`` gets x_t
        and t and converts them itself before Forge's sampling function (so the UNet wrapper sees σ):
        ᾱ = 1/(σ² + 1) from the predictor's sigmas (sd_samplers_timesteps.py:28-31), t rounded to
        a whole timestep, x = x_t·√(σ² + 1) (sd_samplers_cfg_denoiser.py:163-169). Only the skip
        residual, which runs before that conversion, needs it."""
        predictor = model_predictor(p.sd_model.forge_objects.unet)
        if kind == TIMESTEPS:
            schedule = TimestepSchedule(1.0 / (predictor.sigmas ** 2 + 1.0), quantize=True)
            return SamplerSpace(predictor.timestep, schedule.sigma)
        return SamplerSpace(sampler.model_wrap.sigma_to_t)

    def prepare_stage(self, p: Any, job: Job) -> None:
        """What Forge does before every sampling (processing.py:1373, :1518): start from the UNet
        with LoRA applied, so the first pass's patches and other extensions' patches of the
        previous stage are gone."""
        job.undo_hooks()
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()

    def hook_stage(self, job: Job, p: Any, sampler: Any, denoiser: StageDenoiser, space: SamplerSpace,
                   positives: list[list[torch.Tensor]], tile_schedules: list[list | None],
                   windows: list[Window]) -> None:
        cfg = sampler.model_wrap_cfg
        objects = p.sd_model.forge_objects
        unet = objects.unet.clone()

        joint = joint_transformer(unet) is not None

        def tile_row(row: dict, schedule: list, window: Window) -> dict:
            cond = schedule_entry(schedule, cfg.step)
            if joint:
                return joint_tile_row(row, cond)
            out = dict(row)
            if isinstance(cond, dict):  # SDXL: {"crossattn", "vector"}
                out["c_crossattn"], out["y"] = cond["crossattn"], cond["vector"]
            else:
                out["c_crossattn"] = cond
            return out

        if joint and control_chain(unet):
            comment(p, "AccDiffusion: ControlNet units sat out of the tiled hires pass (Flux, Chroma and SD 3.5 "
                       "windows are not given control hints).")
            job.set_attr(control_chain(unet)[0], "get_control", lambda *args, **kwargs: None)
        control = None if joint else ForgeControl.for_stage(p, job, unet, denoiser)

        references_seen: list[bool] = []
        holder = self.parts.references

        def wrapper(apply_model: Any, args: dict) -> torch.Tensor:
            noted = bool(references_seen)
            with without_references(holder, references_seen):
                if references_seen and not noted:
                    comment(p, REFERENCE_NOTE)
                return tiled(with_time_axis(apply_model, job.time_axis), args)

        def tiled(apply_model: Any, args: dict) -> torch.Tensor:
            x, sigma, c = args["input"], args["timestep"], args["c"]
            if c.get("control") is not None and (control is None or control.untiled):
                return apply_model(x, sigma, **c)  # a control that cannot be tiled: the call runs whole
            tensors = {k: v for k, v in c.items() if k in TENSOR_KEYS and isinstance(v, torch.Tensor)
                       and v.shape[0] == x.shape[0]}
            others = {k: v for k, v in c.items() if k not in tensors and k not in ("control", "control_model")}
            rows = split_cond(tensors)
            options = others.pop("transformer_options", {})

            def row_model(xs: torch.Tensor, sigmas: torch.Tensor, conds: Sequence[dict]) -> torch.Tensor:
                if joint:
                    groups = by_text_length(conds)
                    if len(groups) > 1:
                        out = torch.empty_like(xs)
                        for group in groups:
                            index = torch.tensor(group, device=xs.device)
                            out[index] = joint_call(xs.index_select(0, index), sigmas.index_select(0, index),
                                                    [conds[i] for i in group])
                        return out
                    return joint_call(xs, sigmas, conds)
                stacked = stack_cond(conds, conds[0])  # rows hold plain tensors here
                blocks = xs.shape[0] // len(rows)
                topts = transformer_options_for(options, args["cond_or_uncond"], blocks, sigmas)
                extra = {}
                if control is not None:
                    extra = control.for_call(denoiser.items, xs, sigmas, {**stacked, **others, "transformer_options": topts},
                                             len(rows), len(rows) // len(args["cond_or_uncond"]),
                                             len(args["cond_or_uncond"]) * blocks)
                return apply_model(xs, sigmas, **stacked, **others, **extra, transformer_options=topts)

            def joint_call(xs: torch.Tensor, sigmas: torch.Tensor, conds: Sequence[dict]) -> torch.Tensor:
                """Rows of one text length; transformer_options as Forge gives a call (its
                cond_or_uncond layout is the caller's, repeated, when the rows are all there)."""
                stacked = stack_cond(conds, conds[0])
                layout = args["cond_or_uncond"]
                blocks = xs.shape[0] // len(rows)
                if blocks * len(rows) == xs.shape[0]:
                    topts = transformer_options_for(options, layout, blocks, sigmas)
                else:
                    topts = transformer_options_for(options, [0], 1, sigmas)
                return apply_model(xs, sigmas, **stacked, **others, transformer_options=topts)

            places = cond_rows_to_images(args["cond_or_uncond"], len(rows))
            return denoiser(row_model, x, sigma, rows,
                            tile_conditions(rows, positives, tile_schedules, windows, tile_row, places))

        unet.set_model_unet_function_wrapper(wrapper)
        self._per_window_memory(unet, job, windows, denoiser)
        hook_skip_residual(job, sampler, denoiser, space)
        job.set_attr(objects, "unet", unet)

    @staticmethod
    def _per_window_memory(unet: Any, job: Job, windows: list[Window], denoiser: StageDenoiser) -> None:
        """Forge sizes its loading and its cond/uncond batching by the full latent; the tiled pass
        peaks at one batch of windows (or of dilated sub-latents)."""
        base = unet.model.memory_required
        # shifted edge windows may be up to 1.5 windows long: the largest window shape of the stage
        win_h = max(max(w.height for w in windows), -(-denoiser.stage.size[0] // denoiser.stage.dilation))
        win_w = max(max(w.width for w in windows), -(-denoiser.stage.size[1] // denoiser.stage.dilation))
        if denoiser.settings.window_mode == "shifted":
            # and reach the model padded up to its size multiple (any window, at a fine grain)
            up = lambda n: -(-n // denoiser.size_multiple) * denoiser.size_multiple
            win_h = up(min(denoiser.stage.size[0], win_h * 3 // 2))
            win_w = up(min(denoiser.stage.size[1], win_w * 3 // 2))
        device = denoiser.reference.device if denoiser.reference is not None else torch.device("cpu")

        def window_shape(shape: Sequence[int]) -> list[int]:
            # asked again at every step: an automatic batch is known once its first call measured it
            per_call = planned_tile_batch(job.settings.tile_batch_size, job.auto_batch, device)
            return [per_call * int(shape[0]), int(shape[1]), win_h, win_w]

        def per_window(input_shape: Sequence[int], **kwargs: Any) -> Any:
            # Forge passes input_shape= by name; reForge adds cond_shapes= (samplers.py:272)
            return base(input_shape=window_shape(input_shape), **kwargs)

        # the load before sampling: Forge 2 and old Forge read a peak-estimation modifier (Forge 2
        # unet.py:121; reForge forge_sampler.py:124); Neo asks the patcher's own memory_required
        # (sampling_function.py:369), so this clone (ours alone) answers for the windows
        if hasattr(unet, "set_memory_peak_estimation_modifier"):
            unet.set_memory_peak_estimation_modifier(per_window)
        else:
            unet.memory_required = per_window
        unet.add_object_patch("memory_required", per_window)  # the cond/uncond batching asks the model



# --- ControlNet (built in) -----------------------------------------------------------------------
TILED_CONTROLS = {"ControlNet", "ControlLora"}  # backend/patcher/controlnet.py classes with hint-only input
# preprocessors that patch the UNet with full-size latents of their own (not cut into tiles)
UNTILED_PREPROCESSORS = ("reference", "inpaint")


def control_chain(unet: Any) -> list[Any]:
    """The UnetPatcher's ControlNets, head first (``previous_controlnet`` links)."""
    out, node = [], getattr(unet, "controlnet_linked_list", None)
    while node is not None:
        out.append(node)
        node = getattr(node, "previous_controlnet", None)
    return out


def controlnet_script(p: Any) -> Any:
    """Forge's built-in ControlNet script of this job, or None."""
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
        try:
            if script.title() == "ControlNet":
                return script
        except Exception:  # another extension's title() is not ours to debug
            continue
    return None


def controlnet_preprocessors(p: Any) -> list[str]:
    """Names of the preprocessors of the enabled ControlNet units (its script's current_params)."""
    script = controlnet_script(p)
    return [str(getattr(getattr(params, "preprocessor", None), "name", ""))
            for params in (getattr(script, "current_params", None) or {}).values()]


# HiResFixOption.LOW_RES_ONLY as the unit may hold it (lib_controlnet/enums.py:4-20: value, name, index)
LOW_RES_ONLY = ("Low res only", "HiResFixOption.LOW_RES_ONLY", 1)


def chain_unit_numbers(p: Any, chain_length: int) -> list[int]:
    """The user's number (1 = first enabled unit) of every ControlNet in the chain, head first.
    Forge's script patches the enabled units in order, each new one becoming the head
    (backend/patcher/unet.py:68-70), and in a txt2img hires pass leaves out "Low res only" units
    (scripts/controlnet.py:431-446); without the script's units, the chain's order alone."""
    script = controlnet_script(p)
    numbers = list(range(1, chain_length + 1))
    try:
        units = script.get_enabled_units(p.script_args[script.args_from:script.args_to])
        hires = bool(getattr(p, "enable_hr", False)) and getattr(p, "init_images", None) is None \
            and bool(getattr(p, "is_hr_pass", False))
        active = [i + 1 for i, unit in enumerate(units)
                  if not (hires and getattr(unit.hr_option, "value", unit.hr_option) in LOW_RES_ONLY)]
        if len(active) == chain_length:
            numbers = active
    except Exception:  # no script, or another layout of its units: the chain's order
        pass
    return numbers[::-1]


class ForgeControl:
    """Forge's ControlNets during one stage: the head's full-size evaluation is off, and each tiled
    call evaluates the chain with per-item hints."""

    def __init__(self, p: Any, job: Job, chain: list[Any], denoiser: StageDenoiser, untiled: str | None):
        self.p, self.chain, self.untiled = p, chain, untiled
        self.numbers = chain_unit_numbers(p, len(chain))
        stage = denoiser.stage
        cut = lambda t: StageHints(t, stage.size, denoiser.windows, stage.dilation, denoiser.size_multiple)
        self.hints: dict[int, StageHints] = {}
        self.masks: dict[int, StageHints] = {}
        self.skipped: set[int] = set()
        self.get_control: Callable[..., Any] | None = None
        if untiled:
            comment(p, f"AccDiffusion: {untiled}; the hires UNet calls ran untiled (no tile prompts).")
            return
        for i, cnet in enumerate(chain):
            hint = getattr(cnet, "cond_hint_original", None)
            if type(cnet).__name__ in TILED_CONTROLS and isinstance(hint, torch.Tensor) and hint.ndim == 4:
                self.hints[i] = cut(hint)
                mask = getattr(cnet, "advanced_mask_weighting", None)
                if isinstance(mask, torch.Tensor):
                    self.masks[i] = cut(mask)
            else:
                self.skip(i, f"{type(cnet).__name__} is not cut into tiles")
        head = chain[0]
        self.get_control = head.get_control  # a bound method, or another extension's wrapper
        job.set_attr(head, "get_control", lambda *args, **kwargs: None)  # full size: evaluated per call instead

    @staticmethod
    def for_stage(p: Any, job: Job, unet: Any, denoiser: StageDenoiser) -> "ForgeControl | None":
        chain = control_chain(unet)
        if not chain:
            return None
        untiled = next((f"ControlNet preprocessor '{n}' patches the UNet at full size" for n in
                        controlnet_preprocessors(p) if any(k in n for k in UNTILED_PREPROCESSORS)), None)
        return ForgeControl(p, job, chain, denoiser, untiled)

    def unit_number(self, index: int) -> int:
        """The user's unit number of ``chain[index]`` (:func:`chain_unit_numbers`)."""
        return self.numbers[index]

    def skip(self, index: int, reason: str) -> None:
        self.skipped.add(index)
        comment(self.p, f"AccDiffusion: ControlNet unit {self.unit_number(index)} was left out of the tiled hires "
                        f"pass: {reason}.")

    def for_call(self, items: CallItems | None, xs: torch.Tensor, sigmas: torch.Tensor, cond: dict, rows: int,
                 images_per_chunk: int, chunks: int) -> dict:
        """``control`` and ``control_model`` for one tiled call of ``chunks`` chunks; the caller's
        ``rows`` came as chunks of ``images_per_chunk`` images (one hint per image, as Forge's
        broadcast_image_to)."""
        saved: list[tuple[Any, str, Any]] = []

        def put(obj: Any, name: str, value: Any) -> None:
            saved.append((obj, name, obj.__dict__.get(name)))
            setattr(obj, name, value)

        try:
            for i, cnet in enumerate(self.chain):
                put(cnet, "transformer_options", cond["transformer_options"])
                hints = self.hints.get(i)
                hint_rows = hint_rows_for(hints.batch, rows, images_per_chunk) if hints is not None else None
                if hints is not None and hint_rows is None:
                    del self.hints[i]
                    self.skip(i, f"its {hints.batch} hint images do not match the batch")
                if i in self.skipped or items is None:
                    put(cnet, "timestep_range", (-math.inf, math.inf))  # get_control: outside the range, skipped
                elif hints is not None:
                    dtype = getattr(cnet, "manual_cast_dtype", None) or getattr(cnet.control_model, "dtype", xs.dtype)
                    put(cnet, "cond_hint", hints.for_call(items, hint_rows).to(dtype))
                    if i in self.masks:
                        mask_rows = hint_rows_for(self.masks[i].batch, rows, images_per_chunk) or [0] * rows
                        put(cnet, "advanced_mask_weighting", self.masks[i].for_call(items, mask_rows))
            if items is not None and log.isEnabledFor(logging.DEBUG):
                log_call(items, {self.unit_number(i): h for i, h in self.hints.items() if i not in self.skipped})
            assert self.get_control is not None
            control = evaluate_control(self.chain[0], self.get_control, xs, sigmas, cond, chunks)
        finally:
            for obj, name, value in reversed(saved):
                setattr(obj, name, value)
            for cnet in self.chain:  # Forge re-cuts its own full-size hint next time
                cnet.cond_hint = None
        return {"control": control, "control_model": self.chain[0]}
