"""img2img, the txt2img Upscale button and the probe pass, on the A1111 and Forge stand-ins with
the real ldm UNet and k-diffusion samplers."""

from types import SimpleNamespace

import pytest
import torch

from accdiffusion.entry import facade
from accdiffusion.method import probe
from accdiffusion.flows import img2img as img2img_flow
from accdiffusion.method.attention import find_cross_attention
from accdiffusion.method.hires import AccDiffusionError
from accdiffusion.lab.reference import first_pass, probe_pass
from accdiffusion.method.settings import AccDiffusionSettings, SettingsError

from a1111_standins import (Img2ImgStandIn, Txt2ImgStandIn, WebUIStandIn, process_images,
                            process_img2img, picture)
from a1111_standins import assert_hooks_removed as assert_clean
from forge_standins import ForgeImg2ImgStandIn, ForgeWebUIStandIn

ON = AccDiffusionSettings(enabled=True)
PROMPT = "a red-haired astronaut riding a horse on the moon"


pytestmark = pytest.mark.usefixtures("forge_backend")


def img2img(model, settings=ON, images=None, forge=False, n_iter=1, **kw):
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    images = images or [picture(64, 64)]
    cls = ForgeImg2ImgStandIn if forge else Img2ImgStandIn
    extra = {"adapter": facade} if forge else {}
    p = cls(model, webui, init_images=images, **{"prompts": [PROMPT], **kw}, **extra)
    return p, webui, process_img2img(p, settings, facade, n_iter=n_iter)


# --- the probe: engine ----------------------------------------------------------------------------
def test_probe_size_rule():
    # area of the native square, the target's aspect ratio, multiples of 8 latent px
    assert probe.probe_latent_size((256, 256), (2048, 2048), 512) == (64, 64)
    assert probe.probe_latent_size((256, 256), (2048, 2048), 768) == (96, 96)
    assert probe.probe_latent_size((256, 256), (2048, 2048), 1024) == (128, 128)
    h, w = probe.probe_latent_size((192, 256), (1536, 2048), 1024)  # 4:3
    assert h % 8 == 0 and w % 8 == 0 and abs(w / h - 4 / 3) < 0.1 and h * w <= 128 * 128
    assert h * w >= 0.8 * 128 * 128
    # never upscaled: a 512² image into SDXL probes at 512², a small target at the target
    assert probe.probe_latent_size((256, 256), (512, 512), 1024) == (64, 64)
    assert probe.probe_latent_size((40, 40), (2048, 2048), 1024) == (40, 40)
    assert probe.probe_latent_size((8, 16), (64, 64), 512) == (8, 8)  # floor, at least 8
    assert probe.NATIVE_SIDE["sd1"] == 512 and probe.NATIVE_SIDE["sd2-v"] == 768 and probe.NATIVE_SIDE["sdxl"] == 1024


def test_probe_is_deterministic_per_seed_and_reads_the_image(sd1_host):
    latent, recorder = first_pass(sd1_host, [PROMPT], "", (16, 16), 3, seed=4)
    a, stats = probe_pass(sd1_host, latent, [PROMPT], [5])
    b, _ = probe_pass(sd1_host, latent, [PROMPT], [5])
    c, _ = probe_pass(sd1_host, latent, [PROMPT], [6])
    other, _ = probe_pass(sd1_host, torch.randn_like(latent), [PROMPT], [5])
    assert stats.unet_calls == len(probe.PROBE_TIMESTEPS) and stats.latent_size == (16, 16)
    assert torch.equal(a.maps(0), b.maps(0))
    assert not torch.equal(a.maps(0), c.maps(0))
    assert a.maps(0).shape == recorder.maps(0).shape
    # the probe reads the image: closer to this image's own first-pass maps than another image's
    own = (a.maps(0) - recorder.maps(0)).abs().mean()
    assert own < (other.maps(0) - recorder.maps(0)).abs().mean()


def test_probe_noise_levels_come_from_the_schedule(sd1_host):
    sigmas = probe.probe_sigmas(sd1_host.denoiser.t_to_sigma)
    assert len(sigmas) == len(probe.PROBE_TIMESTEPS) and sigmas == sorted(sigmas)
    ts = [float(sd1_host.denoiser.sigma_to_t(torch.tensor([s]))) for s in sigmas]
    assert all(abs(t - t0) < 1e-2 for t, t0 in zip(ts, probe.PROBE_TIMESTEPS))


def test_probe_sends_the_positive_rows_only(sd1_model):
    """The host's UNet call sees one row per image, each the image's own positive prompt."""
    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT, "a green dragon"], [picture(64, 64)])
    p.init()
    seen = []
    inner = p.sampler.model_wrap.kd.forward

    def spy(x, sigma, cond=None):
        seen.append((x.shape[0], cond["c_crossattn"][0].clone()))
        return inner(x, sigma, cond=cond)

    p.sampler.model_wrap.kd.forward = spy
    job = facade.start_job(p, ON, webui=webui)
    c = p.conds(p.prompts)
    maps = img2img_flow.probe_maps(p, job, p.init_latent[:, :, :8, :8], c, p.seeds)
    del p.sampler.model_wrap.kd.forward
    assert len(seen) == len(probe.PROBE_TIMESTEPS)
    expected = torch.stack([sd1_model.encode(PROMPT), sd1_model.encode("a green dragon")])
    assert all(n == 2 and torch.equal(cond, expected) for n, cond in seen)
    assert all(m is not None for m in maps)
    assert all("forward" not in m.__dict__ for m in find_cross_attention(sd1_model.host.unet))


# --- img2img -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["sd1_model", "sdxl_model"])
@pytest.mark.parametrize("image_size,target,stages", [((64, 64), (128, 128), 1), ((64, 64), (192, 192), 2),
                                                      ((64, 128), (128, 256), 1)])
def test_img2img_runs_the_tiled_pass(request, model_name, image_size, target, stages):
    model = request.getfixturevalue(model_name)
    h, w = image_size
    p, webui, out = img2img(model, images=[picture(w, h)], width=target[1], height=target[0])
    assert [im.shape for im in out.images] == [(3, target[0], target[1])]
    assert bool(torch.isfinite(out.images[0]).all())
    assert len(webui.samplers) == 1 + stages  # init()'s sampler (also the probe's), then one per stage
    assert webui.probe_sizes == [(w, h)]  # the probe saw the init image at its own size
    tile_prompts = set(webui.encoded)
    assert tile_prompts and all(set(t.split()) <= set(PROMPT.split()) for t in tile_prompts)
    assert p.extra_generation_params["AccDiffusion"] is True
    assert not p.comments
    assert_clean(p, model, webui)


def test_img2img_differs_from_stock_and_is_reproducible(sd1_model):
    _, _, stock = img2img(sd1_model, settings=None)
    _, _, a = img2img(sd1_model, sampler_name="Euler a")
    _, _, b = img2img(sd1_model, sampler_name="Euler a")
    assert torch.equal(a.images[0], b.images[0])
    assert stock.images[0].shape == a.images[0].shape and not torch.allclose(stock.images[0], a.images[0])


def test_disabled_img2img_is_bit_identical_and_hooks_nothing(sd1_model):
    _, _, stock = img2img(sd1_model, settings=None)
    p, webui, off = img2img(sd1_model, settings=AccDiffusionSettings(enabled=False))
    assert torch.equal(stock.images[0], off.images[0])
    assert not webui.encoded and not hasattr(webui, "probe_sizes")
    assert_clean(p, sd1_model, webui)


def test_denoising_strength_sets_where_sampling_starts(sd1_model):
    """The upscaled init latent is the first stage's input: a low denoise stays near it."""
    init = picture(64, 64)
    webui = WebUIStandIn()
    q = Img2ImgStandIn(sd1_model, webui, [PROMPT], [init])
    q.init()
    reference = torch.stack(webui.decode_batch(sd1_model, q.init_latent))
    _, _, low = img2img(sd1_model, images=[init], denoising_strength=0.1)
    _, _, high = img2img(sd1_model, images=[init], denoising_strength=0.9)
    assert (low.images[0] - reference[0]).abs().mean() < (high.images[0] - reference[0]).abs().mean()
    # the low-denoise result is the init image, not some other picture
    q2 = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64, seed=5)])
    q2.init()
    other = torch.stack(webui.decode_batch(sd1_model, q2.init_latent))
    assert (low.images[0] - reference[0]).abs().mean() < (low.images[0] - other[0]).abs().mean()


def test_first_stage_starts_from_the_upscaled_init_latent(sd1_model):
    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], width=128, height=128)
    original = webui.create_sampler
    starts = []

    def spying(name, model):
        sampler = original(name, model)
        inner = sampler.sample_img2img
        sampler.sample_img2img = lambda p_, x, *a, **k: starts.append(x.clone()) or inner(p_, x, *a, **k)
        return sampler

    webui.create_sampler = spying
    process_img2img(p, ON, facade)
    assert len(starts) == 1 and torch.allclose(starts[0], p.init_latent, atol=1e-4)


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
@pytest.mark.parametrize("stages", [3, 4])
def test_first_of_several_stages_starts_from_the_init_image(sd1_model, forge_sd1, forge, stages):
    """Probe 64 px, target 256 px (3 stages: 128, 192, 256) or 320 px (4): the first stage, smaller
    than the target, starts from the init image (the WebUI's init latent at the target size)
    downscaled to that stage, re-standardised to the init latent's statistics; every later stage
    from the previous stage's result, bicubic — never from the probe-size latent."""
    from accdiffusion.method.hires import latent_stats, restandardise

    side = 64 * (stages + 1)
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    webui.native = 64
    cls = ForgeImg2ImgStandIn if forge else Img2ImgStandIn
    extra = {"adapter": facade} if forge else {}
    p = cls(forge_sd1 if forge else sd1_model, webui, [PROMPT], [picture(96, 96)], width=side, height=side, steps=2,
            **extra)
    original = webui.create_sampler
    starts, results = [], []

    def spying(name, model):
        sampler = original(name, model)
        inner = sampler.sample_img2img

        def sample_img2img(p_, x, *a, **k):
            starts.append(x.clone())
            results.append(inner(p_, x, *a, **k))
            return results[-1]

        sampler.sample_img2img = sample_img2img
        return sampler

    webui.create_sampler = spying
    process_img2img(p, ON, facade)
    init = p.init_latent.float()
    mean, std = latent_stats(init)
    sizes = [tuple(x.shape[-2:]) for x in starts]
    assert sizes == [(8 * k, 8 * k) for k in range(2, stages + 2)]
    first = torch.nn.functional.interpolate(init, size=sizes[0], mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(starts[0], restandardise(first, mean, std), atol=1e-4)
    for k in range(1, len(starts)):  # the previous stage's output (re-standardised), upscaled bicubic
        previous = restandardise(results[k - 1].float(), mean, std)
        up = torch.nn.functional.interpolate(previous, size=sizes[k], mode="bicubic", align_corners=False)
        assert torch.allclose(starts[k], restandardise(up, mean, std), atol=1e-4)


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_probe_noises_the_latent_at_the_level_the_unet_is_told(sd1_model, forge_sd1, forge, monkeypatch):
    """Every probe UNet call (both hosts): the timestep the UNet gets is one of 300, 500, 700, in that
    order, and its input is exactly the probe latent plus the image's seeded probe noise at σ of
    that very timestep, scaled by c_in = 1/√(σ² + 1) — the level the latent is noised at is the
    level the UNet is told."""
    from accdiffusion.method.timesteps import TimestepSchedule

    model = forge_sd1 if forge else sd1_model
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    webui.native = 64  # probe 64 px: an 8×8 latent (the stages are 16×16 and 24×24)
    encoded = []
    encode = webui.encode
    webui.encode = lambda m, pixels, seed=None: encoded.append(encode(m, pixels, seed)) or encoded[-1]
    cls = ForgeImg2ImgStandIn if forge else Img2ImgStandIn
    extra = {"adapter": facade} if forge else {}
    p = cls(model, webui, [PROMPT, "a green dragon"], [picture(64, 64)], width=192, height=192, steps=2, **extra)
    calls = []
    real = model.host._eps
    monkeypatch.setattr(model.host, "_eps", lambda x, t, conds: calls.append((x.clone(), t.clone())) or real(x, t, conds))
    process_img2img(p, ON, facade)
    probe_latent = next(e for e in encoded if e.shape[-1] == 8)
    probe_calls = [(x, t) for x, t in calls if x.shape[-1] == 8 and x.shape[0] == 2][:3]
    schedule = TimestepSchedule(model.alphas_cumprod)
    for level, (x, t) in enumerate(probe_calls):
        assert torch.allclose(t, torch.full_like(t, float(probe.PROBE_TIMESTEPS[level])), atol=0.05)
        sigma = schedule.sigma(t.float()).view(-1, 1, 1, 1)
        noise = torch.stack([probe.probe_noise(probe_latent.shape[1:], seed, level) for seed in p.seeds])
        expected = (probe_latent + sigma * noise) / (sigma ** 2 + 1).sqrt()
        assert torch.allclose(x, expected, atol=1e-4), level


def stage_noises(model, forge=False, **kw):
    """The noise each stage's sample_img2img got, and the job's p."""
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    cls = ForgeImg2ImgStandIn if forge else Img2ImgStandIn
    extra = {"adapter": facade} if forge else {}
    p = cls(model, webui, [PROMPT], [picture(64, 64)], width=192, height=192, **kw, **extra)
    original = webui.create_sampler
    noises = []

    def spying(name, model_):
        sampler = original(name, model_)
        inner = sampler.sample_img2img
        sampler.sample_img2img = lambda p_, x, noise, *a, **k: noises.append(noise.clone()) or inner(p_, x, noise, *a, **k)
        return sampler

    webui.create_sampler = spying
    process_img2img(p, ON, facade)
    return noises, p


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_initial_noise_multiplier_scales_every_stages_noise(sd1_model, forge_sd1, forge):
    """img2img's *Initial noise multiplier* reaches the tiled pass as it reaches the stock pass."""
    model = forge_sd1 if forge else sd1_model
    plain, p_plain = stage_noises(model, forge)
    scaled, p_scaled = stage_noises(model, forge, initial_noise_multiplier=0.5)
    assert len(plain) == len(scaled) == 2  # 64 px → 128 → 192: two stages
    for a, b in zip(plain, scaled):
        assert torch.allclose(b, 0.5 * a)
    assert p_scaled.extra_generation_params["Noise multiplier"] == 0.5
    assert "Noise multiplier" not in p_plain.extra_generation_params


def test_resize_mode_is_honoured(sd1_model):
    """'Crop and resize' of a wide image: the probe sees the same crop as the init latent."""
    p, webui, out = img2img(sd1_model, images=[picture(128, 64)], width=128, height=128, resize_mode=1)
    assert out.images[0].shape == (3, 128, 128)
    assert webui.probe_sizes == [(64, 64)]  # the target's aspect ratio, not the image's


def test_batch_of_init_images_each_get_their_own_probe_maps(sd1_model, monkeypatch):
    seen = []
    original = img2img_flow.image_plans

    def spy(p, job, maps):
        seen.append(maps)
        return original(p, job, maps)

    monkeypatch.setattr(img2img_flow, "image_plans", spy)
    images = [picture(64, 64, seed=1), picture(64, 64, seed=2)]
    p, webui, out = img2img(sd1_model, images=images, prompts=[PROMPT, PROMPT])
    assert len(out.images) == 2 and len(seen) == 1
    both = seen[0]
    assert not torch.equal(both[0], both[1])
    seen.clear()
    for i, image in enumerate(images):  # each alone, with its own seed: the same maps
        img2img(sd1_model, images=[image], prompts=[PROMPT], seed=1 + i)
        assert torch.allclose(seen[-1][0], both[i], atol=1e-5)
    assert_clean(p, sd1_model, webui)


def test_batch_count_probes_every_batch(sd1_model):
    p, webui, out = img2img(sd1_model, settings=ON.replace(tile_prompt_map=True), n_iter=2)
    assert len(out.images) == 4  # two images and a tile-prompt map for each batch
    assert len(webui.saved) == 2 and out.images[2].size == (128, 128)  # drawn over the init image
    assert webui.encodes == 1 + 2  # init() once, the probe image of each batch


def test_probe_images_are_encoded_with_the_batch_seed(sd1_model):
    """The VAE samples its posterior from the global RNG; the probe's encode gets the batch's first
    seed (WebUI.encode seeds that draw), so the same request probes the same latent whatever ran
    before it. The WebUI's own init() encode is left as the WebUI does it."""
    p, webui, _ = img2img(sd1_model, seed=1234, n_iter=2)
    assert webui.encode_seeds[0] is None  # init(): the WebUI's
    assert webui.encode_seeds[1:] == [1234, 1235] == [p.seeds[0] - 1, p.seeds[0]]  # each batch's probe


def test_webui_encode_with_a_seed_draws_the_seeds_posterior_and_leaves_the_global_rng():
    """flows.webui.WebUI.encode on a VAE that samples its posterior from torch's global RNG (as
    ldm's and Forge's DiagonalGaussianDistribution.sample do)."""
    from accdiffusion.flows.webui import WebUI

    def images_tensor_to_samples(pixels, method, model):
        mean = torch.nn.functional.avg_pool2d(pixels.float(), 8)
        return mean + 0.5 * torch.randn(mean.shape)

    webui = object.__new__(WebUI)
    webui.sd_samplers_common = SimpleNamespace(approximation_indexes={"Full": 0},
                                               images_tensor_to_samples=images_tensor_to_samples)
    webui.shared = SimpleNamespace(device=torch.device("cpu"), opts=SimpleNamespace(sd_vae_encode_method="Full"))
    webui.devices = SimpleNamespace(dtype_vae=torch.float32)
    pixels = torch.rand(1, 3, 16, 16)
    model = SimpleNamespace()  # a model object: encode keeps its attributes as they were (own_encode, ebd80fe)
    torch.manual_seed(1)
    a = webui.encode(model, pixels, seed=7)
    after_a = torch.randn(3)
    torch.manual_seed(2)
    b = webui.encode(model, pixels, seed=7)
    torch.manual_seed(1)
    assert torch.equal(a, b)  # the seed's draw, whatever the global state was
    assert torch.equal(after_a, torch.randn(3))  # the global RNG continues as if nothing drew from it
    assert not torch.equal(webui.encode(model, pixels, seed=8), a)
    torch.manual_seed(2)
    assert not torch.equal(webui.encode(model, pixels), a)  # without a seed: the global state's draw


def test_img2img_prompt_drives_the_tile_prompts(sd1_model):
    p, webui, _ = img2img(sd1_model, prompts=["a green dragon over a castle"])
    words = set(" ".join(webui.encoded).split())
    assert words and words <= {"a", "green", "dragon", "over", "castle"}


@pytest.mark.parametrize("case,message", [
    ("mask", "inpainting"), ("small", "not larger than the probe size"), ("sampler", "is not supported"),
    ("model", "SD3")])
def test_fallbacks_run_the_stock_img2img_with_a_note(sd1_model, case, message):
    kw, webui_setup = {}, lambda w: None
    if case == "mask":
        kw["mask"] = picture(64, 64)
    elif case == "small":
        kw.update(width=64, height=64)
    elif case == "sampler":
        webui_setup = lambda w: setattr(w, "sampler_kind", lambda name: None)  # e.g. LCM

    def run(settings):
        webui = WebUIStandIn()
        webui_setup(webui)
        p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], **kw)
        if case == "model":
            sd1_model.is_sd3 = True
        try:
            return p, webui, process_img2img(p, settings, facade)
        finally:
            sd1_model.is_sd3 = False

    p, webui, out = run(ON)
    _, _, stock = run(None)
    assert any(message in c and "own img2img" in c for c in p.comments), p.comments
    assert torch.equal(out.images[0], stock.images[0])
    assert "AccDiffusion" not in p.extra_generation_params and not webui.encoded
    # the infotext says what ran instead, not "AccDiffusion: True"
    assert message in p.extra_generation_params["AccDiffusion stepped aside"]
    assert p.extra_generation_params["AccDiffusion stepped aside"].endswith("the WebUI's own img2img ran")
    assert_clean(p, sd1_model, webui)


def test_probe_smaller_than_the_image(sd1_model):
    """A native size below the image: the probe downsizes, the stages start from the probe."""
    webui = WebUIStandIn()
    webui.native = 64
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(128, 128)], width=256, height=256)
    out = process_img2img(p, ON, facade)
    assert webui.probe_sizes == [(64, 64)]
    assert out.images[0].shape == (3, 256, 256)
    assert len(webui.samplers) == 1 + 3  # 64 → 256 px: stages 2×, 3×, 4×


class OtherExtension:
    def __init__(self, p):
        self.calls = []
        inner = p.sample

        def sample(*args, **kwargs):
            self.calls.append("sample")
            return inner(*args, **kwargs)

        p.sample = self.sample = sample


def test_mask_found_at_sampling_chains_to_the_previous_sample(sd1_model):
    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)])
    other = OtherExtension(p)
    facade.start_job(p, ON, webui=webui)
    p.init()
    p.mask = torch.ones_like(p.init_latent[:, :1])  # e.g. set by another script after process()
    p.nmask = 1 - p.mask
    p.rng = __import__("a1111_standins").ImageRNGStandIn(p.init_latent.shape[1:], p.seeds)
    facade.before_batch(p)
    with torch.no_grad():
        p.sample(conditioning=p.conds(p.prompts), unconditional_conditioning=p.conds([""], True), seeds=p.seeds,
                 subseeds=p.seeds, subseed_strength=0, prompts=p.prompts)
    assert other.calls == ["sample"] and any("inpainting" in c for c in p.comments)
    assert p.__dict__["sample"] is other.sample


def test_error_and_interrupt_undo_every_hook(sd1_model):
    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], width=192, height=192, steps=3)
    other = OtherExtension(p)
    original = webui.create_sampler

    def failing(name, model):
        sampler = original(name, model)
        if len(webui.samplers) == 3:  # the second stage
            def boom(*a, **k):
                raise RuntimeError("CUDA out of memory")
            sampler.model_wrap.kd.forward = boom
        return sampler

    webui.create_sampler = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        process_img2img(p, ON, facade)
    assert all("forward" not in m.__dict__ for m in find_cross_attention(sd1_model.host.unet))
    assert all("forward" not in s.model_wrap_cfg.__dict__ for s in webui.samplers)
    assert "forward" not in webui.samplers[1].model_wrap.__dict__
    assert p.__dict__["sample"] is other.sample
    facade.finish_job(p, SimpleNamespace(images=[], infotexts=[]))

    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], width=192, height=192, steps=3)
    original = webui.create_sampler

    def interrupting(name, model):
        sampler = original(name, model)
        callback = sampler.callback_state

        def count(d):
            callback(d)
            if len(webui.samplers) == 2 and d["i"] == 1:
                webui.state.interrupted = True

        sampler.callback_state = count
        return sampler

    webui.create_sampler = interrupting
    out = process_img2img(p, ON, facade)
    assert len(webui.samplers) == 2 and out.images[0].shape == (3, 128, 128)  # the first stage's result
    assert_clean(p, sd1_model, webui)


def test_invalid_arguments_stop_an_img2img_job(sd1_model):
    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)])
    try:
        AccDiffusionSettings.from_dict({"sigma": -1})
    except SettingsError as error:
        facade.fail_job(p, error, webui=webui)
    p.init()
    facade.before_batch(p)
    with pytest.raises(AccDiffusionError, match="sigma"):
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=p.seeds, subseeds=p.seeds,
                 subseed_strength=0, prompts=p.prompts)
    assert "sample" not in p.__dict__


# --- the Upscale button --------------------------------------------------------------------------
@pytest.mark.parametrize("pixel_upscaler", [False, True])
def test_upscale_button_takes_its_maps_from_the_probe(sd1_model, monkeypatch, pixel_upscaler):
    seen = []
    original = img2img_flow.probe_maps
    monkeypatch.setattr(img2img_flow, "probe_maps", lambda *a: seen.append(a[2].shape) or original(*a))

    def run(settings):
        webui = WebUIStandIn()
        p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
        p.firstpass_image = picture(64, 64)
        if pixel_upscaler:
            p.latent_scale_mode, p.hr_upscaler = None, "Lanczos"
        return p, webui, process_images(p, settings, facade)

    p, webui, out = run(ON)
    assert not p.comments and seen == [torch.Size([1, 4, 8, 8])]
    assert out.images[0].shape == (3, 128, 128) and len(webui.samplers) == 2
    assert webui.encoded and all(set(t.split()) <= set(PROMPT.split()) for t in webui.encoded)
    _, _, stock = run(None)
    assert not torch.allclose(out.images[0], stock.images[0])
    assert_clean(p, sd1_model, webui)


@pytest.mark.parametrize("side,probe_side", [(64, 512), (128, 32)])  # 32: a probe below the image size
def test_upscale_button_drops_the_alpha_channel_like_the_webui(sd1_model, side, probe_side):
    """Forge saves its images as RGBA by default (stealth infotext in the alpha channel,
    modules/stealth_infotext.py), and the gallery hands the Upscale button that file: with a pixel
    upscaler its first pass arrives as 4 channels. The WebUI's hires pass drops the alpha
    (images.resize_image converts RGBA to RGB); so must the tiled pass."""
    rgb = picture(side, side)
    rgba = rgb.copy()
    rgba.putalpha(128)  # Forge's own alpha is 254/255: half makes a compositing mistake plain

    def run(image, settings):
        webui = WebUIStandIn()
        webui.native = probe_side
        p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT], width=side, height=side)
        p.firstpass_image = image
        p.latent_scale_mode, p.hr_upscaler = None, "Lanczos"
        return p, webui, process_images(p, settings, facade)

    p, webui, out = run(rgba, ON)
    assert not p.comments and out.images[0].shape == (3, 2 * side, 2 * side)
    assert getattr(webui, "probe_sizes", []) == ([(64, 64)] if side == 128 else [])
    assert torch.equal(out.images[0], run(rgb, ON)[2].images[0])
    assert torch.equal(run(rgba, None)[2].images[0], run(rgb, None)[2].images[0])  # the stock pass drops it too
    assert_clean(p, sd1_model, webui)


def test_upscale_button_takes_an_rgba_image_with_a_latent_upscaler(sd1_model):
    """The WebUI itself fails here (it encodes np.array of the RGBA image: 4 channels into the
    VAE); with AccDiffusion on, the job gets the RGB image, and p its own image back afterwards."""
    rgb = picture(64, 64)
    rgba = rgb.copy()
    rgba.putalpha(128)

    def run(image, settings):
        webui = WebUIStandIn()
        p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
        p.firstpass_image = image
        return p, webui, process_images(p, settings, facade)

    with pytest.raises(RuntimeError, match="3 channels"):
        run(rgba, None)
    p, webui, out = run(rgba, ON)
    assert not p.comments and out.images[0].shape == (3, 128, 128)
    assert torch.equal(out.images[0], run(rgb, ON)[2].images[0])
    assert p.firstpass_image is rgba
    assert_clean(p, sd1_model, webui)


# --- Forge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["forge_sd1", "forge_sdxl"])
def test_forge_img2img(request, model_name):
    import sys

    model = request.getfixturevalue(model_name)
    prepared = sys.modules["backend.sampling.sampling_function"].calls
    prepared.clear()
    p, webui, out = img2img(model, forge=True, images=[picture(64, 96)], width=192, height=128,
                            prompts=[PROMPT, "a green dragon"])
    assert [im.shape for im in out.images] == [(3, 128, 192)] * 2
    assert webui.encoded  # maps recorded through the attn2 patches of the probe
    assert prepared[:2] == ["prepare", "cleanup"]  # the probe loaded and released the UNet
    assert p.pbes_calls == 0  # the tiled pass replaced Forge's own img2img sampling
    assert_clean(p, model, webui)
    p2, _, again = img2img(model, forge=True, images=[picture(64, 96)], width=192, height=128,
                           prompts=[PROMPT, "a green dragon"])
    assert all(torch.equal(a, b) for a, b in zip(out.images, again.images))
    _, _, off = img2img(model, forge=True, settings=AccDiffusionSettings(enabled=False),
                        images=[picture(64, 96)], width=192, height=128, prompts=[PROMPT, "a green dragon"])
    _, _, stock = img2img(model, forge=True, settings=None, images=[picture(64, 96)], width=192, height=128,
                          prompts=[PROMPT, "a green dragon"])
    assert all(torch.equal(a, b) for a, b in zip(off.images, stock.images))
    assert not torch.allclose(out.images[0], stock.images[0])
