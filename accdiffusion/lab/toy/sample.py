"""Sampling the toy models: the first pass with the attention recorder on the 8×8 grid (the
reference first pass records at downsample 4, which on an 8×8 latent would be a 2×2 grid; the
flow toy records its 8×8 image tokens), and the hires pass of :mod:`accdiffusion.lab.reference`
(for the flow toy with its host's flow noise scaling and stage denoiser)."""

from __future__ import annotations

from typing import Sequence

import torch

from ...method.attention import AttentionRecorder
from ...method.prompts import PhraseRules
from ..reference import JobResult, hires_pass
from ..reference import first_pass as reference_first_pass
from ...method.settings import AccDiffusionSettings
from .flow import FLOW_LATENT, GRID, FlowAttentionRecorder, FlowHost, shifted_sigmas
from .model import ToyHost
from .scenes import LATENT

FIRST_STEPS = 20
HIRES_STEPS = 8
DENOISE = 0.6
CFG = 5.0
RECORD_DOWNSAMPLE = 1  # the 8×8 latent's own grid: attention at ds 1 (input block 1, output blocks)


def first_pass(host: ToyHost, prompts: Sequence[str], seed: int, steps: int = FIRST_STEPS,
               cfg_scale: float = CFG, negative: str = "", record: bool = True
               ) -> tuple[torch.Tensor, AttentionRecorder | None]:
    """``reference.first_pass`` (Euler, CFG, seeded noise) recording at ``RECORD_DOWNSAMPLE``."""
    return reference_first_pass(host, prompts, negative, (LATENT, LATENT), steps, seed, cfg_scale=cfg_scale,
                                record=record, record_downsample=RECORD_DOWNSAMPLE)


# The flow toy keeps the first pass's layout at denoise 0.6 on its unshifted schedule (σ₀ = 0.6:
# no extra objects with plain tiling either, nothing for the method to fix); 0.8 starts where an
# SD3-like shift of 3 puts denoise 0.6 (σ₀ = 3·0.6 / (1 + 2·0.6) = 0.82). Measured in docs/toy-flow.md.
FLOW_DENOISE = 0.8
# the flow toy's maps: measured on 50 scenes (docs/toy-flow.md, "Which maps")
FLOW_RECORD_MODE = "joint"  # the joint softmax's text share: better localised than text-only (docs)
FLOW_RECORD_BLOCKS: tuple[int, ...] | None = (4,)  # the last single-stream block: the best localised (docs)
LAST_BLOCK = "last"


def last_block(host: FlowHost) -> tuple[int, ...]:
    """The toy's own recorded block: its last joint block (flow toy: 4 = FLOW_RECORD_BLOCKS;
    flow-llm toy: the last single-stream layer, as the product's last quarter of 4 layers)."""
    return (host.model.config.blocks - 1,)


def flow_first_pass(host: FlowHost, prompts: Sequence[str], seed: int, steps: int = FIRST_STEPS,
                    cfg_scale: float = CFG, negative: str = "", record: bool = True,
                    mode: str = FLOW_RECORD_MODE, blocks: tuple[int, ...] | None | str = LAST_BLOCK
                    ) -> tuple[torch.Tensor, FlowAttentionRecorder | None]:
    """Euler on the flow ODE from seeded noise (σ from 1 to 0, the host's shift), CFG on the
    denoised estimate (= CFG on the velocity), the positive rows' image→text attention recorded
    (``blocks``: "last", the host's last block; None, every block)."""
    torch.manual_seed(seed)
    n = len(prompts)
    noise = torch.randn(n, 4, FLOW_LATENT, FLOW_LATENT, device=host.device)
    sigmas = shifted_sigmas(steps, host.shift).to(host.device)
    conds = host.encode(prompts) + host.encode([negative] * n)
    use_blocks = last_block(host) if blocks == LAST_BLOCK else blocks
    recorder = FlowAttentionRecorder((GRID, GRID), n, host.model.config.blocks, host.text_tokens, mode=mode,
                                     use_blocks=use_blocks) if record else None

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if recorder:
            recorder.row_images = list(range(n)) + [None] * n
        den = host.row_model(torch.cat([x, x]), torch.cat([sigma, sigma]), conds)
        cond, uncond = den.chunk(2)
        return uncond + (cond - uncond) * cfg_scale

    try:
        if recorder:
            recorder.attach(host.model)
        with torch.no_grad():
            latent = host.sample("Euler", model, host.noised(torch.zeros_like(noise), noise, sigmas[0]), sigmas)
    finally:
        FlowAttentionRecorder.detach(host.model)
    return latent, recorder


def upscale(host: ToyHost, latent: torch.Tensor, prompts: Sequence[str], recorder: AttentionRecorder | None,
            settings: AccDiffusionSettings, scale: int, seed: int, steps: int = HIRES_STEPS,
            denoise: float = DENOISE, cfg_scale: float = CFG, phrase_rules: PhraseRules | None = None) -> JobResult:
    size = (latent.shape[-2] * scale, latent.shape[-1] * scale)
    return hires_pass(host, latent, prompts, "", recorder, settings, size, steps, denoise, seed,
                      cfg_scale=cfg_scale, phrase_rules=phrase_rules)


def upscale_progressive(host: ToyHost, latent: torch.Tensor, prompts: Sequence[str],
                        recorder: AttentionRecorder | None, settings: AccDiffusionSettings, scale: int,
                        seed: int, **kwargs) -> tuple[JobResult, list[torch.Tensor]]:
    """One progressive job to ``scale``× and the latent after each of its stages: stage k of a 3×
    job is exactly the 2× job (same windows, prompts and seeds), so one job measures both. The
    stage outputs are read where ``hires_pass`` hands them to ``upscale_latent`` for the next
    stage (the name is swapped back in ``finally``)."""
    from .. import reference

    seen: list[torch.Tensor] = []
    original = reference.upscale_latent

    def spy(x: torch.Tensor, size: tuple[int, int], *args, **kw) -> torch.Tensor:
        seen.append(x.clone())
        return original(x, size, *args, **kw)

    reference.upscale_latent = spy  # type: ignore[assignment]
    try:
        result = upscale(host, latent, prompts, recorder, settings, scale, seed, **kwargs)
    finally:
        reference.upscale_latent = original  # type: ignore[assignment]
    return result, seen[1:] + [result.latent]
