"""The progressive hires pass: stages, the fused denoiser, skip residual, latent helpers, decode.

The denoiser hooks the sampler at the denoised (x0) output, which every k-diffusion sampler —
first or second order, ancestral or not — turns into its next state the same way. It fuses
  local  : overlapping windows, each with its own tile prompt, averaged (MultiDiffusion); or, with
           window_mode "shifted", non-overlapping windows moved by a seeded offset every step;
  dilated: sub-latents x[..., i::s, j::s] of a blurred copy, shuffled position-wise by a seeded
           bijection (window interaction), denoised, un-shuffled; the prediction is re-expressed
           against the unblurred latent, i.e. denoised = D(x_blur) + c_skip(σ)·(x − x_blur)
           (c_skip = 1 for ε-prediction; see :func:`v_prediction_c_skip`);
mixed as (1 − c2)·local + c2·dilated; a branch whose weight is below ε (BRANCH_EPSILON) is not
evaluated, which moves the result by at most ε·|local − dilated| per pixel. The skip residual
changes the sampler's own state in place
(see :meth:`StageDenoiser.skip_residual_`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

from .control import CallItems
from .flow import NoiseScaling
from .dilated import (blur_restandardised, gather_sublatents, scatter_sublatents, seeded_generator,
                      shuffle_sublatents, unshuffle_sublatents, window_permutation)
from .batching import CPU_TILE_BATCH, AutoTileBatch, batch_key
from .schedule import SigmaToT, StepFactors, step_factors, timestep_of
from .settings import AccDiffusionSettings
from .tiles import Window, cover_resize, nearest_window, shift_offset, shifted_windows, window_grid

C = TypeVar("C")  # a host's per-row conditioning
# (x [N, C, h, w], sigma [N], one conditioning per row) -> denoised x0 [N, C, h, w]
RowModel = Callable[[torch.Tensor, torch.Tensor, Sequence[Any]], torch.Tensor]
# a row's tile conditioning: one per window of ``StageDenoiser.windows`` (list), a lookup
# ``window -> conditioning`` for any window (needed by the shifted schedule), or None (the row's
# own conditioning everywhere)
TileConds = Sequence[Any] | Callable[[Window], Any] | None

# A branch whose mixing weight is below this is not evaluated: |fused − exact| ≤ ε·|local − dilated|
BRANCH_EPSILON = 0.01
SHIFT_KEY = 1  # keeps the window offsets' random stream apart from the permutation's


class AccDiffusionError(RuntimeError):
    """A problem the user can act on; the message says what to change."""


# --- stages ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    index: int  # 1 for the first hires stage
    scale: float  # relative to the first pass
    size: tuple[int, int]  # latent (H, W)
    dilation: int  # s: the dilated branch takes s² sub-latents


def dilation_for(scale: float) -> int:
    """s for a stage: sub-latents of at most ~1.25× the first-pass size (s = ⌈scale − ¼⌉, at
    least 2), so 1.5× → 2, 2× → 2, 2.5× → 3, 3× → 3, 4× → 4."""
    return max(2, math.ceil(scale - 0.25))


def plan_stages(base: tuple[int, int], target: tuple[int, int], progressive: bool = True) -> list[Stage]:
    """Stages from the first-pass latent size to the target. Progressive: every whole multiple of
    the base (2×, 3×, …) at least ½ below the target scale, then the target itself; so 4× runs
    2×, 3×, 4×; 2.5× runs 2×, 2.5×; 1.5× and 2.2× run one stage."""
    h, w = base
    th, tw = target
    if min(h, w, th, tw) <= 0:
        raise AccDiffusionError(f"AccDiffusion: invalid sizes {base} → {target}")
    scale = max(th / h, tw / w)
    if scale <= 1.0:
        raise AccDiffusionError(
            f"AccDiffusion: the hires size ({tw * 8}×{th * 8}) must be larger than the first pass "
            f"({w * 8}×{h * 8}); raise 'Upscale by' above 1")
    scales = [float(k) for k in range(2, math.floor(scale) + 1) if scale - k >= 0.5] if progressive else []
    scales.append(scale)
    stages = []
    for i, k in enumerate(scales, start=1):
        size = (th, tw) if i == len(scales) else (round(th * k / scale), round(tw * k / scale))
        stages.append(Stage(index=i, scale=k, size=size, dilation=dilation_for(k)))
    return stages


def stage_windows(stage: Stage, base: tuple[int, int], settings: AccDiffusionSettings, align: int = 1) -> list[Window]:
    """The exact local windows of a stage: ``window_size`` (0 = the first-pass latent size) and
    ``stride`` (0 = half the window, per side). ``align``: a transformer's patch size; window
    sides and corners are multiples of it (a corner flush with an odd latent's edge excepted)."""
    win = (settings.window_size, settings.window_size) if settings.window_size else base
    win = (min(win[0], stage.size[0]), min(win[1], stage.size[1]))
    if align > 1:
        win = (max(align, win[0] // align * align), max(align, win[1] // align * align))
        win = (min(win[0], stage.size[0]), min(win[1], stage.size[1]))
    if settings.stride:
        stride = (min(settings.stride, win[0]), min(settings.stride, win[1]))
    else:
        stride = (max(1, win[0] // 2), max(1, win[1] // 2))
    return window_grid(stage.size[0], stage.size[1], win, stride, align=align)


# --- latent helpers ----------------------------------------------------------------------------
def upscale_latent(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Upscale a latent to a stage size (centre-cropping when the aspect ratio changes)."""
    return cover_resize(x, size, mode)


def latent_stats(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (or per image and channel) mean and std, shaped to broadcast over [B, C, H, W]."""
    dims = tuple(range(2 if per_channel else 1, x.ndim))
    return x.mean(dims, keepdim=True), x.std(dims, keepdim=True)


def restandardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Give x the given mean/std, over the same dimensions they were taken over (per image, or
    per image and channel: ``mean`` [B, C, 1, 1] with C > 1): upscaling smooths the latent and
    lowers its variance, which the next stage's sampler would read as missing signal."""
    per_channel = mean.ndim == x.ndim and mean.ndim > 2 and mean.shape[1] > 1
    x_mean, x_std = latent_stats(x, per_channel)
    return (x - x_mean) / x_std.clamp_min(1e-8) * std + mean


def v_prediction_c_skip(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """c_skip(σ) = σ_data² / (σ² + σ_data²) of a v-prediction model (k-diffusion's
    ``DiscreteVDDPMDenoiser.get_scalings(sigma)[0]``, σ_data = 1). Pass it as
    :attr:`StageDenoiser.skip_scale` for v-models; ε-models need nothing (their c_skip is 1)."""
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def restandardise_stage_output(latent: torch.Tensor, first_pass_mean: torch.Tensor,
                               first_pass_std: torch.Tensor) -> torch.Tensor:
    """A stage's sampled latent, re-standardised to the first pass's mean and std, per image (or
    per image and channel: whichever the given statistics are). The stage loop calls it after every stage, the last one included, so the latent that is
    decoded has the first pass's contrast and mean, as in the reference (DemoFusion/AccDiffusion).

    Measured on the reference host (real ldm UNet, tiny random weights, k-diffusion Euler, CFG 7,
    first pass 10 steps at 16×16, 10 hires steps at denoise 0.5, seeds 0–3, two images each, SD1-
    and SDXL-like layouts, 2× and 3× progressive): the raw output of every stage came out with a
    std 1.005–1.012× the first pass's (higher in all 32 image-stages) and a mean shifted by at
    most 0.12 (first-pass std ≈ 15). Re-standardising removes that small, one-sided contrast gain
    exactly and costs nothing. Between stages it changes nothing (the next stage re-standardises
    its upscaled input, and upscaling commutes with the affine map), so its only effect is on the
    decoded latent.

    Flow models (Flux, Chroma, SD 3.5) get per-channel statistics (:func:`latent_stats` with
    ``per_channel``): on the flow toy, whose latent channels have unequal scales as Flux's 16 have,
    the raw stage output drifted per channel (std 0.85-0.99× the first pass's on average, means up
    to 6 first-pass stds off in some images at denoise 0.8), and the output pooled back to the
    first pass's grid was closer to the first pass after per-channel re-standardisation than after
    the per-image one (squared error 0.38 vs 0.55 of the first pass's variance, raw 0.90; paired
    difference −0.17 ± 0.03 over 200 image-stages; ``python -m accdiffusion.lab.toy stats --model
    flow``, docs/toy-flow.md)."""
    return restandardise(latent, first_pass_mean, first_pass_std)


# --- the fused denoiser ----------------------------------------------------------------------
@dataclass
class StageStats:
    unet_calls: int = 0
    window_evals: int = 0  # per-row window / sub-latent evaluations
    latent_pixels: int = 0
    steps: int = 0
    local_evals: int = 0  # of window_evals: the local branch's windows
    skipped_local_evals: int = 0  # per-row evaluations not run: the branch's weight was < ε
    skipped_dilated_evals: int = 0
    tile_batch: int = 0  # the most windows one UNet call took (the automatic choice, if automatic)

    @property
    def skipped_evals(self) -> int:
        return self.skipped_local_evals + self.skipped_dilated_evals


@dataclass
class StageDenoiser(Generic[C]):
    """Everything one stage needs; call it from the host's wrapped model."""
    stage: Stage
    windows: list[Window]
    settings: AccDiffusionSettings
    seed: int
    sigma_to_t: SigmaToT
    size_multiple: int = 8  # sub-latents padded to a size the UNet accepts
    reference: torch.Tensor | None = None  # upscaled previous latent (clean), [B, C, H, W]
    noise: torch.Tensor | None = None  # the stage's starting noise, [B, C, H, W]
    # c_skip(σ) of the model's parametrisation, [N] → [N]: a model's denoised output is
    # c_skip·x + c_out·F(c_in·x), so the dilated branch's prediction for x_blur is re-expressed
    # against x as D(x_blur) + c_skip·(x − x_blur). None = ε-prediction (c_skip = 1); a
    # v-prediction model needs :func:`v_prediction_c_skip` (or the wrapper's get_scalings()[0]).
    skip_scale: Callable[[torch.Tensor], torch.Tensor] | None = None
    # how the model noises a clean latent (:mod:`accdiffusion.flow`): the skip residual re-noises
    # its reference with it; None = x₀ + σ·ε (ε / v models)
    noise_scaling: NoiseScaling | None = None
    stats: StageStats = field(default_factory=StageStats)
    items: CallItems | None = None  # while a model call runs: what its batch rows are (control hints)
    auto_batch: AutoTileBatch | None = None  # share one across stages: each shape measured once
    branch_epsilon: float = BRANCH_EPSILON
    jitter: int = 0  # overlap mode: move inner windows by up to this many latent pixels per step (measured, off)
    _step_of_sigma: dict[float, int] = field(default_factory=dict)
    _windows_of_step: dict[int, list[Window]] = field(default_factory=dict)

    def factors(self, sigma: torch.Tensor | float) -> StepFactors:
        s = self.settings
        return step_factors(timestep_of(sigma, self.sigma_to_t),
                            s.cosine_scale_1, s.cosine_scale_2, s.cosine_scale_3)

    def step_index(self, sigma: torch.Tensor | float) -> int:
        """Index of a sigma in the order first seen: every call at the same noise level (cond and
        uncond split, AND prompts) shares the step's permutation."""
        key = round(float(torch.as_tensor(sigma).reshape(-1)[0]), 6)
        if key not in self._step_of_sigma:
            self._step_of_sigma[key] = len(self._step_of_sigma)
            self.stats.steps += 1
        return self._step_of_sigma[key]

    @torch.no_grad()
    def skip_residual_(self, x: torch.Tensor, sigma: torch.Tensor | float,
                       scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """x ← (1 − c1)·x + c1·scale·renoised, in place on the sampler's own tensor, so the state it
        continues from changes, not only a copy the model sees; renoised is the reference at σ
        with the stage's noise, as the model noises (ε / v: reference + σ·noise; flow matching:
        (1 − σ)·reference + σ·noise). ``scale`` is how the sampler's x relates to the k-diffusion
        x: 1 for a k-diffusion sampler, √ᾱ_t for a timestep sampler (whose x_t = √ᾱ_t·x;
        :mod:`accdiffusion.method.timesteps`), so the mix is the same one in either frame."""
        if not self.settings.skip_residual or self.reference is None or self.noise is None:
            return x
        sigma_value = float(torch.as_tensor(sigma).reshape(-1)[0])
        scale_value = float(torch.as_tensor(scale).reshape(-1)[0])
        c1 = self.factors(sigma_value).c1
        if self.noise_scaling is None:
            renoised = self.reference.to(x) + self.noise.to(x) * sigma_value
        else:
            renoised = self.noise_scaling(sigma_value, self.noise.to(x), self.reference.to(x))
        x.mul_(1.0 - c1).add_(renoised, alpha=c1 * scale_value)
        return x

    @property
    def window_size(self) -> tuple[int, int]:
        """The local window (H, W): the overlap grid's, which the shifted schedule keeps."""
        if not self.windows:
            return self.stage.size
        return max(w.height for w in self.windows), max(w.width for w in self.windows)

    def windows_at(self, step: int) -> list[Window]:
        """The local windows of a step. overlap: always :attr:`windows`. shifted: a non-overlapping
        tiling moved by an offset drawn from (seed, stage, step), so all calls of one step share it
        and the same seed gives the same offsets; offsets and cuts on multiples of
        :attr:`window_grain`."""
        if self.settings.window_mode != "shifted" and not self.jitter:
            return self.windows
        if step not in self._windows_of_step and self.settings.window_mode != "shifted":
            first = self.windows[0]
            tops, lefts = sorted({w.top for w in self.windows}), sorted({w.left for w in self.windows})
            stride = (max((b - a for a, b in zip(tops, tops[1:])), default=first.height),
                      max((b - a for a, b in zip(lefts, lefts[1:])), default=first.width))
            self._windows_of_step[step] = window_grid(
                self.stage.size[0], self.stage.size[1], (first.height, first.width), stride, self.jitter,
                seeded_generator(self.seed, self.stage.index, step, SHIFT_KEY))
        if step not in self._windows_of_step:
            window, grain = self.window_size, self.window_grain
            offset = shift_offset(window, seeded_generator(self.seed, self.stage.index, step, SHIFT_KEY), grain)
            self._windows_of_step[step] = shifted_windows(self.stage.size, window, offset, grain)
        return self._windows_of_step[step]

    @property
    def window_grain(self) -> int:
        """Latent pixels between the shifted grid's possible offsets and cuts: the setting, or the
        model's size multiple (0, how shifted windows were cut before the setting existed). A grain
        finer than the size multiple gives windows the model cannot take as they are: ``_local``
        pads them by edge replication and crops the output back."""
        return self.settings.window_grain or self.size_multiple

    def branches(self, c2: float) -> tuple[bool, bool]:
        """(run local, run dilated) for a dilated weight c2: a branch whose weight (1 − c2 or c2) is
        below ε is skipped, which changes the fused result by at most ε·|local − dilated| per
        pixel; weights ≥ ε always run."""
        if not self.settings.dilated_sampling:
            return True, False
        eps = self.branch_epsilon
        run_dilated = c2 >= eps
        run_local = (1.0 - c2) >= eps or not run_dilated
        return run_local, run_dilated

    def __call__(self, model: RowModel, x: torch.Tensor, sigma: torch.Tensor, row_conds: Sequence[C],
                 row_tile_conds: Sequence[TileConds] | None = None) -> torch.Tensor:
        """Fused denoised latent for the rows of x (any mix of cond/uncond/AND rows).
        ``row_tile_conds[r]`` for row r: a list with one conditioning per window of
        :attr:`windows`, a callable ``window -> conditioning`` (any window: what the shifted
        schedule needs), or None to use ``row_conds[r]`` in every window."""
        if x.shape[-2:] != torch.Size(self.stage.size):
            raise AccDiffusionError(
                f"AccDiffusion: latent {tuple(x.shape[-2:])} does not match stage size {self.stage.size}")
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        row_tile_conds = row_tile_conds or [None] * x.shape[0]
        step = self.step_index(sigma[0])
        windows = self.windows_at(step)
        factors = self.factors(sigma[0]) if self.settings.dilated_sampling else None
        run_local, run_dilated = self.branches(factors.c2 if factors else 0.0)
        rows = x.shape[0]
        local = dilated = None
        if run_local:
            before = self.stats.window_evals
            local = self._local(model, x, sigma, row_conds, row_tile_conds, windows)
            self.stats.local_evals += self.stats.window_evals - before
        else:
            self.stats.skipped_local_evals += len(windows) * rows
        if run_dilated:
            dilated = self._dilated(model, x, sigma, row_conds, factors, step)
        elif factors is not None:
            self.stats.skipped_dilated_evals += self.stage.dilation ** 2 * rows
        if local is None:
            return dilated
        if dilated is None:
            return local
        return torch.lerp(local, dilated, factors.c2)

    def _call(self, model: RowModel, xs: torch.Tensor, sigmas: torch.Tensor, conds: list[Any], part: slice,
              items: CallItems | None) -> torch.Tensor:
        self.items = items.part(part) if items is not None else None
        try:
            return model(xs[part], sigmas[part], conds[part])
        finally:
            self.items = None

    def _tile_batch(self, model: RowModel, xs: torch.Tensor, sigmas: torch.Tensor, conds: list[Any],
                    rows_per_item: int, outs: list[torch.Tensor], items: CallItems | None = None) -> tuple[int, int]:
        """(windows per call, items already evaluated): the setting, or automatic — on CUDA the
        first call of a new window shape runs one window alone to measure its peak memory."""
        if self.settings.tile_batch_size:
            return self.settings.tile_batch_size, 0
        auto = self.auto_batch if self.auto_batch is not None else AutoTileBatch()
        self.auto_batch = auto
        if not auto.applies(xs.device):
            return CPU_TILE_BATCH, 0
        key = batch_key(xs, rows_per_item)
        done = 0
        if key not in auto.costs:
            first = slice(0, rows_per_item)
            outs.append(auto.measure(key, lambda: self._call(model, xs, sigmas, conds, first, items), xs.device))
            self._count_call(xs[first])
            done = 1
        return auto.batch(key, xs.device), done

    def _count_call(self, part: torch.Tensor) -> None:
        self.stats.unet_calls += 1
        self.stats.window_evals += part.shape[0]
        self.stats.latent_pixels += part.shape[0] * part.shape[-2] * part.shape[-1]

    def _run(self, model: RowModel, xs: torch.Tensor, sigmas: torch.Tensor, conds: list[Any],
             rows_per_item: int, items: CallItems | None = None) -> torch.Tensor:
        """Evaluate items in chunks of ``tile_batch_size`` windows (× rows); 0 = automatic.
        ``self.items`` describes the chunk while the model runs."""
        outs: list[torch.Tensor] = []
        batch, done = self._tile_batch(model, xs, sigmas, conds, rows_per_item, outs, items)
        self.stats.tile_batch = max(self.stats.tile_batch, min(batch, xs.shape[0] // rows_per_item))
        chunk = batch * rows_per_item
        for start in range(done * rows_per_item, xs.shape[0], chunk):
            part = slice(start, start + chunk)
            outs.append(self._call(model, xs, sigmas, conds, part, items))
            self._count_call(xs[part])
        return torch.cat(outs)

    def _window_conds(self, tile_conds: TileConds, own: C, windows: list[Window]) -> list[Any]:
        """One conditioning per window for one row."""
        if tile_conds is None:
            return [own] * len(windows)
        if callable(tile_conds):
            return [tile_conds(win) for win in windows]
        if len(tile_conds) != len(self.windows):
            raise AccDiffusionError(
                f"AccDiffusion: {len(tile_conds)} tile conditionings for {len(self.windows)} windows")
        if windows is self.windows or len(windows) == len(self.windows) and self.jitter:
            return list(tile_conds)
        # a list made for the overlap grid, used with other windows: each takes the conditioning of
        # the overlap window it overlaps most (a fallback; hosts should pass a lookup)
        return [tile_conds[nearest_window(win, self.windows)] for win in windows]

    def _local(self, model: RowModel, x: torch.Tensor, sigma: torch.Tensor, row_conds: Sequence[C],
               row_tile_conds: Sequence[TileConds], windows: list[Window] | None = None) -> torch.Tensor:
        windows = self.windows if windows is None else windows
        rows = x.shape[0]
        per_row = [self._window_conds(row_tile_conds[r], row_conds[r], windows) for r in range(rows)]
        total = torch.zeros_like(x)
        count = x.new_zeros(x.shape[-2:])
        # windows of one size are batched together (edge windows may differ)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, win in enumerate(windows):
            by_size.setdefault((win.height, win.width), []).append(i)
        for (height, width), indices in by_size.items():
            xs = torch.cat([x[(..., *windows[i].slices)] for i in indices])
            pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
            if (pad_h or pad_w) and self.settings.window_mode == "shifted":
                # shifted edge windows: padded to a size the UNet takes, cropped after
                xs = torch.nn.functional.pad(xs, (0, pad_w, 0, pad_h), mode="replicate")
            sigmas = sigma.repeat(len(indices))
            conds = [per_row[r][i] for i in indices for r in range(rows)]
            items = CallItems.local([windows[i] for i in indices], rows,
                                   (pad_h, pad_w) if self.settings.window_mode == "shifted" else (0, 0))
            out = self._run(model, xs, sigmas, conds, rows, items)[..., :height, :width]
            for n, i in enumerate(indices):
                sl = windows[i].slices
                total[(..., *sl)] += out[n * rows:(n + 1) * rows]
                count[sl] += 1
        return total / count

    def _dilated(self, model: RowModel, x: torch.Tensor, sigma: torch.Tensor, row_conds: Sequence[C],
                 factors: StepFactors, step: int) -> torch.Tensor:
        s = self.stage.dilation
        x_blur = blur_restandardised(x, 2 * s - 1, self.settings.sigma * factors.c3)
        sub = gather_sublatents(x_blur, s, self.size_multiple)  # [R, K, C, h, w]
        rows, count = sub.shape[:2]
        perm = None
        if self.settings.window_interaction:
            perm = window_permutation(count, sub.shape[-2], sub.shape[-1],
                                      seeded_generator(self.seed, self.stage.index, step))
            sub = shuffle_sublatents(sub, perm)
        xs = sub.transpose(0, 1).reshape(count * rows, *sub.shape[2:])  # item = (k, row)
        conds = [row_conds[r] for _ in range(count) for r in range(rows)]
        out = self._run(model, xs, sigma.repeat(count), conds, rows, CallItems.dilated(count, rows, perm))
        out = out.reshape(count, rows, *sub.shape[2:]).transpose(0, 1)
        if perm is not None:
            out = unshuffle_sublatents(out, perm)
        denoised_blur = scatter_sublatents(out, s, tuple(x.shape[-2:]))
        detail = x - x_blur
        if self.skip_scale is not None:
            detail = detail * self.skip_scale(sigma).to(detail).reshape(-1, 1, 1, 1)
        return denoised_blur + detail


# --- tiled decode --------------------------------------------------------------------------------
def should_tile_decode(mode: str, latent_size: tuple[int, int], threshold: int = 128 * 128) -> bool:
    """auto: tiled once the latent exceeds 128×128 (1024² px), where a full VAE decode starts to
    need several GB."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return latent_size[0] * latent_size[1] > threshold


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    weight = torch.ones(length)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if fade_start:
            weight[:overlap] = torch.minimum(weight[:overlap], ramp)
        if fade_end:
            weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def tiled_decode(latent: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], tile: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """Decode [B, C, H, W] in overlapping latent tiles and blend them with linear ramps, so peak
    memory follows the tile, not the image. ``decode`` maps a latent tile to pixels."""
    h, w = latent.shape[-2:]
    tile = min(tile, max(h, w))
    overlap = min(overlap, tile // 2)
    windows = window_grid(h, w, (tile, tile), (tile - overlap, tile - overlap))
    out = weight_sum = None
    factor = None
    for win in windows:
        pixels = decode(latent[(..., *win.slices)])
        if out is None:
            factor = pixels.shape[-1] // win.width
            out = pixels.new_zeros(*pixels.shape[:2], h * factor, w * factor)
            weight_sum = pixels.new_zeros(h * factor, w * factor)
        f = factor
        wy = _ramp(win.height * f, overlap * f, win.top > 0, win.top + win.height < h)
        wx = _ramp(win.width * f, overlap * f, win.left > 0, win.left + win.width < w)
        weight = (wy[:, None] * wx[None, :]).to(pixels)
        ys = slice(win.top * f, (win.top + win.height) * f)
        xs = slice(win.left * f, (win.left + win.width) * f)
        out[..., ys, xs] += pixels * weight
        weight_sum[ys, xs] += weight
    return out / weight_sum


# --- prompt encoding cache -----------------------------------------------------------------------
class EncodeCache(Generic[C]):
    """Each distinct prompt is encoded once per job, however many tiles or stages use it; the
    missing ones of a request go to the encoder together."""

    def __init__(self, encode: Callable[[list[str]], Sequence[C]]):
        self._encode = encode
        self._cache: dict[str, C] = {}
        self.encodes = 0

    def get(self, prompts: Sequence[str]) -> list[C]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for prompt, cond in zip(missing, self._encode(missing)):
                self._cache[prompt] = cond
            self.encodes += len(missing)
        return [self._cache[p] for p in prompts]

    def clear(self) -> None:
        self._cache.clear()
