"""Synthetic scenes, their fixed latent code, and colour segmentation.

A scene is a 64×64 px RGB image with 1–3 objects (disk, square, triangle) of distinct colours
(red, green, blue, yellow) on a grey, lightly noisy background, with a caption naming them in
order ("a red disk and a blue square") and one true mask per object. Objects do not overlap, so
every object's mask is its full shape.

Latent code (fixed, not learned): 8×8 px patches → an 8×8×4 latent (the 8× factor of SD's VAE). Channels 0–2 are the patch's
mean colour in an orthonormal opponent basis (luminance, red–green, yellow–blue), channel 3 is the
patch's luminance contrast (std), each scaled to about unit variance. Decoding keeps the mean
colour (channel 3 is detail the decoder does not need): an 8×8 block per latent pixel. Colour
segmentation works on the latent's mean colour, i.e. on the decoded image at latent resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64  # px
PATCH = 8  # px per latent pixel
LATENT = SIZE // PATCH  # 8
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12), "green": (0.12, 0.75, 0.18),
    "blue": (0.15, 0.25, 0.92), "yellow": (0.95, 0.88, 0.12)}
SHAPES = ("disk", "square", "triangle")

# orthonormal opponent basis (rows), and per-channel scales to ~unit variance on the training set
BASIS = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float32)
BASIS = BASIS / BASIS.norm(dim=1, keepdim=True)
SCALE = torch.tensor([7.5, 8.5, 6.5, 30.0])
CENTRE = 0.5


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cy: float  # centre, px
    cx: float
    r: float  # half size, px


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # [64, 64, 3] float32 in [0, 1]
    masks: np.ndarray  # [objects, 64, 64] bool
    objects: tuple[SceneObject, ...]
    caption: str


def caption_of(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    names = [f"a {o.colour} {o.shape}" for o in objects]
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres (y, x)


def shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = _GRID
    dy, dx = y - cy, x - cx
    if shape == "disk":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        s = r * 0.85  # same area feel as the disk
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "triangle":  # upright, apex at the top
        top, bottom = cy - r, cy + r * 0.8
        half = (y - top) / (bottom - top) * r * 1.05
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(seed: int, count: int | None = None) -> Scene:
    """The scene of a seed: same seed, same scene, on every machine (numpy's PCG64)."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 4)) if count is None else count
    grey = rng.uniform(0.35, 0.6)
    image = np.full((SIZE, SIZE, 3), grey, np.float32)
    image += rng.normal(0, 0.025, (SIZE, SIZE, 1)).astype(np.float32)  # light texture
    colours = rng.permutation(list(COLOURS))[:count]
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    occupied = np.zeros((SIZE, SIZE), bool)
    for colour in colours:
        for _ in range(200):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            r = rng.uniform(8.0, 12.0)
            cy, cx = rng.uniform(r + 1, SIZE - r - 1, 2)
            mask = shape_mask(shape, cy, cx, r)
            # a gap of at least one latent pixel, so objects stay apart at latent resolution
            grown = shape_mask(shape, cy, cx, r + PATCH + 2)
            if not (grown & occupied).any():
                break
        else:
            continue
        occupied |= mask
        tint = np.asarray(COLOURS[str(colour)], np.float32) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
        image[mask] = tint
        objects.append(SceneObject(str(colour), shape, float(cy), float(cx), float(r)))
        masks.append(mask)
    image = np.clip(image, 0.0, 1.0)
    masks_arr = np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), bool)
    return Scene(image, masks_arr, tuple(objects), caption_of(objects))


# --- latent code -----------------------------------------------------------------------------
def encode(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → [B, 4, H/patch, W/patch] (the flow toy uses patch 4: a 16×16
    latent, whose channels keep about the same variance with the same scales: measured on 300
    training scenes 1.03/1.03/1.01 for the colour channels, 0.48 for the contrast)."""
    mean = F.avg_pool2d(images, patch)
    colour = torch.einsum("kc,bchw->bkhw", BASIS, mean - CENTRE)
    lum = images.mean(1, keepdim=True)
    contrast = (F.avg_pool2d(lum ** 2, patch) - F.avg_pool2d(lum, patch) ** 2).clamp_min(0).sqrt()
    return torch.cat([colour, contrast], 1) * SCALE.view(1, 4, 1, 1)


def latent_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] → [B, 3, h, w] mean colour per latent pixel, clamped to [0, 1]."""
    colour = latent[:, :3] / SCALE[:3].view(1, 3, 1, 1).to(latent)
    return (torch.einsum("kc,bkhw->bchw", BASIS.to(latent), colour) + CENTRE).clamp(0, 1)


def decode(latent: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] → [B, 3, 8h, 8w] in [0, 1]: each latent pixel's colour as an 8×8 block."""
    return F.interpolate(latent_rgb(latent), scale_factor=PATCH, mode="nearest")


def scene_latent(scene: Scene, patch: int = PATCH) -> torch.Tensor:
    return encode(torch.from_numpy(scene.image).permute(2, 0, 1)[None], patch)[0]


# --- colour segmentation ---------------------------------------------------------------------
def colour_labels(rgb: torch.Tensor) -> np.ndarray:
    """[3, h, w] → [h, w] int: index into COLOURS, or -1 for background (greyish or far from
    every object colour)."""
    palette = torch.tensor(list(COLOURS.values()))  # [K, 3]
    pix = rgb.permute(1, 2, 0).reshape(-1, 3).float()
    dist = torch.cdist(pix, palette)  # [P, K]
    best, index = dist.min(1)
    saturation = pix.max(1).values - pix.min(1).values
    label = torch.where((best < 0.35) & (saturation > 0.3), index, torch.full_like(index, -1))
    return label.view(rgb.shape[1:]).numpy()


def segment(rgb: torch.Tensor, min_area: float) -> dict[str, list[np.ndarray]]:
    """Connected components (8-neighbour) per colour with at least ``min_area`` pixels."""
    import cv2

    labels = colour_labels(rgb)
    out: dict[str, list[np.ndarray]] = {}
    for k, name in enumerate(COLOURS):
        mask = (labels == k).astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        out[name] = [comp == i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    return out


def counts(latent: torch.Tensor, min_area: float = 2.0) -> dict[str, int]:
    """Objects per colour in one latent [4, h, w]: connected regions of at least ``min_area``
    latent pixels. The model's objects cover 3–9 latent pixels at the native size, and a tile of
    an upscaled image draws new ones at that same size, so the default (2) is used at every
    scale; 1 counts every blob of colour, specks included."""
    seg = segment(latent_rgb(latent[None])[0], min_area=min_area)
    return {k: len(v) for k, v in seg.items()}


def caption_colours(caption: str) -> list[str]:
    return [w for w in caption.replace(",", " ").split() if w in COLOURS]


def matches_caption(latent: torch.Tensor, caption: str) -> bool:
    """Exactly one blob of every colour the caption names and none of any other colour (every
    blob counts: a small triangle may keep one strongly coloured latent pixel)."""
    wanted = set(caption_colours(caption))
    got = counts(latent, min_area=1)
    return all(got[c] == (1 if c in wanted else 0) for c in COLOURS)
