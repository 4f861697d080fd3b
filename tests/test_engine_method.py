"""The method inside the fused denoiser and the stage loop, pinned with models whose output is
known: constants per item kind, identity, zero, v-prediction with F ≡ 0, and spies on what each
call receives. Each test names the bug it catches."""

import pytest
import torch

import accdiffusion.lab.reference as reference
from accdiffusion.method.dilated import blur_restandardised, gather_sublatents
from accdiffusion.method.hires import (StageDenoiser, plan_stages, restandardise, stage_windows,
                                       tiled_decode, upscale_latent, v_prediction_c_skip)
from accdiffusion.method.schedule import step_factors
from accdiffusion.method.settings import AccDiffusionSettings

BASE = (16, 16)
T_HALF = lambda sigma: sigma * 0 + 500  # cf = ½ at every sigma


def stage_denoiser(settings, size=(32, 32), sigma_to_t=T_HALF, **kw):
    stage = plan_stages(BASE, size)[0]
    return StageDenoiser(stage, stage_windows(stage, BASE, settings), settings, 11, sigma_to_t, **kw)


def test_local_and_dilated_branches_are_mixed_by_c2():
    # tile items return 1, dilated items 5: the mix must be (1 − c2)·1 + c2·5 with c2 = ½² (not
    # ½, where swapping the two branches would not show)
    settings = AccDiffusionSettings(sigma=0.0, cosine_scale_2=2.0)
    den = stage_denoiser(settings)
    n_windows = len(den.windows)

    def model(x, sigma, conds):
        return torch.stack([torch.full(x.shape[1:], 1.0 if c == "tile" else 5.0) for c in conds])

    x = torch.randn(2, 4, 32, 32)
    out = den(model, x, torch.tensor([3.0, 3.0]), ["cond", "uncond"], [["tile"] * n_windows] * 2)
    c2 = step_factors(500, 3.0, 2.0, 1.0).c2
    assert c2 == pytest.approx(0.25)
    assert torch.allclose(out, torch.full_like(x, (1 - c2) * 1.0 + c2 * 5.0), atol=1e-6)
    off = stage_denoiser(settings.replace(dilated_sampling=False))
    out = off(model, x, torch.tensor([3.0, 3.0]), ["cond", "uncond"], [["tile"] * n_windows] * 2)
    assert torch.allclose(out, torch.ones_like(x))


def _dilated_only(**kw):
    # cosine_scale_2 = 0 ⇒ c2 = 1: the output is the dilated branch alone
    return AccDiffusionSettings(cosine_scale_2=0.0, **kw)


def _x_blur(x, settings, dilation=2):
    c3 = step_factors(500, settings.cosine_scale_1, settings.cosine_scale_2, settings.cosine_scale_3).c3
    return blur_restandardised(x, 2 * dilation - 1, settings.sigma * c3)


@pytest.mark.parametrize("interaction", [False, True])
def test_dilated_branch_denoises_the_blurred_latent_and_readds_the_detail(interaction):
    settings = _dilated_only(window_interaction=interaction)
    x = torch.randn(1, 4, 32, 32)
    x_blur = _x_blur(x, settings)
    assert not torch.allclose(x_blur, x, atol=1e-2)
    sigma = torch.tensor([2.0])
    # identity model: D(x_blur) + (x − x_blur) = x exactly
    assert torch.allclose(stage_denoiser(settings)(lambda x, s, c: x.clone(), x, sigma, ["c"]), x, atol=1e-5)
    # zero model: only the re-added detail x − x_blur is left
    out = stage_denoiser(settings)(lambda x, s, c: torch.zeros_like(x), x, sigma, ["c"])
    assert torch.allclose(out, x - x_blur, atol=1e-5)
    # and the model sees the blurred sub-latents (shuffled position-wise when interacting)
    seen = []

    def spy(xs, s, conds):
        seen.extend(item for item, c in zip(xs, conds) if c != "tile")
        return xs

    stage_denoiser(settings)(spy, x, sigma, ["c"], [["tile"] * 9])
    items, expected = torch.stack(seen), gather_sublatents(x_blur, 2)[0]
    if interaction:  # each position holds the 4 sub-latents' values in some order
        assert torch.allclose(items.sort(0).values, expected.sort(0).values, atol=1e-6)
        assert not torch.allclose(items, expected)
    else:
        assert torch.allclose(items, expected, atol=1e-6)


def test_window_interaction_permutation_is_new_each_step_and_shared_within_a_step():
    settings = AccDiffusionSettings(sigma=0.0)
    den = stage_denoiser(settings)
    n_windows = len(den.windows)
    x = torch.randn(1, 4, 32, 32)
    seen: list[torch.Tensor] = []

    def model(xs, sigma, conds):
        seen.extend(item for item, c in zip(xs, conds) if c != "tile")
        return xs

    def dilated_inputs(sigma, cond):
        seen.clear()
        den(model, x, torch.tensor([sigma]), [cond], [["tile"] * n_windows])
        return torch.stack(seen)

    cond_a, uncond_a = dilated_inputs(5.0, "cond"), dilated_inputs(5.0, "uncond")  # split CFG calls
    cond_b = dilated_inputs(3.0, "cond")  # the next step
    again_a = dilated_inputs(5.0, "cond")
    plain = gather_sublatents(x, 2)[0]
    assert torch.equal(cond_a, uncond_a) and torch.equal(cond_a, again_a)
    assert not torch.equal(cond_a, cond_b)
    assert not torch.equal(cond_a, plain) and not torch.equal(cond_b, plain)
    assert torch.equal(cond_a.sort(0).values, plain.sort(0).values)


# --- v-prediction ----------------------------------------------------------------------------------
def test_v_prediction_skip_term_applies_to_the_unblurred_latent():
    # a v-like model D(y) = c_skip·y + g(y) with a pointwise g: the dilated branch must give what
    # the model gives when the skip term sees x: c_skip·x + g(x_blur)
    settings = _dilated_only()
    sigma = torch.tensor([1.5, 1.5])
    c_skip = v_prediction_c_skip(sigma)[0]
    g = lambda y: 0.3 * torch.tanh(y)
    model = lambda y, s, c: v_prediction_c_skip(s).view(-1, 1, 1, 1) * y + g(y)
    x = torch.randn(2, 4, 32, 32)
    x_blur = _x_blur(x, settings)
    out = stage_denoiser(settings, skip_scale=v_prediction_c_skip)(model, x, sigma, ["c", "u"])
    assert torch.allclose(out, c_skip * x + g(x_blur), atol=1e-5)
    # the ε formula is off by (1 − c_skip)·(x − x_blur) on a v-model
    eps_formula = stage_denoiser(settings)(model, x, sigma, ["c", "u"])
    assert torch.allclose(eps_formula - out, (1 - c_skip) * (x - x_blur), atol=1e-5)


def _zero_output_host(tokenizer, v_prediction):
    unet = reference.build_unet("sd1", seed=4)
    with torch.no_grad():  # F ≡ 0: the denoised output is the skip term alone
        for p in unet.out[-1].parameters():
            p.zero_()
    return reference.Host(unet, tokenizer, v_prediction=v_prediction)


@pytest.mark.parametrize("v_prediction", [True, False])
def test_fused_denoiser_is_exact_for_v_and_eps_wrappers(tokenizer, v_prediction):
    # real ldm UNet with F ≡ 0 under k-diffusion's CompVisVDenoiser (v) or eps wrapper: every
    # branch must give c_skip·x (v) or x (ε) on every pixel
    host = _zero_output_host(tokenizer, v_prediction)
    settings = AccDiffusionSettings()
    sigma = host.denoiser.get_sigmas(10)[3].expand(2)
    conds = host.encode(["a cat", ""])
    x = torch.randn(2, 4, 32, 32) * float(sigma[0])
    assert host.skip_scale(sigma).shape == sigma.shape
    skip_scale = host.skip_scale if v_prediction else None
    den = stage_denoiser(settings, sigma_to_t=host.sigma_to_t, skip_scale=skip_scale)
    expected = host.skip_scale(sigma).view(-1, 1, 1, 1) * x
    assert torch.allclose(host.row_model(x, sigma, conds), expected, atol=1e-5)  # the premise
    with torch.no_grad():
        out = den(host.row_model, x, sigma, conds)
    assert 0.0 < den.factors(sigma[0]).c2 < 1.0
    assert torch.allclose(out, expected, atol=1e-5)
    if v_prediction:  # without the scale (the ε formula) a v-model is off
        with torch.no_grad():
            eps_formula = stage_denoiser(settings, sigma_to_t=host.sigma_to_t)(host.row_model, x, sigma, conds)
        assert not torch.allclose(eps_formula, expected, atol=1e-2)


def test_reference_host_hands_the_v_scale_to_the_denoiser(tokenizer, monkeypatch):
    host = reference.Host(reference.build_unet("sd1", seed=5), tokenizer, v_prediction=True)
    scales = []

    class Spy(StageDenoiser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scales.append(self.skip_scale)

    monkeypatch.setattr(reference, "StageDenoiser", Spy)
    latent, recorder = reference.first_pass(host, ["a cat"], "", (16, 16), 2, seed=1)
    result = reference.hires_pass(host, latent, ["a cat"], "", recorder, AccDiffusionSettings(enabled=True),
                                  (32, 32), 2, 0.5, 1)
    assert bool(torch.isfinite(result.latent).all())
    assert scales == [host.skip_scale]


# --- the stage loop ----------------------------------------------------------------------------
def test_each_stage_starts_from_the_previous_stages_result(sd1_host, monkeypatch):
    from k_diffusion import sampling

    starts, outputs, denoisers = [], [], []
    real_euler = sampling.sample_euler

    def euler_spy(model, x, sigmas, **kw):
        starts.append((x.clone(), sigmas[0]))
        out = real_euler(model, x, sigmas, **kw)
        outputs.append(out.clone())
        return out

    class Spy(StageDenoiser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            denoisers.append(self)

    monkeypatch.setattr(sampling, "sample_euler", euler_spy)
    monkeypatch.setattr(reference, "StageDenoiser", Spy)
    latent, recorder = reference.first_pass(sd1_host, ["a cat"], "", (16, 16), 2, seed=3)
    starts.clear(), outputs.clear()
    mean, std = latent.mean((1, 2, 3), keepdim=True), latent.std((1, 2, 3), keepdim=True)
    result = reference.hires_pass(sd1_host, latent, ["a cat"], "", recorder, AccDiffusionSettings(enabled=True),
                                  (48, 48), 2, 0.5, 3)
    assert [s.size for s in result.stages] == [(32, 32), (48, 48)]
    previous = [latent, outputs[0]]
    for (x_start, sigma0), den, prev, stage in zip(starts, denoisers, previous, result.stages):
        # the sampler starts from the stage's upscaled latent, re-noised ...
        assert torch.allclose(x_start, den.reference + den.noise * sigma0, atol=1e-5)
        # ... which is the previous stage's result (the first pass for the first stage)
        assert torch.allclose(den.reference, restandardise(upscale_latent(prev, stage.size), mean, std), atol=1e-5)
    wrong = restandardise(upscale_latent(latent, (48, 48)), mean, std)
    assert not torch.allclose(denoisers[1].reference, wrong, atol=1e-2)
    # the last stage too is re-standardised to the first pass before decoding
    assert not torch.allclose(outputs[-1].std(), std, rtol=1e-4)
    assert torch.allclose(result.latent, restandardise(outputs[-1], mean, std), atol=1e-5)
    assert torch.allclose(result.latent.std((1, 2, 3), keepdim=True), std, rtol=1e-4)
    assert torch.allclose(result.latent.mean((1, 2, 3), keepdim=True), mean, atol=1e-4)


# --- decode --------------------------------------------------------------------------------------
def test_tiled_decode_blends_overlaps_without_a_step():
    # every tile decodes to its own constant: linear ramps leave no step between neighbours
    values = iter([0.0, 6.0, 1.0, 7.0, 2.0, 5.0, 3.0, 4.0] * 4)
    decode = lambda z: torch.full((z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8), next(values))
    out = tiled_decode(torch.zeros(1, 4, 40, 72), decode, tile=32, overlap=8)
    assert out.shape == (1, 3, 320, 576)
    steps = torch.cat([(out[..., 1:, :] - out[..., :-1, :]).abs().flatten(),
                       (out[..., :, 1:] - out[..., :, :-1]).abs().flatten()])
    spread = float(out.max() - out.min())
    assert spread > 3.0  # the tiles differ
    assert float(steps.max()) < spread / (8 * 8) * 1.5  # a ramp over 64 pixels, never a jump
