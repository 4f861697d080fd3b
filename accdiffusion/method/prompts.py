"""Patch-content-aware prompts (paper §3.3): attention maps → word masks → per-tile prompts.

For each word: pixels above the word's mean attention form its mask (Eq. 5); a morphological
opening (erode, then dilate; Eq. 7) removes specks; the mask is resized to a stage's latent grid
and cut with exactly the windows the denoiser uses; the word goes into a tile's prompt when its
mask covers more than ``c`` of the tile (Eq. 8). A tile whose share test keeps no word gets the
empty prompt "" — the dilated branch and the skip residual still carry the global content there.

The unit of that test is a word (the paper's) or a phrase (``prompt_units``): a phrase's words
are kept or dropped together by one mask per phrase (:data:`PHRASE_MASK`), so an adjective
whose attention is spread out does not stay in tiles without its noun (docs/phrases.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .tiles import Window, cover_resize
from .words import CONNECTIVES, PromptUnits, Word, compose_prompt, prompt_units

# How a phrase's mask is made from its words' maps: "last" the mask of its last located word (in
# English the noun, which a causal text encoder makes the one that localises), "mean" the Eq. 5
# mask of the mean of its words' maps, "union" the union of its words' masks. Chosen by
# measurement on the toy model (docs/phrases.md).
PHRASE_MASKS = ("last", "mean", "union")
PHRASE_MASK = "last"


@dataclass(frozen=True)
class PhraseRules:
    """The measured choices behind phrase units (kept apart so the toy evaluation can vary them)."""
    mask: str = PHRASE_MASK
    connectives: tuple[str, ...] = CONNECTIVES

    def __post_init__(self) -> None:
        if self.mask not in PHRASE_MASKS:
            raise ValueError(f"unknown phrase mask {self.mask!r}: expected one of {PHRASE_MASKS}")


def word_maps(token_maps: torch.Tensor, word_positions: Sequence[Sequence[int]]) -> torch.Tensor:
    """[tokens, gh, gw] → [words, gh, gw]: a word's map is the mean of its tokens' maps (sub-word
    pieces merged). A word without positions gets a map of NaN (never thresholded)."""
    gh, gw = token_maps.shape[-2:]
    out = torch.full((len(word_positions), gh, gw), float("nan"))
    for i, positions in enumerate(word_positions):
        positions = [p for p in positions if p < token_maps.shape[0]]
        if positions:
            out[i] = token_maps[positions].float().mean(0)
    return out


def threshold_masks(maps: torch.Tensor) -> torch.Tensor:
    """Eq. 5: a pixel belongs to a word when its attention is strictly above the word's mean."""
    mean = maps.mean(dim=(-2, -1), keepdim=True)
    return maps > mean


def opening_iterations(rows: int) -> int:
    """rows // 16, as the reference: twice on a 32-row map (SDXL 1024²), once on a 16-row map
    (SD1 512²), not at all below 16 rows, where a 3×3 opening would erase most of the map."""
    return rows // 16


def open_masks(masks: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
    """Eq. 7: erode then dilate each mask with a 3×3 square (OpenCV), removing specks smaller
    than the kernel while keeping larger regions' extent."""
    if iterations is None:
        iterations = opening_iterations(masks.shape[-2])
    if iterations == 0:
        return masks.bool()
    kernel = np.ones((3, 3), np.uint8)
    out = []
    for mask in masks.cpu().numpy().astype(np.uint8):
        eroded = cv2.erode(mask, kernel, iterations=iterations)
        out.append(cv2.dilate(eroded, kernel, iterations=iterations))
    if not out:
        return masks.bool()
    return torch.from_numpy(np.stack(out)).bool()


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of [words, h, w] masks to a latent grid (H, W), with the same
    cover-and-crop geometry as the latent itself."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.bool)
    return cover_resize(masks.float(), size, "nearest") > 0.5


def window_shares(masks: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
    """[windows, words]: the share of each window covered by each word's mask (integral image)."""
    n_words, h, w = masks.shape
    integral = F.pad(masks.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    shares = torch.empty(len(windows), n_words, dtype=torch.float64)
    for i, win in enumerate(windows):
        t, l, b, r = win.top, win.left, win.top + win.height, win.left + win.width
        area = integral[:, b, r] - integral[:, t, r] - integral[:, b, l] + integral[:, t, l]
        shares[i] = area / (win.height * win.width)
    return shares


@dataclass(frozen=True)
class WordMasks:
    """Opened masks of one image's words (or units: words or phrases) at the attention grid;
    ``located[i]`` is False for one without a map (kept in every tile)."""
    masks: torch.Tensor  # [words, gh, gw] bool
    located: torch.Tensor  # [words] bool


def build_word_masks(token_maps: torch.Tensor, word_positions: Sequence[Sequence[int]]) -> WordMasks:
    return masks_of_maps(word_maps(token_maps, word_positions))


def masks_of_maps(maps: torch.Tensor) -> WordMasks:
    """Eq. 5 and Eq. 7 on [words, gh, gw] maps (NaN: a word without a map, never located)."""
    located = ~torch.isnan(maps).flatten(1).any(1)
    masks = open_masks(threshold_masks(torch.nan_to_num(maps, nan=0.0)))
    return WordMasks(masks=masks, located=located)


def unit_masks(maps: torch.Tensor, units: PromptUnits, how: str = PHRASE_MASK) -> WordMasks:
    """One mask per unit from its words' maps ([words, gh, gw], NaN where a word has none), built
    from the unit's located words only; a unit with none is not located (kept in every tile). A
    one-word unit's mask is its word's mask whatever ``how`` is."""
    if how not in PHRASE_MASKS:
        raise ValueError(f"unknown phrase mask {how!r}: expected one of {PHRASE_MASKS}")
    per_word = masks_of_maps(maps)
    gh, gw = maps.shape[-2:]
    masks = torch.zeros(len(units.members), gh, gw, dtype=torch.bool)
    located = torch.zeros(len(units.members), dtype=torch.bool)
    for u, members in enumerate(units.members):
        placed = [i for i in members if per_word.located[i]]
        if not placed:
            continue
        located[u] = True
        if how == "last" or len(placed) == 1:
            masks[u] = per_word.masks[placed[-1]]
        elif how == "union":
            masks[u] = per_word.masks[placed].any(0)
        else:  # mean
            masks[u] = masks_of_maps(maps[placed].mean(0, keepdim=True)).masks[0]
    return WordMasks(masks=masks, located=located)


def tile_keep(word_masks: WordMasks, latent_size: tuple[int, int], windows: Sequence[Window],
              threshold: float) -> torch.Tensor:
    """[windows, units] bool: Eq. 8, share > c; units without a map are always kept."""
    shares = window_shares(resize_masks(word_masks.masks, latent_size), windows)
    return (shares > threshold) | ~word_masks.located[None, :]


def tile_prompts(prompt: str, words: Sequence[Word], keep: torch.Tensor) -> list[str]:
    """One prompt per window, keeping the kept words in their original order and syntax."""
    return [compose_prompt(prompt, words, row.tolist()) for row in keep]


# --- per image plans ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePromptPlan:
    """The hires prompt of one image, its words, its units (words or phrases) and each unit's
    mask from the first pass.

    When the hires prompt differs from the first-pass prompt, its words are matched by text to the
    first prompt's words and take their maps; words the first prompt did not have have no map. A
    unit none of whose words has a map is kept in every tile (as a word without a map is in word
    units); in a phrase, such words go with the phrase."""
    prompt: str
    words: list[Word]
    masks: WordMasks  # one per unit
    units: PromptUnits | None = None  # None: every word on its own

    def __post_init__(self) -> None:
        if self.units is None:
            object.__setattr__(self, "units", PromptUnits.each_word(len(self.words)))
        assert self.units is not None
        if self.masks.masks.shape[0] != len(self.units.members) or self.units.n_words != len(self.words):
            raise ValueError("one mask per unit, and units over this plan's words")

    @staticmethod
    def build(first_prompt_words: Sequence[Word], first_word_positions: Sequence[Sequence[int]],
              token_maps: torch.Tensor, hires_prompt: str, hires_words: Sequence[Word],
              units: str = "words", rules: PhraseRules = PhraseRules()) -> "ImagePromptPlan":
        """``units``: the ``prompt_units`` setting, "words" or "phrases"."""
        from .words import match_words

        first = word_maps(token_maps, first_word_positions)
        match = match_words(hires_words, first_prompt_words)
        maps = torch.full((len(hires_words), *first.shape[-2:]), float("nan"))
        for i, j in enumerate(match):
            if j is not None:
                maps[i] = first[j]
        groups = prompt_units(hires_prompt, hires_words, units, rules.connectives)
        return ImagePromptPlan(hires_prompt, list(hires_words), unit_masks(maps, groups, rules.mask), groups)

    def keep(self, latent_size: tuple[int, int], windows: Sequence[Window], threshold: float) -> torch.Tensor:
        """[windows, words] bool: the words each window's prompt keeps."""
        assert self.units is not None
        return self.units.word_keep(tile_keep(self.masks, latent_size, windows, threshold))

    def tile_prompts(self, latent_size: tuple[int, int], windows: Sequence[Window],
                     threshold: float) -> list[str]:
        if not self.words:
            return [self.prompt] * len(windows)
        return tile_prompts(self.prompt, self.words, self.keep(latent_size, windows, threshold))
