"""A minimal host for the engine: real ldm ``UNetModel`` + real k-diffusion samplers, no WebUI.

The tests and the benchmark drive the engine through it, and it shows an adapter's job in one
page: record maps in the first pass, build tile conditioning per stage, and wrap the sampler's
model call (skip residual on the sampler's x, then the fused denoiser on the CFG rows).
Needs ``stable-diffusion-sdkit`` (ldm), ``k-diffusion`` and ``transformers`` (CLIP tokenizer).
``Host(builtin_sampler=True)`` needs no k-diffusion (Euler and ε models only), and ``sdxl-real``
needs ``diffusers`` instead of ldm: what the GPU benchmark machine has (tools/device_check.sh).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..method.attention import AttentionRecorder, find_cross_attention
from ..method.batching import AutoTileBatch
from ..method.hires import (EncodeCache, Stage, StageDenoiser, StageStats, latent_stats, plan_stages,
                            restandardise, restandardise_stage_output, stage_windows, upscale_latent)
from ..method.prompts import ImagePromptPlan, PhraseRules
from ..method.tiles import Window
from ..method.settings import AccDiffusionSettings
from ..method.tileprompts import StageTilePrompts, WindowConditioning
from ..method.words import Word, align_words, split_words

if TYPE_CHECKING:
    from ..method.probe import ProbeStats

CHUNK = 75  # tokens per chunk between BOS and EOS, as in the WebUI


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD1 layout (attention at ds 1, 2, 4), tiny widths
    "sd1": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                num_res_blocks=1, channel_mult=[1, 2, 4, 4], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=64, legacy=False),
    # SDXL layout (channel_mult 1,2,4; attention at ds 2, 4; linear proj; vector conditioning)
    "sdxl": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2],
                 num_res_blocks=1, channel_mult=[1, 2, 4], num_head_channels=16,
                 use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=2,
                 context_dim=[96, 96], num_classes="continuous", legacy=False),
    # SDXL widths (320/640/1280, head dim 64, context 2048); ldm takes one transformer depth for
    # all levels, so depth 2 stands in for SDXL's 2/10
    "sdxl-size": dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
                      num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                      use_spatial_transformer=True, use_linear_in_transformer=True,
                      transformer_depth=2, context_dim=[2048, 2048], num_classes="continuous", legacy=False),
}


def reinit_zero_layers(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Random-weight UNets have zero-initialised output layers and predict exactly 0, which makes
    every with/without comparison vacuous; give those layers small random weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_meta:  # a model for counting (bench --device meta) has no values to fix
                continue
            if p.ndim > 0 and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=generator, device="cpu") * std)
    return module


# The real SDXL UNet configuration (transformer depth 1/2/10 per level, 2.6 B parameters), built
# with diffusers' UNet2DConditionModel because ldm 2.1 takes one depth for all levels.
SDXL_DIFFUSERS_CONFIG: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)


# The same diffusers class and block layout (depths 1/2/10, linear projections, text-time
# embedding) at tiny widths: the ``sdxl-real`` code path on a CPU in seconds.
SDXL_DIFFUSERS_TINY_CONFIG: dict[str, Any] = dict(
    SDXL_DIFFUSERS_CONFIG, sample_size=16, block_out_channels=(32, 64, 128), cross_attention_dim=64,
    attention_head_dim=(2, 4, 8), addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
DIFFUSERS_CONFIGS = {"sdxl-real": SDXL_DIFFUSERS_CONFIG, "sdxl-real-tiny": SDXL_DIFFUSERS_TINY_CONFIG}


def build_unet(kind: str = "sd1", seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """A random-weight UNet, built on ``device`` (initialising SDXL's 2.6 B weights on a CPU takes
    longer than the GPU benchmark itself at low step counts)."""
    torch.manual_seed(seed)
    with torch.device(device):
        if kind in DIFFUSERS_CONFIGS:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel(**DIFFUSERS_CONFIGS[kind])
        else:
            from ldm.modules.diffusionmodules.openaimodel import UNetModel

            unet = UNetModel(image_size=32, **UNET_CONFIGS[kind])
    return reinit_zero_layers(unet, seed).eval()


@dataclass(frozen=True)
class RowCond:
    context: torch.Tensor  # [tokens, dim]
    vector: torch.Tensor | None = None  # SDXL-like models: [1]


@dataclass
class Host:
    """A UNet, a toy text encoder over the real CLIP tokenizer, and k-diffusion's wrapper (or,
    with ``builtin_sampler``, :class:`EpsDenoiser` and :func:`sample_euler`)."""
    unet: nn.Module
    tokenizer: Any
    vector_conditioning: bool = False
    embed_seed: int = 0
    v_prediction: bool = False  # the UNet predicts v (SD 2.x 768-v), wrapped as A1111 does
    builtin_sampler: bool = False  # no k-diffusion: Euler and ε models only
    channel_stats: bool = False  # stage outputs re-standardised per channel (flow models, as the product does)
    _embedding: torch.Tensor | None = None

    def __post_init__(self) -> None:
        def unet_output(x: torch.Tensor, t: torch.Tensor, cond: RowCond | list[RowCond] = None) -> torch.Tensor:
            return self._eps(x, t, cond)

        if self.builtin_sampler:
            if self.v_prediction:
                raise ValueError("the built-in sampler serves ε-prediction UNets only; v_prediction needs k-diffusion")
            self.denoiser = EpsDenoiser(unet_output, sd_alphas_cumprod())
        elif self.v_prediction:
            from k_diffusion.external import CompVisVDenoiser

            self.denoiser = CompVisVDenoiser(_CompVisModel(unet_output, sd_alphas_cumprod()), quantize=False)
        else:
            from k_diffusion.external import DiscreteEpsDDPMDenoiser

            self.denoiser = DiscreteEpsDDPMDenoiser(unet_output, sd_alphas_cumprod(), quantize=False)
        dim = self.context_dim
        g = torch.Generator().manual_seed(self.embed_seed)
        self._embedding = torch.randn(len(self.tokenizer), dim, generator=g)

    def to(self, device: torch.device | str) -> "Host":
        self.unet.to(device)
        self.denoiser.to(device)
        return self

    @property
    def transformer_depth(self) -> int:
        return max(len(m.transformer_blocks) for m in self.unet.modules() if hasattr(m, "transformer_blocks"))

    @property
    def context_dim(self) -> int:
        return find_cross_attention(self.unet)[0].to_k.in_features

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @property
    def special_ids(self) -> set[int]:
        return {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}

    def context_ids(self, prompt: str) -> list[int]:
        """BOS + 75 + EOS per chunk, a new chunk at BREAK, like the WebUI (syntax stripped)."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        ids: list[int] = []
        for part in prompt.split("BREAK"):
            text = re.sub(r":\s*[\d.]+\s*(?=[)\]])", " ", part)
            tokens = self.tokenize(re.sub(r"[()\[\]]", " ", text))
            for start in range(0, max(len(tokens), 1), CHUNK):
                chunk = tokens[start:start + CHUNK]
                ids += [bos] + chunk + [eos] * (CHUNK + 1 - len(chunk))
        return ids

    def word_positions(self, words: Sequence[Word], prompt: str) -> list[list[int]]:
        """Each word's positions in this host's context for ``prompt``: by ids (CLIP-like hosts; a
        host with an LLM chat template overrides it with the product's by-text alignment)."""
        return align_words(words, self.context_ids(prompt), self.special_ids, self.tokenize)

    def encode(self, prompts: Sequence[str], vector: float = 0.0) -> list[RowCond]:
        out = []
        for prompt in prompts:
            ids = torch.tensor(self.context_ids(prompt))
            context = self._embedding[ids] + 0.1 * torch.arange(len(ids))[:, None].sin()
            vec = torch.tensor([vector]) if self.vector_conditioning else None
            out.append(RowCond(context.to(self.device), vec))
        return out

    # --- model ----------------------------------------------------------------------------------
    def _eps(self, x: torch.Tensor, t: torch.Tensor, conds: Sequence[RowCond]) -> torch.Tensor:
        tokens = max(c.context.shape[0] for c in conds)
        context = torch.stack([_pad_context(c.context, tokens) for c in conds]).to(x)
        y = torch.stack([c.vector for c in conds]).to(x) if self.vector_conditioning else None
        if hasattr(self.unet, "add_embedding"):  # diffusers SDXL UNet: pooled text + size ids
            config = self.unet.config  # the embedding takes pooled text and 6 size ids, each embedded
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {"text_embeds": y.new_zeros(len(conds), pooled) + y,
                     "time_ids": torch.tensor([1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]).to(x).expand(len(conds), 6)}
            return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        # ldm 2.1's SpatialTransformer indexes one context per transformer block
        return self.unet(x, timesteps=t, context=[context] * self.transformer_depth, y=y)

    def row_model(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence[RowCond]) -> torch.Tensor:
        return self.denoiser(x, sigma, cond=list(conds))

    def sample(self, sampler: str, model: Any, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Run the named sampler (a key of SAMPLERS) over ``sigmas`` from ``x``."""
        if self.builtin_sampler:
            if sampler != "Euler":
                raise ValueError(f"sampler {sampler!r} needs k-diffusion; the built-in sampler is Euler only")
            return sample_euler(model, x, sigmas)
        from k_diffusion import sampling

        return getattr(sampling, SAMPLERS[sampler])(model, x, sigmas, disable=True)

    def skip_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_skip(σ) of the model's parametrisation (1 for ε), from k-diffusion's own wrapper."""
        if self.v_prediction:
            return self.denoiser.get_scalings(sigma)[0]
        return torch.ones_like(sigma)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser.sigma_to_t(sigma.to(self.denoiser.sigmas.device))

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """A clean latent at noise level σ as the sampler's state: x₀ + σ·ε for the k-diffusion
        wrappers of ε and v models (a flow host overrides it)."""
        return x0 + noise * sigma

    def stage_denoiser(self, *args: Any, **kwargs: Any) -> StageDenoiser:
        """The stage denoiser of this host's parametrisation (a flow host overrides it)."""
        return StageDenoiser(*args, **kwargs)

    def img2img_sigmas(self, steps: int, denoise: float) -> torch.Tensor:
        """The last ``steps`` of a schedule of ⌊steps / denoise⌋ steps, as the WebUI does."""
        total = max(steps, int(steps / denoise))
        return self.denoiser.get_sigmas(total)[-(steps + 1):]


class EpsDenoiser(nn.Module):
    """D(x, σ) of an ε-predicting UNet trained on a discrete DDPM schedule, for hosts without
    k-diffusion: σ_t = √((1 − ᾱ_t) / ᾱ_t); the UNet sees x / √(σ² + 1) at the fractional timestep
    where log σ falls between the schedule's (linear in log σ), and D = x − σ·ε. The same maps as
    k-diffusion's unquantised ``DiscreteEpsDDPMDenoiser`` (tests/test_bench.py holds them together)."""

    def __init__(self, eps_model: Any, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.eps_model = eps_model
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.register_buffer("sigmas", sigmas)  # ascending in t
        self.register_buffer("log_sigmas", sigmas.log())

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        below = t.floor().long()
        above = t.ceil().long()
        frac = t - below
        return ((1 - frac) * self.log_sigmas[below] + frac * self.log_sigmas[above]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log().to(self.log_sigmas.dtype).reshape(-1)
        last = self.log_sigmas.shape[0] - 2
        below = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, last)
        low, high = self.log_sigmas[below], self.log_sigmas[below + 1]
        frac = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return (below + frac).view(sigma.shape)

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` noise levels evenly spaced in t from the largest to t = 0, then 0."""
        t = torch.linspace(self.sigmas.shape[0] - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        per_row = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        eps = self.eps_model(x * (per_row ** 2 + 1) ** -0.5, self.sigma_to_t(sigma), cond)
        return x - eps * per_row


def sample_euler(model: Any, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ)) / σ down ``sigmas``
    (Karras et al. 2022, Algorithm 2 without churn)."""
    per_row = x.new_ones(x.shape[0])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - model(x, sigma * per_row)) / sigma
        x = x + slope * (sigma_next - sigma)
    return x


class _CompVisModel(nn.Module):
    """What k-diffusion's CompVis wrappers take: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, apply: Any, alphas_cumprod: torch.Tensor):
        super().__init__()
        self._apply = apply
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._apply(x, t, cond)


def _pad_context(context: torch.Tensor, tokens: int) -> torch.Tensor:
    if context.shape[0] == tokens:
        return context
    return torch.cat([context, context[-1:].expand(tokens - context.shape[0], -1)])


def load_tokenizer(path: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(path)


SAMPLERS = {"Euler": "sample_euler", "Euler a": "sample_euler_ancestral", "DPM++ 2M": "sample_dpmpp_2m",
            "Heun": "sample_heun", "DPM++ 2S a": "sample_dpmpp_2s_ancestral"}


@dataclass
class JobResult:
    latent: torch.Tensor
    stages: list[Stage]
    stage_stats: list[StageStats]
    stage_encodes: list[int]
    tile_prompts: list[list[list[str]]]  # [stage][image][window]
    recorder_bytes: int = 0
    maps: list[torch.Tensor | None] = field(default_factory=list)
    stage_windows: list[list[list[Window]]] = field(default_factory=list)  # [stage][image][window]
    plans: list[ImagePromptPlan | None] = field(default_factory=list)  # per image: its words, units and masks


def first_pass(host: Host, prompts: Sequence[str], negative: str, size: tuple[int, int], steps: int,
               seed: int, cfg_scale: float = 7.0, record: bool = True, sampler: str = "Euler",
               record_every: int = 1, record_downsample: int = 4) -> tuple[torch.Tensor, AttentionRecorder | None]:
    """Euler (or ``sampler``) with CFG from seeded noise; records the positive rows' attention at
    the UNet level ``record_downsample`` (4: the WebUI adapters' level; a tiny latent needs less)."""
    torch.manual_seed(seed)
    n = len(prompts)
    x = torch.randn(n, 4, *size, device=host.device)
    sigmas = host.denoiser.get_sigmas(steps).to(host.device)
    conds = host.encode(prompts) + host.encode([negative] * n)
    recorder = AttentionRecorder(size, n, downsample=record_downsample) if record else None

    calls = [0]

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if recorder:
            recorder.row_images = list(range(n)) + [None] * n
            recorder.active = calls[0] % record_every == 0  # a subset of steps, when asked
            calls[0] += 1
        den = host.row_model(torch.cat([x, x]), torch.cat([sigma, sigma]), conds)
        cond, uncond = den.chunk(2)
        return uncond + (cond - uncond) * cfg_scale

    try:
        if recorder:
            recorder.attach(find_cross_attention(host.unet, include_middle=False))
        with torch.no_grad():
            latent = host.sample(sampler, model, x * sigmas[0], sigmas)
    finally:
        if recorder:
            recorder.detach()
    return latent, recorder


def hires_pass(host: Host, first_latent: torch.Tensor, prompts: Sequence[str], negative: str,
               recorder: AttentionRecorder | None, settings: AccDiffusionSettings,
               target: tuple[int, int], steps: int, denoise: float, seed: int,
               cfg_scale: float = 7.0, sampler: str = "Euler",
               hires_prompts: Sequence[str] | None = None, jitter: int = 0,
               phrase_rules: PhraseRules | None = None) -> JobResult:
    """``phrase_rules``: the toy evaluation's variants of the measured phrase choices."""
    base = tuple(first_latent.shape[-2:])
    n = len(prompts)
    hires_prompts = list(hires_prompts or prompts)
    plans: list[ImagePromptPlan | None] = []
    for i in range(n):
        maps = recorder.maps(i) if recorder else None
        if maps is None or not settings.patch_prompts:
            plans.append(None)
            continue
        words = split_words(prompts[i])
        positions = host.word_positions(words, prompts[i])
        plans.append(ImagePromptPlan.build(words, positions, maps, hires_prompts[i], split_words(hires_prompts[i]),
                                           units=settings.prompt_units, rules=phrase_rules or PhraseRules()))

    cache: EncodeCache[RowCond] = EncodeCache(host.encode)
    global_conds = cache.get(hires_prompts) + cache.get([negative] * n)
    mean, std = latent_stats(first_latent)
    stages = plan_stages(base, target, settings.progressive)
    result = JobResult(first_latent, stages, [], [], [], recorder.nbytes() if recorder else 0, plans=plans)
    latent = first_latent
    auto_batch = AutoTileBatch()  # one per job: each window shape's memory is measured once
    for stage in stages:
        windows = stage_windows(stage, base, settings)
        before = cache.encodes
        x_up = restandardise(upscale_latent(latent, stage.size), mean, std)
        generator = torch.Generator().manual_seed(seed + stage.index)
        noise = torch.randn(x_up.shape, generator=generator).to(x_up)
        denoiser: StageDenoiser[RowCond] = host.stage_denoiser(stage, windows, settings, seed, host.sigma_to_t,
                                                               reference=x_up, noise=noise, auto_batch=auto_batch,
                                                               skip_scale=host.skip_scale if host.v_prediction else None,
                                                               jitter=jitter)
        lookups: list[StageTilePrompts | None] = []
        if settings.window_mode == "shifted":
            # the windows move every step: each row looks its window's prompt up when it is used
            lookups = [StageTilePrompts(plan, stage.size, settings.patch_prompt_threshold) if plan else None
                       for plan in plans]
            tile_conds = [WindowConditioning(lookup, cache.get) if lookup else None for lookup in lookups]
        else:
            prompts_per_image = [plan.tile_prompts(stage.size, windows, settings.patch_prompt_threshold)
                                 if plan else None for plan in plans]
            tile_conds = [cache.get(p) if p else None for p in prompts_per_image]
            result.tile_prompts.append([p or [] for p in prompts_per_image])
        row_tile_conds = tile_conds + [None] * n

        def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            denoiser.skip_residual_(x, sigma)
            den = denoiser(host.row_model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                           global_conds, row_tile_conds)
            cond, uncond = den.chunk(2)
            return uncond + (cond - uncond) * cfg_scale

        sigmas = host.img2img_sigmas(steps, denoise).to(x_up.device)
        torch.manual_seed(seed + 1000 + stage.index)  # ancestral samplers draw from the global RNG
        with torch.no_grad():
            latent = host.sample(sampler, model, host.noised(x_up, noise, sigmas[0]), sigmas)
        latent = restandardise_stage_output(latent, *(latent_stats(first_latent, per_channel=True)
                                                      if host.channel_stats else (mean, std)))
        result.stage_stats.append(denoiser.stats)
        result.stage_encodes.append(cache.encodes - before)
        if lookups:  # every window's prompt used in the stage, in the order first used
            result.tile_prompts.append([list(l.prompts_seen.values()) if l else [] for l in lookups])
            result.stage_windows.append([list(l.prompts_seen) if l else [] for l in lookups])
        else:
            result.stage_windows.append([windows] * n)
    result.latent = latent
    return result


def probe_pass(host: Host, latent: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int],
               timesteps: Sequence[int] | None = None) -> tuple[AttentionRecorder, "ProbeStats"]:
    """The probe pass on the reference host: the positive prompts alone, one UNet call per level,
    the recorder on the up/down blocks' attn2 (as for a first pass)."""
    from ..method.probe import PROBE_TIMESTEPS, probe_sigmas, run_probe

    n = latent.shape[0]
    conds = host.encode(prompts)
    recorder = AttentionRecorder(tuple(latent.shape[-2:]), n)
    recorder.row_images = list(range(n))
    sigmas = probe_sigmas(lambda t: host.denoiser.t_to_sigma(t.to(host.denoiser.sigmas.device)),
                          PROBE_TIMESTEPS if timesteps is None else timesteps)
    with torch.no_grad(), recorder.attach(find_cross_attention(host.unet, include_middle=False)):
        stats = run_probe(latent, seeds, sigmas, lambda x, s: host.row_model(x, s, conds))
    return recorder, stats


def word_positions(host: Host, prompt: str) -> tuple[list, list[list[int]]]:
    """The words of a prompt and their token positions in the host's context."""
    words = split_words(prompt)
    return words, host.word_positions(words, prompt)
