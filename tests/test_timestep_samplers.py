"""The WebUI's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) served by the tiled pass on both
hosts, through stand-ins of their objects with the real ldm UNet: A1111's CompVisSampler,
CFGDenoiserTimesteps and CompVisTimestepsDenoiser (tests/a1111_standins.py, sd_samplers_timesteps.py),
and Forge's conversion inside its CFG denoiser (tests/forge_standins.py). Checked: routing (the
stage sampler is the user's, every hires UNet call is a window, at the sampler's own timesteps),
the boundary (x_t, t ↔ x, σ) and that the skip residual and the dilated branch give exactly what
they give in the k-diffusion frame; the hires sampler and scheduler choices; schedulers."""

from __future__ import annotations

import pytest
import torch

from accdiffusion.entry import facade
from accdiffusion.method.hires import StageDenoiser, plan_stages, stage_windows
from accdiffusion.lab.reference import sd_alphas_cumprod
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.timesteps import KDIFFUSION, TIMESTEPS, SamplerSpace, TimestepSchedule, eps_through_sigma_space

from a1111_standins import (CompVisSamplerStandIn, Img2ImgStandIn, KDiffusionSamplerStandIn, StandInModel,
                            Txt2ImgStandIn, WebUIStandIn, picture, process_images, process_img2img,
                            setup_img2img_steps)
from a1111_standins import assert_hooks_removed as assert_clean
from forge_standins import ForgeImg2ImgStandIn, ForgeModelStandIn, ForgeTxt2ImgStandIn, ForgeWebUIStandIn

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"
TIMESTEP_SAMPLERS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC"]

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def models(sd1_host):
    return {"a1111": StandInModel(sd1_host, sdxl=False), "forge": ForgeModelStandIn(sd1_host, sdxl=False)}


def txt2img(host, model, **kw):
    kw = {"prompts": [PROMPT], "negative": "blurry", "width": 64, "height": 64, "hr_scale": 2.0, "hr_steps": 3, **kw}
    if host == "a1111":
        webui = WebUIStandIn()
        return Txt2ImgStandIn(model, webui, **kw), webui
    webui = ForgeWebUIStandIn()
    return ForgeTxt2ImgStandIn(model, webui, adapter=facade, **kw), webui


@pytest.fixture
def unet_calls(monkeypatch, sd1_host):
    """(spatial size, timesteps) of every UNet evaluation, and whether it was in a hires stage."""
    seen: list[tuple[tuple[int, int], torch.Tensor, bool]] = []
    real = sd1_host._eps
    state = {"p": None}

    def eps(x, t, conds):
        p = state["p"]
        seen.append((tuple(x.shape[-2:]), t.detach().clone().reshape(-1), bool(p is not None and p.is_hr_pass)))
        return real(x, t, conds)

    monkeypatch.setattr(sd1_host, "_eps", eps)
    return seen, state


# --- the schedule and the boundary ----------------------------------------------------------------
def test_schedule_sigma_of_t_and_back():
    abar = sd_alphas_cumprod()
    schedule = TimestepSchedule(abar)
    whole = torch.tensor([0.0, 1.0, 301.0, 999.0])
    assert torch.allclose(schedule.sigma(whole), ((1 - abar[whole.long()]) / abar[whole.long()]).sqrt(), rtol=1e-6)
    # what a k-diffusion sampler's wrapper says for the same timesteps
    from k_diffusion.external import DiscreteEpsDDPMDenoiser

    assert torch.allclose(DiscreteEpsDDPMDenoiser(None, abar, quantize=False).t_to_sigma(whole), schedule.sigma(whole),
                          rtol=1e-5)
    # UniPC's fractional timesteps: log ᾱ linear between whole ones; sigma_to_t is its inverse
    half = schedule.sigma(torch.tensor([10.5]))
    assert torch.allclose(half, (torch.exp(-(abar[10].double().log() + abar[11].double().log()) / 2) - 1).sqrt().float())
    frac = torch.tensor([0.25, 12.5, 300.7, 998.9])
    assert torch.allclose(schedule.sigma_to_t(schedule.sigma(frac)), frac, atol=1e-3)
    # Forge rounds the timestep before it converts
    forge = TimestepSchedule(abar, quantize=True)
    assert torch.equal(forge.sigma(torch.tensor([10.4, 10.6])), schedule.sigma(torch.tensor([10.0, 11.0])))


def test_boundary_returns_the_models_eps_at_the_samplers_own_timestep():
    """With a 'tiled pass' that is just the model, the boundary is the identity: ε of the
    sampler's (x_t, t), every evaluation at exactly the t the sampler passed."""
    schedule = TimestepSchedule(sd_alphas_cumprod())
    told = []

    def eps_model(x_t, t, conds):
        told.append(t.clone())
        return torch.sin(3 * x_t) + t.view(-1, 1, 1, 1) / 1000

    x_t, t = torch.randn(3, 4, 8, 8), torch.full((3,), 617.25)
    eps = eps_through_sigma_space(lambda model, x, sigma: model(x, sigma, [None] * 3), eps_model, x_t, t, schedule.sigma)
    assert torch.allclose(eps, eps_model(x_t, t, None), atol=1e-4)
    assert torch.equal(told[0], t)


# --- one CFG call through the hooks, against the k-diffusion frame ---------------------------------
def hooked_call(host, model, kind, settings, x, level, reference, noise, skip_scale_v=False):
    """One CFG step of a stage sampler of ``kind`` with the job's hooks installed: the CFG denoiser's
    output and the sampler's x after the call (the skip residual changes it in place)."""
    webui = WebUIStandIn() if host == "a1111" else ForgeWebUIStandIn()
    p = (Txt2ImgStandIn(model, webui, prompts=[PROMPT], negative="blurry") if host == "a1111" else
         ForgeTxt2ImgStandIn(model, webui, adapter=facade, prompts=[PROMPT], negative="blurry"))
    job = facade.start_job(p, settings, webui=webui)
    sampler = webui.create_sampler("DDIM" if kind == TIMESTEPS else "Euler", model)
    space = job.backend.sampler_space(p, sampler, kind)
    stage = plan_stages((8, 8), (16, 16))[0]
    windows = stage_windows(stage, (8, 8), settings)
    denoiser = StageDenoiser(stage, windows, settings, 3, space.sigma_to_t, reference=reference, noise=noise,
                             skip_scale=job.backend.skip_scale(p))
    p.is_hr_pass = True
    if host == "forge":
        job.backend.prepare_stage(p, job)
    job.backend.hook_stage(job, p, sampler, denoiser, space, [[]], [None], windows)
    try:
        sampler.model_wrap_cfg.step = 0
        x = x.clone()
        out = sampler.model_wrap_cfg.forward(x, level, uncond=p.conds(["blurry"], negative=True),
                                             cond=p.conds([PROMPT]), cond_scale=5.0, s_min_uncond=0.0,
                                             image_cond=torch.zeros(1, 5, 1, 1))
    finally:
        job.end_batch()
        p.is_hr_pass = False
    assert denoiser.stats.unet_calls > 0
    return out, x, space


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("variant", ["overlap", "shifted", "v-prediction"])
def test_a_timestep_call_gives_what_the_kdiffusion_frame_gives(sd1_host, host, variant):
    """x_t and t through the hooked timestep sampler = x = x_t·√(σ² + 1) and σ = σ_t through the
    hooked k-diffusion sampler of the same stage: the same fused x₀ (windows, the dilated branch
    with window interaction and blur, a v-model's c_skip) returned as ε, and the same skip
    residual on the sampler's own latent."""
    if variant == "v-prediction" and host == "forge":
        pytest.skip("the Forge stand-in's predictor is ε (its c_skip is covered in test_wiring)")
    model = StandInModel(sd1_host, sdxl=False) if host == "a1111" else ForgeModelStandIn(sd1_host, sdxl=False)
    if variant == "v-prediction":
        model.parameterization = "v"
    settings = AccDiffusionSettings(enabled=True, window_mode="shifted" if variant == "shifted" else "overlap",
                                    cosine_scale_1=1.0, tile_batch_size=2)
    g = torch.Generator().manual_seed(5)
    x_t, reference, noise = (torch.randn(1, 4, 16, 16, generator=g) for _ in range(3))
    t = torch.full((1,), 801.0)
    eps, x_t_after, space = hooked_call(host, model, TIMESTEPS, settings, x_t, t, reference, noise)
    sigma = space.sigma_of_t(t)
    scale = (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1)
    denoised, x_after, kspace = hooked_call(host, model, KDIFFUSION, settings, x_t * scale, sigma, reference, noise)
    assert torch.allclose(kspace.sigma_to_t(sigma).float(), t, atol=0.02)  # both frames use the same cosine factors
    assert torch.allclose(x_t_after * scale, x_after, atol=1e-4)  # the skip residual moved both alike
    assert not torch.allclose(x_after, x_t * scale, atol=1e-2)  # and it did move them
    assert torch.allclose(eps, (x_after - denoised) / sigma.view(-1, 1, 1, 1), atol=2e-4)


# --- whole jobs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS)
def test_every_timestep_sampler_runs_the_tiled_pass(models, unet_calls, host, name, denoisers):
    """The first pass and the hires pass with the sampler: maps recorded through its CFG denoiser,
    every hires UNet call a window (8×8 of the 16×16 latent), at the sampler's own timesteps, the
    infotext says AccDiffusion ran, and the same seed gives the same image."""
    seen, state = unet_calls
    model = models[host]

    def run(settings):
        p, webui = txt2img(host, model, sampler_name=name)
        state["p"] = p
        return p, webui, process_images(p, settings, facade)

    p, webui, out = run(ON)
    stage_samplers = webui.samplers[1:]
    assert len(stage_samplers) == 1 and isinstance(stage_samplers[0], CompVisSamplerStandIn)
    assert webui.encoded  # tile prompts from the maps the first pass recorded through the timestep sampler
    hires = [(size, t) for size, t, is_hr in seen if is_hr]
    assert hires and all(size == (8, 8) for size, _ in hires)  # windows and dilated sub-latents only
    assert denoisers[-1].stats.window_evals > 0 and denoisers[-1].stats.steps > 0
    told = torch.cat([t for _, t in hires])
    if host == "a1111":  # the UNet gets the sampler's timesteps themselves
        steps, t_enc = setup_img2img_steps(p, p.hr_second_pass_steps)
        planned = stage_samplers[0].get_timesteps(p, steps)[:t_enc].float()
        if name == "UniPC":  # fractional times inside [first, last] of the plan
            assert told.min() >= 0 and told.max() <= float(planned[-1]) + 1 and (told != told.round()).any()
        else:
            assert set(told.tolist()) <= set(planned.tolist())
    assert p.extra_generation_params.get("AccDiffusion") is True
    assert "AccDiffusion stepped aside" not in p.extra_generation_params
    assert bool(torch.isfinite(out.images[0]).all())
    _, _, again = run(ON)
    assert torch.equal(out.images[0], again.images[0])
    seen.clear()
    _, _, stock = run(None)
    assert not torch.allclose(out.images[0], stock.images[0])
    assert any(size == (16, 16) for size, _, is_hr in seen if is_hr)  # the stock hires pass: one whole latent
    assert_clean(p, model, webui)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_hires_sampler_choice_is_honoured(models, host):
    """First pass Euler, hires pass DDIM (and the other way round): each stage samples with the
    hires sampler."""
    p, webui = txt2img(host, models[host], sampler_name="Euler")
    p.hr_sampler_name = "DDIM"
    process_images(p, ON, facade)
    assert type(webui.samplers[0]) is not CompVisSamplerStandIn
    assert all(isinstance(s, CompVisSamplerStandIn) for s in webui.samplers[1:])
    p, webui = txt2img(host, models[host], sampler_name="PLMS", hr_scale=3.0)
    p.hr_sampler_name = "Euler a"
    process_images(p, ON, facade)
    assert isinstance(webui.samplers[0], CompVisSamplerStandIn) and len(webui.samplers) == 3
    assert all(isinstance(s, KDiffusionSamplerStandIn) and not isinstance(s, CompVisSamplerStandIn)
               for s in webui.samplers[1:])


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_hires_scheduler_reaches_every_stage(models, host, denoisers):
    """The hires scheduler (Karras, Exponential, SGM Uniform) sets the σ of every stage step, as the
    WebUI's hires pass would (the sampler reads p.hr_scheduler while p.is_hr_pass); the first pass
    keeps its own; the infotext names it."""
    import k_diffusion.sampling

    seen = {}
    for scheduler in ("Karras", "Exponential", "SGM Uniform"):
        denoisers.clear()
        p, webui = txt2img(host, models[host], sampler_name="Euler", hr_steps=4)
        p.hr_scheduler = scheduler
        process_images(p, ON, facade)
        sampler = webui.samplers[-1]
        steps, t_enc = setup_img2img_steps(p, 4)
        wrap = sampler.model_wrap
        lo, hi = wrap.sigmas[0].item(), wrap.sigmas[-1].item()
        if scheduler == "Karras":
            expected = k_diffusion.sampling.get_sigmas_karras(steps, lo, hi)
        elif scheduler == "Exponential":
            expected = k_diffusion.sampling.get_sigmas_exponential(steps, lo, hi)
        else:
            expected = torch.tensor([float(wrap.t_to_sigma(t)) for t in torch.linspace(
                float(wrap.sigma_to_t(torch.tensor(hi))), float(wrap.sigma_to_t(torch.tensor(lo))), steps + 1)[:-1]])
        expected = expected[steps - t_enc - 1:]
        expected = expected[expected > 0]
        got = sorted(denoisers[-1]._step_of_sigma, reverse=True)
        assert torch.allclose(torch.tensor(got), expected.float(), rtol=1e-4), scheduler
        assert p.extra_generation_params["Hires schedule type"] == scheduler
        assert "Schedule type" not in p.extra_generation_params  # the first pass: its own (automatic)
        seen[scheduler] = got
    assert seen["Karras"] != seen["Exponential"] != seen["SGM Uniform"]


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("name", ["DDIM", "UniPC"])
def test_img2img_with_a_timestep_sampler(models, unet_calls, host, name, denoisers):
    """img2img: the probe runs through a k-diffusion wrapper (its UNet calls at timesteps 300, 500,
    700), the stages through the user's timestep sampler, tiled."""
    seen, state = unet_calls
    webui = ForgeWebUIStandIn() if host == "forge" else WebUIStandIn()
    cls = ForgeImg2ImgStandIn if host == "forge" else Img2ImgStandIn
    extra = {"adapter": facade} if host == "forge" else {}
    p = cls(models[host], webui, [PROMPT], [picture(64, 64)], width=128, height=128, sampler_name=name, steps=4,
            **extra)
    state["p"] = p
    out = process_img2img(p, ON, facade)
    probe_calls = [t for size, t, _ in seen if size == (8, 8)][:3]
    assert torch.allclose(torch.cat(probe_calls), torch.tensor([300.0, 500.0, 700.0]), atol=0.05)
    assert any(isinstance(s, CompVisSamplerStandIn) for s in webui.samplers)
    assert isinstance(webui.samplers[-1], CompVisSamplerStandIn)
    assert denoisers and denoisers[-1].stats.window_evals > 0
    assert p.extra_generation_params.get("AccDiffusion") is True
    assert out.images[0].shape == (3, 128, 128) and bool(torch.isfinite(out.images[0]).all())
    assert_clean(p, models[host], webui)


def test_sampler_space_of_each_host(models):
    """A1111 reads t on the model's ᾱ (interpolated); Forge rounds t and takes σ from its predictor;
    k-diffusion samplers pass σ and take the wrapper's σ → t."""
    p = Txt2ImgStandIn(models["a1111"], WebUIStandIn(), prompts=[PROMPT])
    job = facade.start_job(p, ON, webui=p.webui)
    space = job.backend.sampler_space(p, p.webui.create_sampler("DDIM", p.sd_model), TIMESTEPS)
    abar = models["a1111"].alphas_cumprod
    assert torch.allclose(space.sigma_of_t(torch.tensor([501.0])), ((1 - abar[501]) / abar[501]).sqrt(), rtol=1e-5)
    sigma, scale = space.noise_level(torch.tensor([501.0]))
    assert torch.allclose(scale, abar[501].sqrt(), rtol=1e-5)
    euler = p.webui.create_sampler("Euler", p.sd_model)
    k = job.backend.sampler_space(p, euler, KDIFFUSION)
    assert k.sigma_of_t is None and k.noise_level(torch.tensor([2.0]))[1].item() == 1.0
    job.end_batch()

    fp = ForgeTxt2ImgStandIn(models["forge"], ForgeWebUIStandIn(), adapter=facade, prompts=[PROMPT])
    fjob = facade.start_job(fp, ON, webui=fp.webui)
    fspace = fjob.backend.sampler_space(fp, fp.webui.create_sampler("DDIM", fp.sd_model), TIMESTEPS)
    predictor = models["forge"].kmodel.predictor
    assert torch.allclose(fspace.sigma_of_t(torch.tensor([500.4])), predictor.sigmas[500:501], rtol=1e-5)
    assert fspace.sigma_to_t == predictor.timestep
    assert isinstance(fspace, SamplerSpace)
