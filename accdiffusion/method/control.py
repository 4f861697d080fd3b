"""Spatial control (ControlNet hints and their masks) for the tiled pass, host-neutral.

A ControlNet hint is a pixel image [N, C, f·H, f·W] over the whole latent [.., H, W] (f = 8).
Every item of a tiled UNet call must see the part of the hint under that item:
  local window   : the window's pixel crop;
  dilated slot k : sub-latent k = x[..., i::s, j::s] (k = i·s + j) holds latent positions
                   (i + s·y, j + s·x), so its hint is the f×f pixel blocks at those positions,
                   padded (edge replication of whole blocks) and shuffled by the step's window
                   permutation exactly like the sub-latents (:mod:`accdiffusion.method.dilated`).
:class:`CallItems` is what the :class:`~accdiffusion.method.hires.StageDenoiser` says about one model
call (it sets ``denoiser.items`` while the call runs); :class:`StageHints` cuts one hint for one
stage (once per stage and window; a dilated step only re-shuffles) and gives the hints of a call.
The hosts' adapters (a1111.py, forge.py) put those hints into their ControlNet objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .dilated import padded_size, shuffle_sublatents
from .tiles import Window, cover_resize

log = logging.getLogger("accdiffusion")

LOCAL = "local"
DILATED = "dilated"


@dataclass(frozen=True)
class CallItems:
    """The batch rows of one row-model call: per batch row, its slot (local: the :class:`Window`,
    which may be a step's shifted window; dilated: the sub-latent slot k after shuffling) and the
    row of the caller's batch (a CFG row) it was cut from. ``perm`` is the step's window
    permutation of a dilated call, or None; ``pad`` the (bottom, right) latent padding of local
    windows (edge replication, shifted edge windows)."""
    kind: str
    slots: tuple[Any, ...]
    rows: tuple[int, ...]
    perm: torch.Tensor | None = None
    pad: tuple[int, int] = (0, 0)

    @staticmethod
    def local(windows: Sequence[Window], rows: int, pad: tuple[int, int] = (0, 0)) -> "CallItems":
        """Item-major batches (window, then row), as the denoiser stacks them."""
        return CallItems(LOCAL, tuple(w for w in windows for _ in range(rows)),
                         tuple(r for _ in windows for r in range(rows)), pad=pad)

    @staticmethod
    def dilated(count: int, rows: int, perm: torch.Tensor | None) -> "CallItems":
        return CallItems(DILATED, tuple(k for k in range(count) for _ in range(rows)),
                         tuple(r for _ in range(count) for r in range(rows)), perm)

    def part(self, batch: slice) -> "CallItems":
        return CallItems(self.kind, self.slots[batch], self.rows[batch], self.perm, self.pad)

    def __len__(self) -> int:
        return len(self.slots)


def resize_hint(hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The hint at a stage's pixel size (cover and centre-crop, like the latent); a no-op at the
    size it was made for (the last stage)."""
    if tuple(hint.shape[-2:]) == tuple(size):
        return hint
    shrink = hint.shape[-2] > size[0] or hint.shape[-1] > size[1]
    return cover_resize(hint, size, "bilinear", antialias=shrink)


def window_hint(hint: torch.Tensor, window: Window, factor: int) -> torch.Tensor:
    """The pixel crop under a latent window."""
    return hint[..., window.top * factor:(window.top + window.height) * factor,
                window.left * factor:(window.left + window.width) * factor]


def pad_blocks(hint: torch.Tensor, pad: tuple[int, int], factor: int) -> torch.Tensor:
    """Pad a hint by whole f×f blocks at the bottom/right, repeating the last block row/column:
    what edge replication of the latent does to the pixels under it."""
    if not any(pad):
        return hint
    h, w = hint.shape[-2] // factor, hint.shape[-1] // factor
    rows = torch.arange((h + pad[0]) * factor, device=hint.device)
    cols = torch.arange((w + pad[1]) * factor, device=hint.device)
    rows = torch.where(rows < h * factor, rows, (h - 1) * factor + rows % factor)
    cols = torch.where(cols < w * factor, cols, (w - 1) * factor + cols % factor)
    return hint.index_select(-2, rows).index_select(-1, cols)


def gather_subhints(hint: torch.Tensor, latent_size: tuple[int, int], dilation: int, multiple: int = 1) -> torch.Tensor:
    """[N, C, f·H, f·W] → [N, s², C, f·h, f·w]: sub-hint k = i·s + j holds the f×f pixel blocks of
    latent positions (i + s·y, j + s·x), after the same edge padding as
    :func:`accdiffusion.method.dilated.gather_sublatents` (whole blocks replicated)."""
    n, c = hint.shape[:2]
    h, w = latent_size
    f = hint.shape[-1] // w
    if hint.shape[-2] != h * f or hint.shape[-1] != w * f:
        raise ValueError(f"hint {tuple(hint.shape[-2:])} is not a multiple of the latent {latent_size}")
    s = dilation
    ph, pw = padded_size(h, s, multiple), padded_size(w, s, multiple)
    blocks = hint.reshape(n, c, h, f, w, f)
    if (ph, pw) != (h, w):
        ys = torch.arange(ph, device=hint.device).clamp_max(h - 1)
        xs = torch.arange(pw, device=hint.device).clamp_max(w - 1)
        blocks = blocks.index_select(2, ys).index_select(4, xs)
    # [N, C, y, i, f, x, j, f] → [N, i, j, C, y, f, x, f]
    sub = blocks.reshape(n, c, ph // s, s, f, pw // s, s, f).permute(0, 3, 6, 1, 2, 4, 5, 7)
    return sub.reshape(n, s * s, c, ph // s * f, pw // s * f)


def shuffle_subhints(sub: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Shuffle sub-hints [N, K, C, f·h, f·w] by a latent-position permutation [K, h, w]: every
    f×f block moves with its latent position."""
    f = sub.shape[-1] // perm.shape[-1]
    return shuffle_sublatents(sub, perm.repeat_interleave(f, 1).repeat_interleave(f, 2))


class StageHints:
    """One hint (or mask) for one stage: resized once to the stage's pixel size, cut once per
    window, gathered once into sub-hints; a dilated step only shuffles (once per step)."""

    def __init__(self, hint: torch.Tensor, stage_size: tuple[int, int], windows: Sequence[Window],
                 dilation: int, size_multiple: int = 8, factor: int = 8):
        self.factor = factor
        self.stage_size = stage_size
        self.hint = resize_hint(hint, (stage_size[0] * factor, stage_size[1] * factor))
        self.windows = list(windows)
        self.dilation = dilation
        self.size_multiple = size_multiple
        self._windows: dict[tuple[int, int, int, int, int, int], torch.Tensor] = {}
        self._sub: torch.Tensor | None = None
        self._shuffled: tuple[torch.Tensor | None, torch.Tensor] | None = None
        self.cuts = 0  # how many crops / gathers were made (tests: once per stage and window)

    @property
    def batch(self) -> int:
        return self.hint.shape[0]

    def window(self, window: Window, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
        key = (window.top, window.left, window.height, window.width, *pad)
        if key not in self._windows:
            self._windows[key] = pad_blocks(window_hint(self.hint, window, self.factor), pad, self.factor)
            self.cuts += 1
        return self._windows[key]

    def dilated(self, perm: torch.Tensor | None) -> torch.Tensor:
        if self._sub is None:
            self._sub = gather_subhints(self.hint, self.stage_size, self.dilation, self.size_multiple)
            self.cuts += 1
        if perm is None:
            return self._sub
        if self._shuffled is None or self._shuffled[0] is not perm:
            self._shuffled = (perm, shuffle_subhints(self._sub, perm))
        return self._shuffled[1]

    def for_call(self, items: CallItems, hint_rows: Sequence[int]) -> torch.Tensor:
        """The hint of every batch row of a call, [len(items), C, f·h, f·w]; ``hint_rows[r]``
        is the hint batch index of the caller's row r."""
        picks = [hint_rows[r] for r in items.rows]
        if items.kind == LOCAL:
            return torch.stack([self.window(w, items.pad)[n] for w, n in zip(items.slots, picks)])
        sub = self.dilated(items.perm)
        return sub[torch.tensor(picks), torch.tensor(items.slots)]


def hint_rows_for(hint_batch: int, rows: int, images_per_chunk: int | None = None) -> list[int] | None:
    """Which hint of a batch of ``hint_batch`` each of ``rows`` caller rows uses: one hint for
    all, one per row, or (``images_per_chunk``: Forge's chunks of images) one per image of a chunk.
    None when the hint batch fits none of these (the unit cannot be tiled)."""
    if hint_batch == 1:
        return [0] * rows
    if hint_batch == rows:
        return list(range(rows))
    if images_per_chunk and hint_batch >= images_per_chunk:
        return [r % images_per_chunk for r in range(rows)]
    return None


def log_call(items: CallItems, hints: dict[int, StageHints]) -> None:
    """Debug: which hint region each item of a call got (live checks read this); ``hints`` is
    keyed by the unit's number as the user sees it (1 = the first unit)."""
    for number, stage_hints in hints.items():
        f = stage_hints.factor
        if items.kind == LOCAL:
            text = ", ".join(f"window px y{win.top * f}:{(win.top + win.height) * f} "
                             f"x{win.left * f}:{(win.left + win.width) * f}" for win in dict.fromkeys(items.slots))
            if any(items.pad):
                text += f" (padded by {items.pad} latent px)"
        else:
            text = f"dilated slots {sorted(set(items.slots))} of s={stage_hints.dilation}" + \
                   (" shuffled" if items.perm is not None else "")
        log.debug("AccDiffusion ControlNet unit %d hint %s: %s", number, tuple(stage_hints.hint.shape), text)
