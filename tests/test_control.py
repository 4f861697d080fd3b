"""Control hints in the tiled pass, engine side: every local window and every dilated item gets
exactly the pixels under it, cut once per stage and window.

The hints are position-coded: the 8×8 pixel block over latent position (y, x) holds the id y·W + x
(and a second channel 1000 + id), so a block's mean says which latent position it came from. A
"control-only" model returns, per item, the block means of the hint it got: the fused denoised
latent then equals the id map exactly when every window and every dilated item (shuffled,
padded) got its own crop, and differs anywhere one got another's.
"""

from __future__ import annotations

import pytest
import torch

from accdiffusion.method.control import (CallItems, StageHints, gather_subhints, hint_rows_for, shuffle_subhints,
                                         window_hint)
from accdiffusion.method.dilated import gather_sublatents, seeded_generator, shuffle_sublatents, window_permutation
from accdiffusion.method.hires import Stage, StageDenoiser
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.tiles import window_grid

F = 8


def position_ids(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)


def position_hint(h: int, w: int, batch: int = 1) -> torch.Tensor:
    """[batch, 2, 8h, 8w]: channel 0 the latent position id (+ 10000·image), channel 1 1000 + id."""
    ids = position_ids(h, w).repeat_interleave(F, 2).repeat_interleave(F, 3)
    hints = [torch.cat([ids + 10000 * b, ids + 1000 + 10000 * b], 1) for b in range(batch)]
    return torch.cat(hints)


def block_means(hint: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(hint, F)


def test_window_crop_is_the_windows_pixels():
    h, w = 12, 20
    hint = position_hint(h, w)
    for win in window_grid(h, w, (8, 8), (4, 4)):
        crop = window_hint(hint, win, F)
        assert crop.shape[-2:] == (win.height * F, win.width * F)
        assert torch.equal(block_means(crop)[:, :1], position_ids(h, w)[(..., *win.slices)])


@pytest.mark.parametrize("size,s,multiple", [((12, 16), 2, 1), ((13, 10), 2, 4), ((17, 11), 3, 2)])
def test_dilated_subhints_move_like_the_sublatents(size, s, multiple):
    """Strided, padded (whole blocks replicated) and shuffled exactly like the sub-latents."""
    h, w = size
    ids = position_ids(h, w)
    sub_ids = gather_sublatents(ids, s, multiple)  # [1, s², 1, h', w']
    sub_hint = gather_subhints(position_hint(h, w), size, s, multiple)
    assert sub_hint.shape[-2:] == (sub_ids.shape[-2] * F, sub_ids.shape[-1] * F)
    assert torch.equal(block_means(sub_hint[0])[:, :1], sub_ids[0])
    assert torch.equal(block_means(sub_hint[0])[:, 1:], sub_ids[0] + 1000)
    perm = window_permutation(s * s, sub_ids.shape[-2], sub_ids.shape[-1], seeded_generator(3, 1, 0))
    shuffled_ids = shuffle_sublatents(sub_ids, perm)
    assert torch.equal(block_means(shuffle_subhints(sub_hint, perm)[0])[:, :1], shuffled_ids[0])
    assert not torch.equal(shuffled_ids, sub_ids)  # the check above is not vacuous


def test_hint_at_another_size_is_resized_to_the_stage():
    stage_hints = StageHints(torch.rand(1, 3, 64, 96), (16, 24), window_grid(16, 24, (8, 8), (4, 4)), 2)
    assert stage_hints.hint.shape[-2:] == (128, 192)
    same = torch.rand(1, 3, 128, 192)
    assert StageHints(same, (16, 24), [], 2).hint is same  # the last stage cuts the hint as made


def test_hint_rows():
    assert hint_rows_for(1, 4) == [0, 0, 0, 0]
    assert hint_rows_for(4, 4) == [0, 1, 2, 3]
    assert hint_rows_for(2, 4, images_per_chunk=2) == [0, 1, 0, 1]
    assert hint_rows_for(3, 4) is None


# --- through the denoiser -------------------------------------------------------------------------
class ControlOnly:
    """A row model whose output is the hint it is given (block means): what a ControlNet-only
    model would paint. ``cut`` turns the denoiser's items into hints, as a host adapter does."""

    def __init__(self, denoiser: StageDenoiser, hints: StageHints, rows: int, hint_rows=None):
        self.denoiser, self.hints, self.rows = denoiser, hints, rows
        self.hint_rows = hint_rows or hint_rows_for(hints.batch, rows)
        self.calls: list[CallItems] = []

    def __call__(self, xs, sigmas, conds):
        items = self.denoiser.items
        assert items is not None and len(items) == xs.shape[0] == len(conds)
        self.calls.append(items)
        hint = self.hints.for_call(items, self.hint_rows)
        assert hint.shape[-2:] == (xs.shape[-2] * F, xs.shape[-1] * F)
        return block_means(hint)


def make_denoiser(size, windows, dilation=2, **settings) -> StageDenoiser:
    settings = AccDiffusionSettings(enabled=True, sigma=0.0, skip_residual=False, **settings)
    stage = Stage(1, 2.0, size, dilation)
    return StageDenoiser(stage, windows, settings, seed=7, sigma_to_t=lambda s: s * 100, size_multiple=4)


@pytest.mark.parametrize("size,window,dilation", [((16, 24), (8, 8), 2), ((13, 10), (8, 8), 2),
                                                  ((18, 18), (12, 12), 3)])
def test_every_window_and_dilated_item_gets_its_own_crop(size, window, dilation):
    windows = window_grid(*size, window, (window[0] // 2, window[1] // 2))
    rows = 3  # e.g. cond, cond, uncond of a batch of two
    denoiser = make_denoiser(size, windows, dilation)
    hint = position_hint(*size, batch=rows)
    model = ControlOnly(denoiser, StageHints(hint, size, windows, dilation, size_multiple=4), rows)
    x = torch.randn(rows, 2, *size)
    for sigma in (5.0, 3.0):  # two steps: two different permutations
        for branch in ("local", "dilated"):
            out = (denoiser._local(model, x, torch.full((rows,), sigma), [None] * rows, [None] * rows)
                   if branch == "local" else
                   denoiser._dilated(model, x, torch.full((rows,), sigma), [None] * rows,
                                     denoiser.factors(sigma), denoiser.step_index(sigma)))
            assert torch.equal(out, block_means(hint)), branch
    assert {c.kind for c in model.calls} == {"local", "dilated"}
    assert any(c.perm is not None for c in model.calls)
    # cut once per stage and window (and one gather for the dilated branch), not per step
    assert model.hints.cuts == len(windows) + 1


def test_fused_call_with_two_images_and_their_own_hints():
    size, windows = (16, 16), window_grid(16, 16, (8, 8), (4, 4))
    denoiser = make_denoiser(size, windows, tile_batch_size=3)
    hint = position_hint(*size, batch=2)
    model = ControlOnly(denoiser, StageHints(hint, size, windows, 2), 4, hint_rows=[0, 1, 0, 1])
    out = denoiser(model, torch.randn(4, 2, *size), torch.full((4,), 2.0), [None] * 4)
    expected = block_means(hint)[[0, 1, 0, 1]]
    assert torch.equal(out, expected)
    assert denoiser.items is None  # only set while a call runs


@pytest.mark.parametrize("bug", ["not shuffled", "window off by one", "no padding"])
def test_plausible_bugs_are_caught(bug, monkeypatch):
    """The checks above fail for the mistakes one would make (kept as a regression net)."""
    import accdiffusion.method.control as control

    size, windows = (13, 10), window_grid(13, 10, (8, 8), (4, 4))
    if bug == "not shuffled":
        monkeypatch.setattr(control, "shuffle_subhints", lambda sub, perm: sub)
    elif bug == "window off by one":
        original = StageHints.window
        monkeypatch.setattr(StageHints, "window", lambda self, win, pad=(0, 0):
                            original(self, self.windows[(self.windows.index(win) + 1) % len(self.windows)], pad))
    else:
        original_gather = control.gather_subhints
        monkeypatch.setattr(control, "gather_subhints",
                            lambda hint, size_, s, multiple=1: original_gather(hint, size_, s, 1))
    denoiser = make_denoiser(size, windows)
    hint = position_hint(*size)
    model = ControlOnly(denoiser, StageHints(hint, size, windows, 2, size_multiple=4), 1)
    x = torch.randn(1, 2, *size)
    try:
        local = denoiser._local(model, x, torch.full((1,), 2.0), [None], [None])
        dilated = denoiser._dilated(model, x, torch.full((1,), 2.0), [None], denoiser.factors(2.0),
                                    denoiser.step_index(2.0))
    except (AssertionError, RuntimeError):  # a wrong size fails loudly (the model check, a shape error)
        return
    assert not (torch.equal(local, block_means(hint)) and torch.equal(dilated, block_means(hint)))


def test_shifted_windows_get_their_own_crops_padded_like_the_latent():
    """window_mode "shifted": each step's windows move and edge windows are padded by edge
    replication to a size the UNet takes; the hint moves and pads with them."""
    size, windows = (18, 18), window_grid(18, 18, (8, 8), (4, 4))
    denoiser = make_denoiser(size, windows, window_mode="shifted", dilated_sampling=False)
    hint = position_hint(*size)
    model = ControlOnly(denoiser, StageHints(hint, size, windows, 2, size_multiple=4), 1)
    x = torch.randn(1, 2, *size)
    for sigma in (5.0, 4.0, 3.0, 2.0):
        assert torch.equal(denoiser(model, x, torch.full((1,), sigma), [None]), block_means(hint))
    assert any(any(c.pad) for c in model.calls)  # padded edge windows were exercised
    assert len({c.slots[0] for c in model.calls}) > len(windows) // 2  # and windows moved between steps


def test_padded_window_hint_repeats_the_last_block():
    hint = position_hint(4, 4)
    padded = block_means(StageHints(hint, (4, 4), [], 2).window(window_grid(4, 4, (2, 4), (2, 4))[1], (2, 0)))
    ids = position_ids(4, 4)[..., 2:4, :]
    assert torch.equal(padded[:, :1], torch.cat([ids, ids[..., -1:, :], ids[..., -1:, :]], -2))
