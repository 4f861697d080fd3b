"""Dilated sampling with window interaction (paper §3.4).

A latent [B, C, H, W] and a dilation factor s give s² sub-latents x[..., i::s, j::s]. Sizes that
are not multiples of s (or whose sub-latents the UNet cannot take) are padded by edge replication
first and cropped after, so every size works.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F


def padded_size(length: int, dilation: int, multiple: int = 1) -> int:
    """Smallest padded length whose sub-latents (length / dilation) are a multiple of ``multiple``."""
    sub = math.ceil(length / dilation)
    sub = math.ceil(sub / multiple) * multiple
    return sub * dilation


def gather_sublatents(x: torch.Tensor, dilation: int, multiple: int = 1) -> torch.Tensor:
    """[B, C, H, W] → [B, s², C, h, w] with sub-latent k = i·s + j holding x[..., i::s, j::s]."""
    b, c, h, w = x.shape
    s = dilation
    ph, pw = padded_size(h, s, multiple), padded_size(w, s, multiple)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), mode="replicate")
    # [B, C, h', s, w', s] -> [B, s, s, C, h', w']
    sub = x.reshape(b, c, ph // s, s, pw // s, s).permute(0, 3, 5, 1, 2, 4)
    return sub.reshape(b, s * s, c, ph // s, pw // s)


def scatter_sublatents(sub: torch.Tensor, dilation: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`gather_sublatents`: [B, s², C, h, w] → [B, C, H, W] cropped to ``size``."""
    b, k, c, sh, sw = sub.shape
    s = dilation
    x = sub.reshape(b, s, s, c, sh, sw).permute(0, 3, 4, 1, 5, 2).reshape(b, c, sh * s, sw * s)
    return x[..., : size[0], : size[1]]


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from the generation seed and the given keys (stage, step, ...), so
    the same settings always draw the same numbers, on any device."""
    digest = hashlib.sha256(":".join(str(int(v)) for v in (seed, *keys)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def window_permutation(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """perm[k, y, x]: which sub-latent goes to slot k at position (y, x); an independent random
    bijection of {0..count-1} at every position."""
    noise = torch.rand(height * width, count, generator=generator)
    return noise.argsort(dim=1).T.reshape(count, height, width)


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse.scatter_(0, perm, torch.arange(perm.shape[0]).view(-1, 1, 1).expand_as(perm).to(perm))
    return inverse


def shuffle_sublatents(sub: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[B, K, C, h, w] → shuffled[b, k, :, y, x] = sub[b, perm[k, y, x], :, y, x]."""
    b, k, c, h, w = sub.shape
    index = perm.to(sub.device).view(1, k, 1, h, w).expand(b, k, c, h, w)
    return sub.gather(1, index)


def unshuffle_sublatents(sub: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`shuffle_sublatents` for the same ``perm``."""
    return shuffle_sublatents(sub, invert_permutation(perm))


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def blur_restandardised(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur per channel, then rescaled to the input's mean and std (per image), so the
    blurred latent keeps the noise level the sampler expects."""
    if sigma <= 0 or kernel_size < 2:
        return x
    kernel_size = kernel_size + 1 - kernel_size % 2  # odd
    b, c, h, w = x.shape
    kernel = gaussian_kernel(kernel_size, sigma).to(x).expand(c, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    blurred = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), kernel, groups=c)
    dims = (1, 2, 3)
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    b_mean, b_std = blurred.mean(dims, keepdim=True), blurred.std(dims, keepdim=True)
    return (blurred - b_mean) / b_std.clamp_min(1e-8) * std + mean
