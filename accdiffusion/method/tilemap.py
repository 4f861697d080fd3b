"""The tile-prompt map: the first-pass image with a stage's windows and the words each one got.

Pure PIL (works with the Pillow 9.5 that A1111 pins and with newer ones); no WebUI import.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # tiles imports torch; only the attributes top/left/height/width are read here
    from .tiles import Window

MAX_SIDE = 2048
EMPTY = "(empty)"
FILL_ALPHA = 40
TEXT_BG = (0, 0, 0, 170)


def window_colour(i: int) -> tuple[int, int, int]:
    """Distinct, saturated colours: hues spread by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError, AttributeError):
        return ImageFont.load_default()


def _renderable(text: str, font) -> str:
    """The bitmap default font of older Pillow only encodes Latin-1; replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; words longer than a line are cut."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if _text_width(draw, candidate, font) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while _text_width(draw, word, font) > max_width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and _text_width(draw, word[:cut], font) > max_width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _own_extent(i: int, windows: Sequence["Window"], axis: str) -> int:
    """Latent extent of window ``i``'s own corner cell along ``axis`` ("left" or "top"): up to the
    nearest window starting after it that overlaps it on the other axis. Texts drawn in these
    cells do not cover each other."""
    w = windows[i]
    start, size = (w.left, w.width) if axis == "left" else (w.top, w.height)
    extent = size
    for j, o in enumerate(windows):
        if j == i:
            continue
        o_start = o.left if axis == "left" else o.top
        if axis == "left":
            overlaps = o.top < w.top + w.height and w.top < o.top + o.height
        else:
            overlaps = o.left < w.left + w.width and w.left < o.left + o.width
        if overlaps and start < o_start < start + extent:
            extent = o_start - start
    return extent


def draw_tile_prompt_map(image: Image.Image, windows: Sequence["Window"], prompts: Sequence[str],
                         latent_size: tuple[int, int], max_side: int = MAX_SIDE,
                         pixels_per_latent: int = 8) -> Image.Image:
    """``image`` scaled to the stage's pixel size (``latent_size`` is the latent (H, W); pixels are
    ``pixels_per_latent``×: 8, Flux.2's 16), shrunk as a whole if its longer side exceeds ``max_side``. Each window is drawn as a
    translucent filled rectangle (overlaps show darker) with a solid outline, and its prompt is
    written in its top-left corner cell, wrapped. Returns a new RGB image."""
    if len(windows) != len(prompts):
        raise ValueError(f"{len(windows)} windows but {len(prompts)} prompts")
    lat_h, lat_w = latent_size
    if lat_h <= 0 or lat_w <= 0:
        raise ValueError(f"latent size must be positive, got {latent_size}")
    f = pixels_per_latent
    scale = f * min(1.0, max_side / (f * max(lat_h, lat_w)))  # output pixels per latent pixel
    out_w, out_h = max(1, round(lat_w * scale)), max(1, round(lat_h * scale))
    canvas = image.convert("RGB").resize((out_w, out_h), Image.LANCZOS).convert("RGBA")

    def box(w: "Window") -> tuple[int, int, int, int]:
        x0, y0 = round(w.left * scale), round(w.top * scale)
        x1 = min(out_w, round((w.left + w.width) * scale))
        y1 = min(out_h, round((w.top + w.height) * scale))
        return x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)

    for i, w in enumerate(windows):  # fills one by one, so overlaps accumulate
        x0, y0, x1, y1 = box(w)
        canvas.alpha_composite(Image.new("RGBA", (x1 - x0, y1 - y0), (*window_colour(i), FILL_ALPHA)),
                               dest=(x0, y0))

    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    outline = max(1, round(scale / 4))
    for i, w in enumerate(windows):
        draw.rectangle(box(w), outline=(*window_colour(i), 255), width=outline)

    cells = [(_own_extent(i, windows, "left") * scale, _own_extent(i, windows, "top") * scale)
             for i in range(len(windows))]
    smallest = min((min(c) for c in cells), default=128.0)
    font = _font(int(min(24, max(10, smallest / 14))))
    line_h = max(1, draw.textbbox((0, 0), "Ag", font=font)[3]) + 2
    pad = max(2, outline + 1)
    for i, (w, prompt) in enumerate(zip(windows, prompts)):
        x0, y0, _, _ = box(w)
        cell_w, cell_h = cells[i]
        text = _renderable(prompt.strip() or EMPTY, font)
        lines = wrap_text(draw, text, font, max(8.0, cell_w - 3 * pad))
        fit = max(1, int((cell_h - 3 * pad) // line_h))
        if len(lines) > fit:
            lines = lines[:fit]
            lines[-1] = lines[-1][:max(1, len(lines[-1]) - 3)] + "..."
        width = max(_text_width(draw, line, font) for line in lines)
        tx, ty = x0 + pad, y0 + pad
        draw.rectangle((tx, ty, tx + width + 3 * pad, ty + len(lines) * line_h + pad), fill=TEXT_BG)
        colour = window_colour(i)
        draw.rectangle((tx, ty, tx + pad - 1, ty + len(lines) * line_h + pad), fill=(*colour, 255))
        for k, line in enumerate(lines):
            draw.text((tx + 2 * pad, ty + pad // 2 + k * line_h), line, font=font,
                      fill=(255, 255, 255, 255))
    canvas.alpha_composite(overlay)
    return canvas.convert("RGB")
