"""Shifted windows on a fine grain (issue 26) and the padding of windows the model cannot take as
they are (issue 25): the tests spy on the windows each step of a stage really hands the model.

At ``window_grain`` 1 the shifted grid's offset and cuts fall on any latent pixel, so almost
every window has a size the UNet cannot take (SD: multiples of 8): it is padded at the bottom and
right by edge replication, denoised and cropped back, and its ControlNet hint is padded with it by
whole f×f blocks. The models here look at what they are given, so padding on the wrong side or a
hint padded by its last pixel row shows in the result.
"""

from __future__ import annotations

import pytest
import torch

from accdiffusion.method.control import CallItems, StageHints, hint_rows_for, window_hint
from accdiffusion.method.dilated import seeded_generator
from accdiffusion.method.hires import SHIFT_KEY, Stage, StageDenoiser, stage_windows
from accdiffusion.method.settings import AccDiffusionSettings, FIELD_BY_NAME
from accdiffusion.method.tiles import Window, coverage, shift_offset, shifted_windows
from accdiffusion.entry.surfaces import settings_from_pasted

F = 8  # pixels per latent pixel
SD_MULTIPLE = 8  # an SD UNet takes latents whose sides are multiples of 8


def make_denoiser(size: tuple[int, int], base: tuple[int, int], grain: int, size_multiple: int = SD_MULTIPLE,
                  seed: int = 5) -> StageDenoiser:
    """A shifted stage with the local branch alone, so every model call is one of the step's windows."""
    settings = AccDiffusionSettings(enabled=True, window_mode="shifted", window_grain=grain, dilated_sampling=False,
                                    skip_residual=False, tile_batch_size=64)
    stage = Stage(1, 2.0, size, 2)
    return StageDenoiser(stage, stage_windows(stage, base, settings), settings, seed, lambda s: s * 100,
                         size_multiple=size_multiple)


class WindowSpy:
    """A row model that returns its input (denoised = x) and records, per call, the windows it was
    handed (``denoiser.items``) and its input."""

    def __init__(self, denoiser: StageDenoiser):
        self.denoiser = denoiser
        self.calls: list[tuple[CallItems, torch.Tensor]] = []

    def __call__(self, xs: torch.Tensor, sigmas: torch.Tensor, conds) -> torch.Tensor:
        assert self.denoiser.items is not None
        self.calls.append((self.denoiser.items, xs.clone()))
        return xs.clone()


def run_steps(denoiser: StageDenoiser, x: torch.Tensor, steps: int) -> tuple[WindowSpy, list[list[Window]], list]:
    """Call the denoiser at ``steps`` noise levels; the windows the model got in each step, and the
    fused outputs."""
    spy = WindowSpy(denoiser)
    per_step, outs = [], []
    for k in range(steps):
        before = len(spy.calls)
        outs.append(denoiser(spy, x, torch.full((x.shape[0],), 10.0 - k * 0.01), [None] * x.shape[0]))
        per_step.append([w for items, _ in spy.calls[before:] for w in dict.fromkeys(items.slots)])
    return spy, per_step, outs


def cut_residues(windows: list[Window], pitch: tuple[int, int]) -> tuple[set[int], set[int]]:
    """Where the grid's inner cuts fall, modulo the pitch, per axis."""
    return ({w.top % pitch[0] for w in windows if w.top}, {w.left % pitch[1] for w in windows if w.left})


# --- issue 26: the windows of each step ---------------------------------------------------------
def test_one_pixel_offsets_reach_every_position_over_the_steps():
    """With grain 1 the grid's cuts land, over the steps, on every position within the pitch (so
    no seam stays on a fixed row); on the size-multiple grain (the old schedule) only on
    multiples of 8."""
    size, base = (48, 40), (16, 16)  # 3 × 3 windows, pitch 16 × 13.3
    denoiser = make_denoiser(size, base, grain=1)
    _, per_step, _ = run_steps(denoiser, torch.randn(1, 2, *size), 120)
    rows, cols = set(), set()
    for windows in per_step:
        r, c = cut_residues(windows, (16, 16))
        rows |= r
        cols |= c
    assert rows == set(range(16))  # every row offset in the 16-row pitch
    assert {w.left for ws in per_step for w in ws if w.left} >= set(range(8, 33))  # every inner column
    old = make_denoiser(size, base, grain=0)
    _, old_steps, _ = run_steps(old, torch.randn(1, 2, *size), 30)
    assert {w.top % 8 for ws in old_steps for w in ws} == {0}  # the shipped grain: multiples of 8 only


@pytest.mark.parametrize("size,base", [((48, 40), (16, 16)), ((37, 29), (16, 16)), ((50, 50), (16, 16))])
def test_every_latent_pixel_is_covered_exactly_once_per_step(size, base):
    denoiser = make_denoiser(size, base, grain=1)
    _, per_step, _ = run_steps(denoiser, torch.randn(1, 2, *size), 24)
    n = -(-size[0] // base[0]) * -(-size[1] // base[1])
    for windows in per_step:
        assert torch.equal(coverage(*size, windows), torch.ones(size))
        assert len(windows) == n  # s² evaluations per row and step, as on the coarse grain
    assert len({tuple(ws) for ws in per_step}) > 12  # and the windows did move


@pytest.mark.parametrize("grain,size_multiple,size", [(1, SD_MULTIPLE, (48, 40)), (1, SD_MULTIPLE, (37, 29)),
                                                      (0, SD_MULTIPLE, (37, 29)), (1, 2, (33, 31))])
def test_padded_windows_crop_back_to_the_same_pixels(grain, size_multiple, size):
    """Each window reaches the model padded to the size multiple at the bottom and right, by
    repeating its last row and column, and the output is cropped back from the top left: a model
    that returns its input gives back the latent exactly. Padded on the other side (and still
    cropped from the top left) the window's content would come back shifted by the pad."""
    denoiser = make_denoiser(size, (16, 16), grain, size_multiple)
    x = torch.randn(2, 3, *size)
    spy, _, outs = run_steps(denoiser, x, 6)
    for out in outs:
        assert torch.equal(out, x)
    padded = 0
    for items, xs in spy.calls:
        assert xs.shape[-2] % size_multiple == 0 and xs.shape[-1] % size_multiple == 0
        for n, (win, row) in enumerate(zip(items.slots, items.rows)):
            given = xs[n]
            assert torch.equal(given[:, :win.height, :win.width], x[(row, slice(None), *win.slices)])
            # the pad replicates the window's own last row / column (not the latent's next pixels)
            assert torch.equal(given[:, win.height:, :win.width],
                               given[:, win.height - 1:win.height, :win.width].expand(-1, items.pad[0], -1))
            assert torch.equal(given[:, :, win.width:], given[:, :, win.width - 1:win.width].expand(-1, -1, items.pad[1]))
            padded += any(items.pad)
    assert padded  # padded windows were exercised


# --- issue 25: the hints of padded windows ------------------------------------------------------
def pixel_hint(h: int, w: int) -> torch.Tensor:
    """[1, 2, f·h, f·w] with a different value at every pixel (not constant inside a block), so
    a hint padded by its last pixel row differs from one padded by its last block row."""
    return torch.arange(2 * h * F * w * F, dtype=torch.float32).reshape(1, 2, h * F, w * F)


def block_padded(crop: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """The crop with its last f-pixel block row repeated pad[0] times and then its last block
    column pad[1] times: the pixels under an edge-replicated latent."""
    crop = torch.cat([crop] + [crop[..., -F:, :]] * pad[0], -2)
    return torch.cat([crop] + [crop[..., -F:]] * pad[1], -1)


class HintCheck:
    """A row model that checks each window's hint against the window's crop padded by whole blocks."""

    def __init__(self, denoiser: StageDenoiser, hints: StageHints, full: torch.Tensor):
        self.denoiser, self.hints, self.full = denoiser, hints, full
        self.pads: set[tuple[int, int]] = set()

    def __call__(self, xs, sigmas, conds):
        items = self.denoiser.items
        got = self.hints.for_call(items, hint_rows_for(1, 1))
        assert got.shape[-2:] == (xs.shape[-2] * F, xs.shape[-1] * F)
        for n, win in enumerate(items.slots):
            assert torch.equal(got[n], block_padded(window_hint(self.full, win, F)[0], items.pad))
        self.pads.add(items.pad)
        return xs


def test_padded_window_hints_repeat_whole_blocks():
    size = (37, 29)
    denoiser = make_denoiser(size, (16, 16), grain=1)
    full = pixel_hint(*size)
    model = HintCheck(denoiser, StageHints(full, size, denoiser.windows, 2, SD_MULTIPLE), full)
    for k in range(8):
        denoiser(model, torch.randn(1, 2, *size), torch.full((1,), 9.0 - k), [None])
    assert any(min(p) >= 2 for p in model.pads)  # pads of several blocks on both sides were exercised


# --- issue 26: images made before the grain existed replay ---------------------------------------
def old_schedule_windows(size: tuple[int, int], window: tuple[int, int], seed: int, step: int,
                         size_multiple: int) -> list[Window]:
    """The shifted windows as they were computed before the grain setting existed."""
    offset = shift_offset(window, seeded_generator(seed, 1, step, SHIFT_KEY), size_multiple)
    return shifted_windows(size, window, offset, size_multiple)


@pytest.mark.parametrize("size_multiple", [SD_MULTIPLE, 2])
def test_a_pasted_infotext_without_the_grain_replays_the_old_windows(size_multiple):
    old_infotext = {"AccDiffusion": "True", "AccDiffusion window mode": "shifted"}
    for settings in (AccDiffusionSettings.from_infotext(old_infotext), settings_from_pasted(old_infotext)):
        assert settings.window_grain == 0
        stage = Stage(1, 3.0, (60, 52), 3)
        denoiser = StageDenoiser(stage, stage_windows(stage, (20, 20), settings), settings, 11, lambda s: s,
                                 size_multiple=size_multiple)
        for step in range(10):
            assert denoiser.windows_at(step) == old_schedule_windows((60, 52), (20, 20), 11, step, size_multiple)
    # a new image names its grain, and pasting it gives that grain back
    new = AccDiffusionSettings(enabled=True, window_mode="shifted")
    assert new.window_grain == 1 and new.infotext_params()["AccDiffusion window grain"] == 1
    pasted = {k: str(v) for k, v in new.infotext_params().items()}
    assert AccDiffusionSettings.from_infotext(pasted) == new == settings_from_pasted(pasted)
    # the grain is written where it matters: overlap images keep their infotext as before
    assert "AccDiffusion window grain" not in new.replace(window_mode="overlap").infotext_params()
    # where nothing old is replayed — an overlap image, an image AccDiffusion did not make — a
    # pasted infotext without the key gives the default
    default = FIELD_BY_NAME["window_grain"].default
    for params in ({"AccDiffusion": "True"}, {"AccDiffusion": "True", "AccDiffusion window mode": "overlap"},
                   {"Steps": "20"}):
        assert settings_from_pasted(params).window_grain == default == 1
        assert AccDiffusionSettings.from_infotext(params).window_grain == default
