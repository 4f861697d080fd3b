import pytest
import torch

from accdiffusion.method.dilated import (blur_restandardised, gather_sublatents, invert_permutation,
                                         scatter_sublatents, seeded_generator, shuffle_sublatents,
                                         unshuffle_sublatents, window_permutation)
from accdiffusion.method.hires import (AccDiffusionError, Stage, StageDenoiser, dilation_for, plan_stages,
                                       stage_windows, tiled_decode)
from accdiffusion.method.schedule import cosine_factor, step_factors
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.tiles import coverage, map_windows, window_grid


@pytest.mark.parametrize("size,window,stride", [((96, 160), (64, 64), (32, 32)),
                                                ((200, 136), (64, 96), (32, 48)),
                                                ((64, 64), (64, 64), (32, 32)),
                                                ((100, 30), (48, 48), (24, 24))])
def test_windows_cover_every_pixel_and_end_flush(size, window, stride):
    windows = window_grid(*size, window, stride)
    assert bool((coverage(*size, windows) > 0).all())
    assert max(w.top + w.height for w in windows) == size[0]
    assert max(w.left + w.width for w in windows) == size[1]
    assert all(w.top + w.height <= size[0] and w.left + w.width <= size[1] for w in windows)
    tops = sorted({w.top for w in windows})
    assert all(b - a <= stride[0] for a, b in zip(tops, tops[1:]))


def test_jittered_windows_still_cover_and_are_seeded():
    grid = lambda seed: window_grid(200, 136, (64, 64), (32, 32), jitter=8,
                                    generator=torch.Generator().manual_seed(seed))
    assert grid(3) == grid(3)
    assert grid(3) != grid(4)
    assert bool((coverage(200, 136, grid(3)) > 0).all())


def test_pointwise_model_through_windows_equals_whole_call():
    x = torch.randn(2, 4, 96, 160)
    fn = lambda t: torch.tanh(t) * 3 + 1
    windows = window_grid(96, 160, (64, 64), (32, 32))
    assert torch.allclose(map_windows(fn, x, windows), fn(x), atol=1e-6)


@pytest.mark.parametrize("size,s,multiple", [((64, 64), 2, 1), ((37, 53), 3, 1), ((60, 90), 3, 8),
                                             ((200, 136), 4, 8)])
def test_gather_scatter_round_trip_is_exact(size, s, multiple):
    x = torch.randn(2, 4, *size)
    sub = gather_sublatents(x, s, multiple)
    assert sub.shape[1] == s * s and sub.shape[-1] % multiple == 0
    # sub-latent k = i*s + j holds x[..., i::s, j::s]
    i, j = 1, s - 1
    expected = x[..., i::s, j::s]
    assert torch.equal(sub[:, i * s + j, :, :expected.shape[-2], :expected.shape[-1]], expected)
    assert torch.equal(scatter_sublatents(sub, s, size), x)


def test_permutation_is_a_bijection_per_position_and_inverts_exactly():
    perm = window_permutation(9, 5, 7, seeded_generator(1, 2, 3))
    assert torch.equal(perm.sort(0).values, torch.arange(9).view(9, 1, 1).expand(9, 5, 7))
    assert torch.equal(invert_permutation(invert_permutation(perm)), perm)
    sub = torch.randn(2, 9, 4, 5, 7)
    shuffled = shuffle_sublatents(sub, perm)
    assert not torch.equal(shuffled, sub)
    assert torch.equal(shuffled[0, 3, :, 2, 4], sub[0, perm[3, 2, 4], :, 2, 4])
    assert torch.equal(unshuffle_sublatents(shuffled, perm), sub)


def test_permutations_follow_seed_stage_and_step():
    draw = lambda *keys: window_permutation(4, 8, 8, seeded_generator(*keys))
    assert torch.equal(draw(5, 1, 0), draw(5, 1, 0))
    assert not torch.equal(draw(5, 1, 0), draw(5, 1, 1))
    assert not torch.equal(draw(5, 1, 0), draw(6, 1, 0))


def test_blur_keeps_mean_and_std():
    x = torch.randn(2, 4, 32, 48) * 2 + 0.5
    y = blur_restandardised(x, 5, 1.0)
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)
    assert torch.allclose(y.std((1, 2, 3)), x.std((1, 2, 3)), atol=1e-5)
    assert not torch.allclose(y, x)
    assert torch.equal(blur_restandardised(x, 5, 0.0), x)


def test_cosine_schedule_endpoints_and_factors():
    assert cosine_factor(1000) == pytest.approx(1.0)
    assert cosine_factor(0) == pytest.approx(0.0)
    assert cosine_factor(500) == pytest.approx(0.5)
    f = step_factors(500, 3, 1, 1)
    assert (f.c1, f.c2, f.c3) == pytest.approx((0.125, 0.5, 0.99 * 0.5 + 0.01))


def test_cosine_factor_uses_kdiffusion_timestep(sd1_host):
    sigmas = sd1_host.denoiser.get_sigmas(10)
    t = sd1_host.sigma_to_t(sigmas[:1])
    assert float(t) == pytest.approx(999, abs=1e-3)
    den = StageDenoiser(Stage(1, 2.0, (8, 8), 2), [], AccDiffusionSettings(), 0, sd1_host.sigma_to_t)
    assert den.factors(sigmas[0]).cf == pytest.approx(cosine_factor(999))
    assert den.factors(sigmas[5]).cf < 0.8


@pytest.mark.parametrize("target,progressive,scales,dilations", [
    ((128, 128), True, [2.0], [2]),
    ((192, 192), True, [2.0, 3.0], [2, 3]),
    ((256, 256), True, [2.0, 3.0, 4.0], [2, 3, 4]),
    ((96, 96), True, [1.5], [2]),
    ((160, 160), True, [2.0, 2.5], [2, 3]),
    ((256, 256), False, [4.0], [4]),
])
def test_stage_plan(target, progressive, scales, dilations):
    stages = plan_stages((64, 64), target, progressive)
    assert [s.scale for s in stages] == scales
    assert [s.dilation for s in stages] == dilations
    assert stages[-1].size == target
    assert [s.index for s in stages] == list(range(1, len(stages) + 1))


def test_stage_plan_non_square_and_errors():
    stages = plan_stages((40, 64), (120, 192), True)
    assert [s.size for s in stages] == [(80, 128), (120, 192)]
    with pytest.raises(AccDiffusionError, match="larger than the first pass"):
        plan_stages((64, 64), (64, 64))
    assert dilation_for(2.2) == 2 and dilation_for(2.3) == 3


def test_stage_windows_default_to_base_size_and_half_stride():
    stage = plan_stages((40, 64), (80, 128))[0]
    windows = stage_windows(stage, (40, 64), AccDiffusionSettings())
    assert {(w.height, w.width) for w in windows} == {(40, 64)}
    assert len(windows) == 9  # (2s - 1)^2 at s = 2
    windows = stage_windows(stage, (40, 64), AccDiffusionSettings(window_size=32, stride=16))
    assert {(w.height, w.width) for w in windows} == {(32, 32)}


def _pointwise(x, sigma, conds):
    # a per-pixel "denoiser" that ignores context: windowing must not change its result
    return x * 0.5 + torch.tanh(x) * 0.25


@pytest.mark.parametrize("size,interaction", [((80, 128), True), ((75, 121), True), ((80, 128), False)])
def test_pointwise_model_through_the_full_denoiser_equals_whole_call(size, interaction):
    base = (40, 64)
    stage = plan_stages(base, size)[0]
    settings = AccDiffusionSettings(sigma=0.0, window_interaction=interaction, tile_batch_size=3, window_mode="overlap")
    windows = stage_windows(stage, base, settings)
    den = StageDenoiser(stage, windows, settings, 7, lambda s: s * 0 + 500)
    x = torch.randn(2, 4, *size)
    out = den(_pointwise, x, torch.tensor([1.0, 1.0]), ["c", "u"])
    assert torch.allclose(out, _pointwise(x, None, None), atol=1e-5)
    assert den.stats.unet_calls == 3 + 2 and den.stats.window_evals == (9 + 4) * 2


def test_denoiser_routes_tile_conditioning_to_its_window():
    base = (16, 16)
    stage = plan_stages(base, (32, 32))[0]
    settings = AccDiffusionSettings(dilated_sampling=False, tile_batch_size=2, window_mode="overlap")
    windows = stage_windows(stage, base, settings)
    seen = []

    def model(x, sigma, conds):
        seen.extend(zip(conds, x[:, 0, 0, 0].tolist()))
        return x

    x = torch.zeros(2, 4, 32, 32)
    for i, w in enumerate(windows):
        x[0, 0, w.top, w.left] = i  # the top-left pixel of window i identifies it (row 0 only)
    den = StageDenoiser(stage, windows, settings, 0, lambda s: s * 0 + 500)
    den(model, x, torch.tensor([1.0, 1.0]), ["full", "negative"],
        [[f"tile{i}" for i in range(len(windows))], None])
    cond_rows = [(c, v) for c, v in seen if c.startswith("tile")]
    assert sorted(c for c, _ in cond_rows) == sorted(f"tile{i}" for i in range(len(windows)))
    assert all(c == f"tile{int(v)}" for c, v in cond_rows if v > 0)
    assert sum(c == "negative" for c, _ in seen) == len(windows)


def test_skip_residual_changes_the_samplers_tensor_in_place():
    stage = Stage(1, 2.0, (8, 8), 2)
    ref, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    settings = AccDiffusionSettings(cosine_scale_1=0.0)  # c1 = 1: x becomes the re-noised reference
    den = StageDenoiser(stage, [], settings, 0, lambda s: s * 0 + 999, reference=ref, noise=noise)
    x = torch.randn(1, 4, 8, 8)
    same = den.skip_residual_(x, torch.tensor([2.0]))
    assert same is x and torch.allclose(x, ref + 2.0 * noise)
    off = StageDenoiser(stage, [], settings.replace(skip_residual=False), 0, lambda s: s * 0 + 999,
                        reference=ref, noise=noise)
    y = torch.randn(1, 4, 8, 8)
    before = y.clone()
    off.skip_residual_(y, torch.tensor([2.0]))
    assert torch.equal(y, before)


@pytest.mark.parametrize("size", [(40, 56), (130, 70)])
def test_tiled_decode_matches_full_decode_for_a_local_decoder(size):
    latent = torch.randn(1, 4, *size)
    decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")
    tiled = tiled_decode(latent, decode, tile=32, overlap=8)
    assert tiled.shape == (1, 3, size[0] * 8, size[1] * 8)
    assert torch.allclose(tiled, decode(latent), atol=1e-5)
