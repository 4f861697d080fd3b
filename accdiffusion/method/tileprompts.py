"""Tile prompts of arbitrary windows, for schedules whose windows change every step.

A word's mask is fixed for a stage, so the share of any window it covers is four lookups in an
integral image built once per (image, stage); the prompt of a window is cached per window, and a
conditioning is encoded once per distinct prompt (through the job's :class:`EncodeCache`).
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch
import torch.nn.functional as F

from .prompts import ImagePromptPlan, resize_masks
from .tiles import Window
from .words import compose_prompt

C = TypeVar("C")


class StageTilePrompts:
    """``lookup(window) -> tile prompt`` for one image at one stage; the same prompts as
    ``plan.tile_prompts(stage_size, windows, threshold)`` for any windows."""

    def __init__(self, plan: ImagePromptPlan, stage_size: tuple[int, int], threshold: float):
        self.plan = plan
        self.threshold = threshold
        masks = resize_masks(plan.masks.masks, stage_size)  # [units, H, W]: resized once per stage
        self._integral = F.pad(masks.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
        self._always = ~plan.masks.located
        self._prompts: dict[Window, str] = {}

    def keep(self, window: Window) -> torch.Tensor:
        """[words] bool: Eq. 8 for this window (share > c) per unit, units without a map always
        kept, then each unit's keep given to its words."""
        t, l, b, r = window.top, window.left, window.top + window.height, window.left + window.width
        ii = self._integral
        area = ii[:, b, r] - ii[:, t, r] - ii[:, b, l] + ii[:, t, l]
        assert self.plan.units is not None
        return self.plan.units.word_keep((area / (window.height * window.width) > self.threshold) | self._always)

    def __call__(self, window: Window) -> str:
        if window not in self._prompts:
            if not self.plan.words:
                self._prompts[window] = self.plan.prompt
            else:
                self._prompts[window] = compose_prompt(self.plan.prompt, self.plan.words,
                                                       self.keep(window).tolist())
        return self._prompts[window]

    @property
    def prompts_seen(self) -> dict[Window, str]:
        return dict(self._prompts)


class WindowConditioning(Generic[C]):
    """``window -> conditioning`` for one row: the window's tile prompt, encoded once per job by
    ``encode`` (an :meth:`EncodeCache.get`), then turned into the row's conditioning by ``make``
    (the host's per-window row: SDXL crop offsets, the step's prompt-schedule entry, ...). Pass it as the row's entry of
    ``row_tile_conds`` to :class:`~accdiffusion.method.hires.StageDenoiser`."""

    def __init__(self, prompts: StageTilePrompts, encode: Callable[[list[str]], list],
                 make: Callable[[object, Window], C] | None = None):
        self.prompts = prompts
        self._encode = encode
        self._make = make

    def for_row(self, make: Callable[[object, Window], C]) -> "WindowConditioning[C]":
        """The same lookup and encoder with a row's own ``make`` (hosts build one per row of a call)."""
        return WindowConditioning(self.prompts, self._encode, make)

    def __call__(self, window: Window) -> C:
        # not cached past the encode: ``make`` may depend on the step (prompt scheduling)
        cond = self._encode([self.prompts(window)])[0]
        return self._make(cond, window) if self._make else cond
