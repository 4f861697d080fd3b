"""Window grids that cover a latent exactly, and MultiDiffusion-style averaging fusion."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Window:
    top: int
    left: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def axis_starts(length: int, window: int, stride: int, jitter: int = 0,
                generator: torch.Generator | None = None, align: int = 1) -> list[int]:
    """Start offsets of windows along one axis: first at 0, last flush with the end, evenly
    spaced in between at no more than ``stride``; inner starts rounded to multiples of ``align``
    (a transformer's patch grid). Jitter moves inner windows by up to ``jitter``
    while keeping every gap below ``window``, so coverage is never lost."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if window >= length:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    span = length - window
    starts = [round(i * span / (count - 1)) for i in range(count)]
    if align > 1:
        aligned = [starts[0]] + [round(s / align) * align for s in starts[1:-1]] + [starts[-1]]
        if all(b - a <= window for a, b in zip(aligned, aligned[1:])):  # else a gap: keep the exact starts
            starts = aligned
    if jitter and count > 2:
        gap = span / (count - 1)
        jitter = min(jitter, max(0, int((window - gap) // 2)))
        offsets = torch.randint(-jitter, jitter + 1, (count - 2,), generator=generator).tolist()
        starts = [starts[0]] + [min(max(s + o, 0), span) for s, o in zip(starts[1:-1], offsets)] + [span]
    return starts


def window_grid(height: int, width: int, window: tuple[int, int], stride: tuple[int, int],
                jitter: int = 0, generator: torch.Generator | None = None, align: int = 1) -> list[Window]:
    """Row-major windows covering a ``height``×``width`` latent; windows larger than the latent
    shrink to it."""
    win_h, win_w = min(window[0], height), min(window[1], width)
    rows = axis_starts(height, win_h, stride[0], jitter, generator, align)
    cols = axis_starts(width, win_w, stride[1], jitter, generator, align)
    return [Window(r, c, win_h, win_w) for r in rows for c in cols]


def coverage(height: int, width: int, windows: Sequence[Window]) -> torch.Tensor:
    """How many windows cover each latent pixel."""
    count = torch.zeros(height, width)
    for w in windows:
        count[w.slices] += 1
    return count


def fuse_windows(outputs: Sequence[torch.Tensor], windows: Sequence[Window],
                 shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Average overlapping window outputs ([..., h, w] each) into one [..., H, W] tensor."""
    total = outputs[0].new_zeros(shape)
    count = outputs[0].new_zeros(shape[-2:])
    for out, w in zip(outputs, windows):
        total[(..., *w.slices)] += out
        count[w.slices] += 1
    if bool((count == 0).any()):
        raise ValueError("windows leave latent pixels uncovered")
    return total / count


def map_windows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                windows: Sequence[Window]) -> torch.Tensor:
    """Apply ``fn`` window by window and average: a reference for the batched denoiser."""
    return fuse_windows([fn(x[(..., *w.slices)]) for w in windows], windows, x.shape)


def cover_resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic",
                 antialias: bool = False) -> torch.Tensor:
    """Resize [..., h, w] to cover ``size`` keeping the aspect ratio, then centre-crop to it: a
    plain resize when the aspect ratio is kept, the WebUI's crop for hires targets of another
    aspect ratio (processing.py:1427). Latents and word masks go through the same geometry."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    cover = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    kwargs: dict = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": antialias}
    squeeze = x.ndim == 3
    batch = x[None] if squeeze else x
    out = F.interpolate(batch.float(), size=cover, mode=mode, **kwargs).to(x.dtype)
    top, left = (cover[0] - size[0]) // 2, (cover[1] - size[1]) // 2
    out = out[..., top:top + size[0], left:left + size[1]]
    return out[0] if squeeze else out


# --- shifted (non-overlapping) windows ---------------------------------------------------------
def shifted_axis(length: int, window: int, offset: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, size) pieces that tile ``length`` without overlap: n = ⌈length / window⌉ pieces
    of pitch p = length / n ≤ window, cut at offset + k·p (cuts rounded to multiples of ``align``).
    A shift leaves two edge slivers that add up to one pitch; the shorter is merged into its
    neighbour, so the count stays n and edge pieces are between p/2 and 3p/2 long (a window
    never exceeds 1.5× the window side, plus alignment): every pixel is
    covered exactly once, at the cost of the same n² evaluations as the unshifted grid."""
    if window <= 0 or length <= 0:
        raise ValueError(f"length ({length}) and window ({window}) must be positive")
    n = max(1, math.ceil(length / window))
    if n == 1:
        return [(0, length)]
    pitch = length / n
    phase = offset % pitch
    align = max(1, align)
    cuts = sorted({int(round((phase + k * pitch) / align)) * align for k in range(-1, n + 1)})
    bounds = [0] + [c for c in cuts if 0 < c < length] + [length]
    pieces = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    while len(pieces) > n:
        if pieces[0][1] <= pieces[-1][1]:
            pieces[:2] = [(0, pieces[0][1] + pieces[1][1])]
        else:
            pieces[-2:] = [(pieces[-2][0], pieces[-2][1] + pieces[-1][1])]
    return pieces


def shifted_windows(size: tuple[int, int], window: tuple[int, int], offset: tuple[int, int],
                    align: int = 1) -> list[Window]:
    """Row-major non-overlapping windows tiling a latent of ``size`` (H, W), the grid moved by
    ``offset`` (dy, dx) latent pixels: see :func:`shifted_axis`."""
    rows = shifted_axis(size[0], window[0], offset[0], align)
    cols = shifted_axis(size[1], window[1], offset[1], align)
    return [Window(top, left, h, w) for top, h in rows for left, w in cols]


def shift_offset(window: tuple[int, int], generator: torch.Generator, align: int = 1) -> tuple[int, int]:
    """A uniformly drawn grid offset (dy, dx), multiples of ``align`` in [0, window)."""
    out = []
    for side in window:
        choices = max(1, side // max(1, align))
        out.append(int(torch.randint(0, choices, (1,), generator=generator)) * max(1, align))
    return out[0], out[1]


def nearest_window(window: Window, candidates: Sequence[Window]) -> int:
    """Index of the candidate that overlaps ``window`` the most (ties: the first)."""
    def overlap(c: Window) -> int:
        h = min(window.top + window.height, c.top + c.height) - max(window.top, c.top)
        w = min(window.left + window.width, c.left + c.width) - max(window.left, c.left)
        return max(0, h) * max(0, w)

    return max(range(len(candidates)), key=lambda i: (overlap(candidates[i]), -i))
