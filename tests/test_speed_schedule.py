"""Shifted windows, skipped branches and the automatic tile batch (issue 11)."""

import random

import pytest
import torch

from accdiffusion.method.batching import (CPU_TILE_BATCH, MARGIN_BYTES, MARGIN_FRACTION, AutoTileBatch,
                                          fit_tile_batch, resolve_tile_batch)
from accdiffusion.method.hires import StageDenoiser, plan_stages, stage_windows
from accdiffusion.method.prompts import ImagePromptPlan
from accdiffusion.lab.reference import first_pass, hires_pass
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.tileprompts import StageTilePrompts, WindowConditioning
from accdiffusion.method.tiles import coverage, shifted_axis, window_grid
from accdiffusion.method.words import split_words

SHIFTED = AccDiffusionSettings(window_mode="shifted")


def _denoiser(size, base, settings=SHIFTED, seed=0, **kw):
    stage = plan_stages(base, size)[-1]
    return StageDenoiser(stage, stage_windows(stage, base, settings), settings, seed, lambda s: s * 0 + 500, **kw)


@pytest.mark.parametrize("size,base", [((64, 64), (16, 16)), ((48, 80), (16, 16)), ((75, 121), (40, 64)),
                                       ((40, 40), (16, 16))])
def test_shifted_windows_cover_every_pixel_exactly_once_every_step(size, base):
    den = _denoiser(size, base)
    per_step = [den.windows_at(step) for step in range(12)]
    for windows in per_step:
        assert torch.equal(coverage(*size, windows), torch.ones(size))
        n_h, n_w = -(-size[0] // den.window_size[0]), -(-size[1] // den.window_size[1])
        assert len(windows) == n_h * n_w  # s² windows, not (2s − 1)²
        assert all(w.height <= 1.5 * den.window_size[0] + 8 and w.width <= 1.5 * den.window_size[1] + 8
                   for w in windows)
    assert len({tuple(w) for w in per_step}) > 1  # the seams move


@pytest.mark.parametrize("offset", range(0, 70, 7))
def test_shifted_axis_pieces_are_contiguous_and_count_fixed(offset):
    for length, window in ((128, 64), (75, 40), (160, 64), (33, 16)):
        pieces = shifted_axis(length, window, offset, align=8)
        assert pieces[0][0] == 0 and sum(p[1] for p in pieces) == length
        assert all(a[0] + a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert len(pieces) == -(-length // window)


def test_offsets_are_seeded_and_reproducible():
    a, b, c = (_denoiser((64, 64), (16, 16), seed=s) for s in (3, 3, 4))
    steps = range(10)
    assert [a.windows_at(i) for i in steps] == [b.windows_at(i) for i in steps]
    assert [a.windows_at(i) for i in steps] != [c.windows_at(i) for i in steps]
    # all calls of one step (cond/uncond split, AND prompts) share the step's windows
    assert a.windows_at(a.step_index(torch.tensor(3.0))) is a.windows_at(a.step_index(torch.tensor(3.0)))
    # overlap mode keeps the fixed grid
    o = _denoiser((64, 64), (16, 16), AccDiffusionSettings(window_mode="overlap"))
    assert o.windows_at(0) is o.windows and o.windows_at(5) is o.windows


def _position_latent(size):
    h, w = size
    x = torch.zeros(2, 4, h, w)
    x[:, 0] = torch.arange(h * w, dtype=torch.float32).view(h, w)  # each pixel names itself
    return x


def test_tile_conditioning_follows_the_shifted_windows():
    size = (48, 48)
    settings = SHIFTED.replace(dilated_sampling=False, tile_batch_size=3)
    den = _denoiser(size, (16, 16), settings, seed=1)
    seen = []

    def model(x, sigma, conds):
        for item, cond in zip(x, conds):
            start = int(item[0, 0, 0])
            seen.append((cond, start // size[1], start % size[1], tuple(item.shape[-2:])))
        return x

    lookup = lambda win: f"tile {win.top},{win.left},{win.height},{win.width}"
    for step, sigma in enumerate((3.0, 2.0, 1.0)):
        seen.clear()
        den(model, _position_latent(size), torch.tensor([sigma, sigma]), ["full", "negative"], [lookup, None])
        windows = den.windows_at(step)
        tiles = [s for s in seen if s[0].startswith("tile")]
        assert sorted(c for c, *_ in tiles) == sorted(lookup(w) for w in windows)
        for cond, top, left, shape in tiles:  # the conditioning reached the window it was made for
            height, width = (int(v) for v in cond.split(",")[2:])
            assert cond.startswith(f"tile {top},{left},")
            # (given padded to the UNet's multiple of 8 where the 1-px grain cut it otherwise)
            assert shape == (-(-height // 8) * 8, -(-width // 8) * 8)
        assert sum(c == "negative" for c, *_ in seen) == len(windows)


def test_overlap_list_tile_conds_still_route_and_fall_back_in_shifted_mode():
    size = (32, 32)
    den = _denoiser(size, (16, 16), SHIFTED.replace(dilated_sampling=False))
    conds = [f"tile{i}" for i in range(len(den.windows))]
    seen = []
    den(lambda x, s, c: seen.extend(c) or x, torch.randn(1, 4, *size), torch.tensor([1.0]), ["full"], [conds])
    assert set(seen) <= set(conds) and len(seen) == len(den.windows_at(0))


def _plan():
    prompt = "a cat and a dog on grass"
    words = split_words(prompt)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(77, 8, 8, generator=g)
    maps[2, :4] += 2.0  # "cat" on top, "dog" at the bottom
    maps[5, 4:] += 2.0
    positions = [[i + 1] for i in range(len(words))]
    return ImagePromptPlan.build(words, positions, maps, prompt, words)


def test_stage_tile_prompts_match_the_plan_for_any_window():
    plan = _plan()
    lookup = StageTilePrompts(plan, (48, 48), 0.3)
    den = _denoiser((48, 48), (16, 16))
    windows = [w for step in range(6) for w in den.windows_at(step)] + window_grid(48, 48, (16, 16), (8, 8))
    assert [lookup(w) for w in windows] == plan.tile_prompts((48, 48), windows, 0.3)
    assert len({lookup(w) for w in windows}) > 1  # the masks make a difference
    encoded = []
    cond = WindowConditioning(lookup, lambda ps: encoded.extend(ps) or [f"enc:{p}" for p in ps])
    assert cond(windows[0]) == f"enc:{lookup(windows[0])}"


def test_reference_host_shifted_mode_end_to_end(sd1_host):
    prompt = "a red-haired astronaut riding a horse on the moon"
    latent, recorder = first_pass(sd1_host, [prompt], "", (16, 16), 2, seed=1)
    settings = AccDiffusionSettings(enabled=True, window_mode="shifted", tile_batch_size=2)
    steps = 3
    result = hires_pass(sd1_host, latent, [prompt], "", recorder, settings, (48, 48), steps, 0.5, 1)
    assert bool(torch.isfinite(result.latent).all())
    seen_prompts = set()
    for stage, stats, windows, prompts, encodes in zip(result.stages, result.stage_stats, result.stage_windows,
                                                        result.tile_prompts, result.stage_encodes):
        s = stage.dilation
        assert stats.window_evals + stats.skipped_evals == (s * s + s * s) * steps * 2
        # every window used got its own prompt, and each distinct prompt was encoded once per job
        assert len(windows[0]) == len(prompts[0]) >= s * s
        new = set(prompts[0]) - seen_prompts - {prompt, ""}
        assert encodes == len(new)
        seen_prompts |= set(prompts[0])


def test_skipped_branch_never_has_a_weight_that_matters():
    size = (32, 32)
    eps = 0.01
    den = StageDenoiser(plan_stages((16, 16), size)[0], window_grid(32, 32, (16, 16), (8, 8)),
                        AccDiffusionSettings(sigma=0.0), 0, lambda s: s, branch_epsilon=eps)
    exact = StageDenoiser(den.stage, den.windows, den.settings, 0, lambda s: s, branch_epsilon=0.0)
    ran = []
    g = torch.Generator().manual_seed(0)
    bias = {"tile": torch.randn(4, 1, 1, generator=g), "full": torch.randn(4, 1, 1, generator=g)}

    def model(x, sigma, conds):
        ran.extend(conds)
        return torch.tanh(x) + torch.stack([bias[c] for c in conds])

    x = torch.randn(1, 4, *size, generator=g)
    skipped = 0
    for t in [0.0, 1.0, 5.0, 20.0, 60.0, 64.0, 70.0, 300.0, 500.0, 900.0, 936.0, 970.0, 999.0, 1000.0]:
        ran.clear()
        c2 = den.factors(torch.tensor(t)).c2
        fused = den(model, x, torch.tensor([t]), ["full"], [lambda w: "tile"])
        local_ran, dilated_ran = "tile" in ran, ran.count("full") > 0
        assert local_ran or dilated_ran
        if c2 >= eps:
            assert dilated_ran, t
        if 1 - c2 >= eps:
            assert local_ran, t
        skipped += (not local_ran) + (not dilated_ran)
        # the documented bound: |fused − exact| ≤ ε·|local − dilated|
        sigma = torch.tensor([t])
        factors = exact.factors(sigma)
        local = exact._local(model, x, sigma, ["full"], [lambda w: "tile"])
        dilated = exact._dilated(model, x, sigma, ["full"], factors, exact.step_index(sigma))
        full = torch.lerp(local, dilated, factors.c2)
        assert bool(((fused - full).abs() <= eps * (local - dilated).abs() + 1e-5).all()), t
    assert skipped >= 3  # late (c2 < ε) and, at t ≈ 1000, the local branch
    assert den.stats.skipped_dilated_evals > 0 and den.stats.skipped_local_evals > 0


def test_fit_tile_batch_never_exceeds_what_fits():
    rng = random.Random(0)
    for _ in range(2000):
        free = rng.randint(0, 80 * 2**30)
        cost = rng.randint(1, 8 * 2**30)
        b = fit_tile_batch(free, cost)
        assert 1 <= b <= 64
        budget = free * (1 - MARGIN_FRACTION) - MARGIN_BYTES
        assert b == 1 or b * cost <= budget
        assert b == 64 or (b + 1) * cost > budget  # and it is the largest that does


class _FakeMemory:
    """Stand-in device memory: a fixed free amount and a fixed cost per window row."""

    def __init__(self, free, per_row):
        self.free, self.per_row, self.measured = free, per_row, []

    def auto(self):
        def peak_of(run, device):
            out = run()
            self.measured.append(tuple(out.shape))
            return out, self.per_row * out.shape[0] * out.shape[-1] * out.shape[-2]

        return AutoTileBatch(free_bytes=lambda d: self.free, peak_of=peak_of, applies=lambda d: True)


def test_automatic_batch_in_the_denoiser_fits_the_stand_in_memory():
    mem = _FakeMemory(free=3 * 2**30, per_row=2**20)  # 1 MiB per latent pixel row: 256 MiB per 16² row
    den = _denoiser((48, 48), (16, 16), AccDiffusionSettings(tile_batch_size=0, window_mode="overlap"), auto_batch=mem.auto())
    calls = []
    den(lambda x, s, c: calls.append(x.shape[0]) or x, torch.randn(2, 4, 48, 48), torch.tensor([500.0] * 2),
        ["c", "u"])
    window_cost = 2 * 16 * 16 * 2**20  # one window = its two CFG rows
    chosen = fit_tile_batch(mem.free, window_cost)
    assert 1 < chosen < 25 and den.stats.tile_batch == chosen
    assert max(calls) == 2 * chosen and chosen * window_cost <= mem.free * (1 - MARGIN_FRACTION) - MARGIN_BYTES
    assert len(mem.measured) == 1  # local windows and sub-latents share a shape here: measured once
    assert resolve_tile_batch(AccDiffusionSettings(tile_batch_size=5), "cuda") == 5
    assert resolve_tile_batch(AccDiffusionSettings(), "cpu") == CPU_TILE_BATCH
    # no stand-in: the CPU path uses the fixed small batch
    cpu = _denoiser((48, 48), (16, 16), AccDiffusionSettings(tile_batch_size=0, dilated_sampling=False, window_mode="overlap"))
    calls.clear()
    cpu(lambda x, s, c: calls.append(x.shape[0]) or x, torch.randn(1, 4, 48, 48), torch.tensor([500.0]), ["c"])
    assert max(calls) == CPU_TILE_BATCH and cpu.stats.tile_batch == CPU_TILE_BATCH
