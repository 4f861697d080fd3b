"""Sampling the toy model: the first pass with the attention recorder on the 8×8 grid (the
reference first pass records at downsample 4, which on an 8×8 latent would be a 2×2 grid), and
the hires pass of :mod:`accdiffusion.lab.reference` unchanged."""

from __future__ import annotations

from typing import Sequence

import torch

from ...method.attention import AttentionRecorder
from ...method.prompts import PhraseRules
from ..reference import JobResult, hires_pass
from ..reference import first_pass as reference_first_pass
from ...method.settings import AccDiffusionSettings
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


def upscale(host: ToyHost, latent: torch.Tensor, prompts: Sequence[str], recorder: AttentionRecorder | None,
            settings: AccDiffusionSettings, scale: int, seed: int, steps: int = HIRES_STEPS,
            denoise: float = DENOISE, cfg_scale: float = CFG, phrase_rules: PhraseRules | None = None) -> JobResult:
    size = (LATENT * scale, LATENT * scale)
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
