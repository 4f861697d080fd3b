"""Flux, Chroma and SD 3.5 (joint-attention flow transformers) on Forge: the method pieces
(joint-attention maps, flow noise scaling, patch alignment) and the Forge backend driven through
stand-ins of Forge's DiT models (tests/dit_standins.py) and the job flow of the SD tests."""

import pytest
import torch

import dit_standins
from a1111_standins import process_img2img, process_images, picture
from accdiffusion.backends import forge
from accdiffusion.entry import facade
from accdiffusion.flows import job as job_module
from accdiffusion.flows import txt2img as passes
from accdiffusion.method.attention import AttentionRecorder
from accdiffusion.method.flow import FLOW_SAMPLING, flow_noise_scaling
from accdiffusion.method.hires import Stage, StageDenoiser, stage_windows
from accdiffusion.method.jointattention import JointAttentionCapture, all_blocks, apply_rope, late_block_count, \
    recorded_blocks
from accdiffusion.method.schedule import cosine_factor
from accdiffusion.method.settings import AccDiffusionSettings
from dit_standins import (DiTEngineStandIn, DiTImg2ImgStandIn, DiTTxt2ImgStandIn, DiTWebUIStandIn, rotary,
                          rotate)

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def tokenizers():
    return dit_standins.load_tokenizers()


@pytest.fixture(scope="module")
def engines(tokenizers):
    return {family: DiTEngineStandIn(family, *tokenizers) for family in ("flux", "chroma", "sd35")}


@pytest.fixture
def flux(engines):
    model = engines["flux"]
    model.transformer.calls.clear()
    return model


def run(model, settings=ON, **kw):
    webui = DiTWebUIStandIn()
    p = DiTTxt2ImgStandIn(model, webui, kw.pop("prompts", [PROMPT]), **kw)
    return p, webui, process_images(p, settings, facade)


# --- method pieces ---------------------------------------------------------------------------------
def test_text_only_softmax_is_the_joint_softmax_renormalised_over_text():
    torch.manual_seed(0)
    q, k_txt, k_img = torch.randn(2, 10, 8), torch.randn(2, 7, 8), torch.randn(2, 10, 8)
    joint = torch.softmax(q @ torch.cat([k_txt, k_img], 1).transpose(1, 2), -1)[..., :7]
    text_only = torch.softmax(q @ k_txt.transpose(1, 2), -1)
    assert torch.allclose(joint / joint.sum(-1, keepdim=True), text_only, atol=1e-6)
    assert not torch.allclose(joint, text_only, atol=1e-3)  # the unrenormalised share is another thing


def _largest_product(call) -> int:
    """The most elements a matrix product made while ``call`` ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("bmm", "mm", "matmul"):
                Products.largest = max(Products.largest, out.numel())
            return out

    with Products():
        call()
    return Products.largest


def test_joint_share_is_computed_in_query_chunks_without_changing_it(monkeypatch):
    """add_joint_qk bounds its scores by PENDING_SCORES (a 1024² Flux block would hold 450 M): the
    chunked maps equal the whole softmax's text columns, rows go to their images."""
    import accdiffusion.method.attention as attention_module

    torch.manual_seed(0)
    heads, d, text, image = 2, 4, 5, 12
    q, k = torch.randn(2, image, heads * d), torch.randn(2, text + image, heads * d)
    qh, kh = q.view(2, image, heads, d).transpose(1, 2), k.view(2, -1, heads, d).transpose(1, 2)
    share = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, -1)[..., :text].mean(1)  # [2, image, text]
    monkeypatch.setattr(attention_module, "PENDING_SCORES", heads * (text + image) * 2 * 3)  # 3 queries a chunk
    recorder = AttentionRecorder((6, 8), 3, downsample=2)  # a 3×4 grid: 12 image tokens
    largest = _largest_product(lambda: recorder.add_joint_qk(q, k, heads, [2, 0], text))
    assert largest == 2 * heads * 3 * (text + image)  # 3 queries' scores at a time, not all 12
    assert torch.allclose(recorder.maps(2), share[0].T.reshape(text, 3, 4), atol=1e-6)
    assert torch.allclose(recorder.maps(0), share[1].T.reshape(text, 3, 4), atol=1e-6)
    assert recorder.maps(1) is None


def test_apply_rope_is_the_models_rotation():
    torch.manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    pe = rotary(ids.reshape(1, 12, 3), (4, 6, 6))
    x = torch.randn(2, 2, 12, 16)
    assert torch.allclose(apply_rope(x, pe), rotate(x, pe), atol=1e-5)
    assert not torch.allclose(apply_rope(x, pe), x, atol=1e-3)


def _attention_spy(monkeypatch, text_first_len):
    """The stand-ins' joint attention, recording each call's image-query → text-key
    probabilities as the block computes them: softmax over all keys, text columns, mean over
    heads (what the recorder must reproduce)."""
    seen = []
    original = dit_standins.joint_attention

    def spy(q, k, v):
        text = text_first_len()
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)[:, :, text:, :text]
        seen.append(probs.mean(1))  # [B, image, text]
        return original(q, k, v)

    monkeypatch.setattr(dit_standins, "joint_attention", spy)
    return seen


@pytest.mark.parametrize("which", ["late", "every"])
@pytest.mark.parametrize("family", ["flux", "chroma", "sd35"])
def test_recorded_maps_are_the_attention_the_blocks_compute(monkeypatch, engines, family, which):
    """The map of a row is the mean over the recorded blocks of the text share of its image
    queries' joint softmax. ``late``: the product's choice (the last quarter: on the stand-ins the
    single-stream block, SD 3.5's last joint block); ``every``: all blocks, so the double-stream
    capture is held too."""
    model = engines[family]
    transformer = model.transformer
    cond = model.encode(PROMPT, distilled_cfg_scale=3.5)
    context = (cond["crossattn"] if isinstance(cond, dict) else cond)[None].repeat(2, 1, 1)
    extra = {}
    if family == "flux":
        extra = {"y": cond["vector"][None].repeat(2, 1), "guidance": torch.tensor([3.5, 3.5])}
    elif family == "sd35":
        extra = {"y": cond["vector"][None].repeat(2, 1)}
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.6, 0.6]) if family != "sd35" else torch.tensor([600.0, 600.0])
    plain = transformer(x, t, context=context, **extra)
    seen = _attention_spy(monkeypatch, lambda: context.shape[1])
    recorder = AttentionRecorder((8, 12), 2, downsample=2)
    every = all_blocks(transformer)
    blocks = recorded_blocks(transformer) if which == "late" else every
    with JointAttentionCapture(transformer, recorder, [1, None], blocks=blocks):  # row 0: image 1's; row 1 not
        recorded = transformer(x, t, context=context, **extra)
    assert torch.equal(plain, recorded)  # recording changes nothing
    if which == "late":
        assert len(blocks) == late_block_count(len(every)) == 1
        assert blocks[0] is every[-1]
    expected = torch.stack(seen[-len(blocks):]).mean(0)[0].T.reshape(-1, 4, 6)  # the model's last blocks
    assert recorder.maps(0) is None
    assert torch.allclose(recorder.maps(1), expected, atol=1e-5)
    assert all(not block._forward_hooks and not block._forward_pre_hooks for block in every)


def test_recorded_blocks_are_the_last_quarter_of_the_model():
    """Flux dev / Chroma: 19 double + 38 single blocks -> single blocks 23-37; SD 3.5 large (38 joint
    blocks) -> 28-37, medium (24) -> 18-23; a tiny model records its last block."""
    assert [late_block_count(n) for n in (57, 38, 24, 5, 3, 1)] == [15, 10, 6, 2, 1, 1]
    flux = dit_standins.FluxStandIn(depth=3, single=5)
    assert recorded_blocks(flux) == list(flux.single_blocks)[3:]
    few_single = dit_standins.FluxStandIn(depth=6, single=1)
    assert recorded_blocks(few_single) == [few_single.double_blocks[5], few_single.single_blocks[0]]
    sd35 = dit_standins.MMDiTStandIn(depth=8)
    assert recorded_blocks(sd35) == list(sd35.joint_blocks)[6:]


def test_flow_noise_scaling_and_timestep():
    x0, noise = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    assert torch.allclose(flow_noise_scaling(0.25, noise, x0), torch.full((1, 1, 2, 2), 0.75 * 2 - 0.25))
    assert float(FLOW_SAMPLING.sigma_to_t(torch.tensor([0.4]))[0]) == pytest.approx(400.0)


def _denoiser(noise_scaling=None, skip_scale=None, sigma_to_t=FLOW_SAMPLING.sigma_to_t, **settings):
    stage = Stage(1, 2.0, (8, 8), 2)
    s = AccDiffusionSettings(enabled=True, window_mode="overlap", **settings)
    ref, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    return StageDenoiser(stage, stage_windows(stage, (4, 4), s, align=2), s, 0, sigma_to_t, size_multiple=2,
                         reference=ref, noise=noise, noise_scaling=noise_scaling, skip_scale=skip_scale)


def test_skip_residual_renoises_the_reference_as_the_flow_model_noises():
    d = _denoiser(noise_scaling=flow_noise_scaling)
    x = torch.randn(1, 16, 8, 8)
    sigma = 0.7
    c1 = d.factors(sigma).c1
    assert 0.05 < c1 < 0.95  # the flow time on the factors' scale (t = 700), not t = 0.7
    expected = (1 - c1) * x + c1 * ((1 - sigma) * d.reference + sigma * d.noise)
    assert torch.allclose(d.skip_residual_(x.clone(), torch.tensor([sigma])), expected, atol=1e-6)


def test_dilated_branch_re_adds_detail_with_c_skip_one_for_flow():
    """A flow model whose velocity ignores its input denoises x to x − σ·v exactly; the dilated
    branch (blurred input, detail re-added with c_skip) must give the same."""
    d = _denoiser(noise_scaling=flow_noise_scaling, window_interaction=False)
    v = torch.randn(1, 16, 1, 1)
    model = lambda xs, sigmas, conds: xs - sigmas.view(-1, 1, 1, 1) * v
    x, sigma = torch.randn(1, 16, 8, 8), torch.tensor([0.5])
    out = d._dilated(model, x, sigma, [None], d.factors(0.5), 0)
    assert torch.allclose(out, x - 0.5 * v, atol=1e-5)


def test_windows_and_sublatents_follow_the_patch_grid():
    s = AccDiffusionSettings(enabled=True, window_mode="overlap")
    for size, base in (((30, 46), (10, 15)), ((27, 40), (9, 13))):
        windows = stage_windows(Stage(1, 3.0, size, 3), base, s, align=2)
        assert all(w.height % 2 == 0 and w.width % 2 == 0 for w in windows)
        assert all(w.top % 2 == 0 or w.top + w.height == size[0] for w in windows)
        assert all(w.left % 2 == 0 or w.left + w.width == size[1] for w in windows)
        covered = torch.zeros(size)
        for w in windows:
            covered[w.slices] = 1
        assert bool(covered.all())


# --- the Forge backend, Flux ----------------------------------------------------------------------
def test_flux_hires_end_to_end_and_hooks_removed(flux, stage_prompts):
    p, webui, out = run(flux, hr_scale=3.0)
    assert [im.shape for im in out.images] == [(3, 192, 192)]
    assert all(bool(torch.isfinite(im).all()) for im in out.images)
    assert len(stage_prompts) == 2 and all(prompts[0] for _, _, prompts in stage_prompts)  # maps → tile prompts
    assert any(prompt != PROMPT for prompt in stage_prompts[-1][2][0])
    assert flux.forge_objects.unet.model_options.get("model_function_wrapper") is None
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in flux.transformer.modules())
    assert not hasattr(p, job_module.JOB_ATTR)


def test_flux_no_recorded_maps_is_said_not_silent(flux, monkeypatch):
    """If the capture never reaches the model's attention (live on Forge: recording switched off for
    joint models, the hires pass ran with "0 tile prompts encoded" and no note), the image still comes,
    but the note says its tiles took the full prompt and it has no tile-prompt map."""
    settings = AccDiffusionSettings(enabled=True, window_mode="overlap", tile_prompt_map=True)
    p, _, out = run(flux, settings=settings)
    assert len(out.images) == 2 and not any("no attention maps" in c for c in p.comments)  # image + its map
    monkeypatch.setattr(forge, "_joint_recording_unet", lambda unet, recorder, references=None: unet.clone())
    p, _, out = run(flux, settings=settings)
    assert [im.shape for im in out.images] == [(3, 128, 128)]  # the image, no map
    assert any("no attention maps were recorded for image 1" in c for c in p.comments), p.comments


def test_flux_first_pass_is_bit_identical_with_recording(flux):
    p, _, _ = run(flux)
    q, _, _ = run(flux, settings=None)
    assert torch.equal(p.first_pass_latent, q.first_pass_latent)


def test_flux_disabled_is_identical_to_not_installed(flux):
    _, _, plain = run(flux, settings=None)
    _, _, off = run(flux, settings=AccDiffusionSettings(enabled=False))
    assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))


def _rows(calls):
    """Every row of the given transformer calls: (x shape, image ids, context row, guidance)."""
    out = []
    for call in calls:
        for r in range(call["context"].shape[0]):
            g = call.get("guidance")
            out.append((call["shape"][-2:], call.get("img_ids"), call.get("crop"), call["context"][r],
                        None if g is None else float(g[r])))
    return out


def test_flux_each_window_gets_its_tile_prompt_positions_and_the_hires_guidance(flux, stage_prompts, monkeypatch):
    starts = []
    original = job_module.StageDenoiser

    def made(*args, **kwargs):
        starts.append(len(flux.transformer.calls))
        return original(*args, **kwargs)

    monkeypatch.setattr(job_module, "StageDenoiser", made)
    run(flux, hr_distilled_cfg=2.5, distilled_cfg_scale=3.5)
    (stage, windows, prompts), = stage_prompts
    rows = _rows(flux.transformer.calls[starts[0]:])
    first_step = rows[:len(windows)]  # cfg 1: one row per window, the local branch first
    for (shape, ids, _, context, guidance), window, prompt in zip(first_step, windows, prompts[0]):
        assert shape == (window.height, window.width)
        # position ids as an image of the window's own size (nn/flux.py:410-416)
        assert ids[:, 1].max() == window.height // 2 - 1 and ids[:, 2].max() == window.width // 2 - 1
        assert torch.equal(context, flux.encode(prompt)["crossattn"])
    # every stage row carries the hires distilled guidance, though tile prompts are encoded with 3.5
    assert {guidance for *_, guidance in rows} == {2.5}


def test_flux_batch_of_one_prompt_takes_each_images_own_maps(flux, monkeypatch):
    seen = []
    original = passes.image_plans
    monkeypatch.setattr(passes, "image_plans", lambda p, job, maps: seen.append(maps) or original(p, job, maps))
    run(flux, prompts=[PROMPT, PROMPT], seed=5)
    run(flux, prompts=[PROMPT], seed=5)
    run(flux, prompts=[PROMPT], seed=6)
    batch, alone_first, alone_second = seen
    assert not torch.allclose(batch[0], batch[1])
    assert torch.allclose(batch[0], alone_first[0], atol=1e-5)
    assert torch.allclose(batch[1], alone_second[0], atol=1e-5)


def test_flux_skip_residual_and_cosine_factors_follow_the_flow_predictor(flux, denoisers):
    run(flux)
    d = denoisers[0]
    ref, noise = d.reference, d.noise
    assert torch.allclose(d.noise_scaling(0.3, noise, ref), 0.7 * ref + 0.3 * noise, atol=1e-6)
    assert d.factors(0.5).cf == pytest.approx(cosine_factor(500.0))
    assert d.size_multiple == 2 and d.skip_scale is None  # flow: c_skip = 1


@pytest.mark.parametrize("mode", ["overlap", "shifted"])
def test_flux_windows_run_on_the_patch_grid(flux, denoisers, mode):
    # 80×48 px: a 10×6 latent, so the overlap grid's natural stride (5, 3) is odd
    # (grain 0: shifted windows on the patch grid, as first shipped; at the default grain 1 they
    # fall on any latent pixel and are padded to even sizes: tests/test_window_grain.py)
    _, _, out = run(flux, settings=AccDiffusionSettings(enabled=True, window_mode=mode, window_grain=0),
                    width=80, height=48)
    assert out.images[0].shape == (3, 96, 160)
    d = denoisers[0]
    assert d.stats.steps
    for step in range(d.stats.steps):
        assert all(w.top % 2 == 0 and w.left % 2 == 0 for w in d.windows_at(step))


def test_flux_img2img_probes_with_flow_noise(flux, monkeypatch):
    levels = []
    original = forge.ForgeBackend._joint_probe_call

    def spy(p, unet, recorder, conds, loaded, prepare, *more):
        call = original(p, unet, recorder, conds, loaded, prepare, *more)
        return lambda x, sigma: levels.append(float(sigma[0])) or call(x, sigma)

    monkeypatch.setattr(forge.ForgeBackend, "_joint_probe_call", staticmethod(spy))
    webui = DiTWebUIStandIn()
    webui.native = 64
    p = DiTImg2ImgStandIn(flux, webui, [PROMPT], [picture(64, 64)], width=128, height=128, adapter=facade)
    out = process_img2img(p, ON, facade)
    assert out.images[0].shape == (3, 128, 128)
    assert levels == pytest.approx([0.3, 0.5, 0.7])  # the flow time of the probe's timesteps
    assert p.comments == {}


# --- Chroma and SD 3.5: real CFG rows ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["chroma", "sd35"])
def test_cfg_models_uncond_rows_keep_their_own_conditioning(engines, family, stage_prompts, monkeypatch):
    model = engines[family]
    model.transformer.calls.clear()
    starts = []
    original = job_module.StageDenoiser
    monkeypatch.setattr(job_module, "StageDenoiser",
                        lambda *a, **k: starts.append(len(model.transformer.calls)) or original(*a, **k))
    _, _, out = run(model, prompts=[PROMPT], negative="blurry")
    assert out.images[0].shape == (3, 128, 128)
    (stage, windows, prompts), = stage_prompts
    negative = model.encode("blurry")
    negative = negative["crossattn"] if isinstance(negative, dict) else negative
    text = lambda c: c["crossattn"] if isinstance(c, dict) else c
    tiles = [text(model.encode(t)) for t in set(prompts[0]) | {PROMPT}]  # dilated sub-latents: the full prompt
    stage_calls = model.transformer.calls[starts[0]:]
    rows = [row for call in stage_calls for row in call["context"]]
    # Chroma's T5 is not padded: rows of other lengths come in calls of their own (by_text_length)
    assert all(len({row.shape[0] for row in call["context"]}) == 1 for call in stage_calls)
    # Forge hands a call its rows repeated to a common token count (condition.py concat: lcm); a
    # row keeps that, a tile row has its tile prompt's own length
    repeats = lambda r, t: r.shape[0] % t.shape[0] == 0 and torch.equal(r, t.repeat(r.shape[0] // t.shape[0], 1))
    uncond = [r for r in rows if repeats(r, negative)]
    cond = [r for r in rows if any(repeats(r, t) for t in tiles)]
    assert len(uncond) == len(cond) == len(rows) // 2  # [uncond, cond] per window and sub-latent
    first_call = stage_calls[0]
    if family == "sd35":  # the position table cropped for the window's own size (mmditx.py:867-886)
        h, w = first_call["shape"][-2:]
        assert first_call["crop"] == ((32 - h // 2) // 2, (32 - w // 2) // 2)


@pytest.mark.parametrize("family", ["chroma", "sd35"])
def test_cfg_models_img2img(engines, family):
    model = engines[family]
    webui = DiTWebUIStandIn()
    webui.native = 64
    p = DiTImg2ImgStandIn(model, webui, [PROMPT, "a green dragon"], [picture(64, 64)], width=128, height=128,
                          adapter=facade)
    out = process_img2img(p, ON, facade)
    assert [im.shape for im in out.images] == [(3, 128, 128)] * 2
    assert all(bool(torch.isfinite(im).all()) for im in out.images)


def test_flux_upscale_button_probes_the_image(flux, stage_prompts):
    webui = DiTWebUIStandIn()
    webui.native = 64
    p = DiTTxt2ImgStandIn(flux, webui, [PROMPT])
    p.firstpass_image = picture(64, 64)
    out = process_images(p, ON, facade)
    assert out.images[0].shape == (3, 128, 128)
    assert stage_prompts and stage_prompts[0][2][0]  # probe maps gave the windows tile prompts
    assert flux.forge_objects.unet.model_options.get("model_function_wrapper") is None


def test_timestep_samplers_step_aside_on_flow_models_only():
    """DDIM & co. are served for SD (issue 19) but not on a flow predictor: the facade says so
    before anything is hooked; k-diffusion samplers and SD models are not affected."""
    from types import SimpleNamespace

    from accdiffusion.entry.facade import flow_sampler_reason
    from accdiffusion.method.flow import FLOW_SAMPLING, SD_SAMPLING

    webui = SimpleNamespace(sampler_kind=lambda name: "timesteps" if name in {"DDIM", "UniPC"} else "k-diffusion")
    flow, sd = (SimpleNamespace(model_sampling=lambda p, s=s: s) for s in (FLOW_SAMPLING, SD_SAMPLING))
    p = SimpleNamespace(sampler_name="Euler", hr_sampler_name="DDIM")
    assert "'DDIM' is a timestep sampler" in flow_sampler_reason(p, flow, webui, img2img=False)
    assert flow_sampler_reason(p, sd, webui, img2img=False) is None
    assert flow_sampler_reason(p, flow, webui, img2img=True) is None  # img2img samples with sampler_name
    p = SimpleNamespace(sampler_name="UniPC", hr_sampler_name="Use same sampler")
    assert "'UniPC'" in flow_sampler_reason(p, flow, webui, img2img=False)


def test_flow_stage_outputs_take_the_first_pass_statistics_per_channel(flux, stage_output_stats):
    """A flow model's stage output gets the first pass's mean and std per channel (measured on the
    flow toy: `toy stats --model flow`); SD keeps one mean and std per image."""
    seen, per_channel_of = stage_output_stats
    run(flux, hr_scale=3.0)
    assert len(seen) == 2 and len(per_channel_of) == 1
    first = per_channel_of[0]  # the first pass's latent
    assert first.shape[:2] == (1, 16)
    for mean, std, out in seen:
        assert mean.shape == std.shape == (1, 16, 1, 1)
        assert torch.allclose(out.float().mean((2, 3)), first.mean((2, 3)), atol=1e-4)
        assert torch.allclose(out.float().std((2, 3)), first.std((2, 3)), rtol=1e-3)


def test_sd_stage_outputs_keep_per_image_statistics(forge_sd1, stage_output_stats):
    from forge_standins import ForgeTxt2ImgStandIn, ForgeWebUIStandIn

    seen, per_channel_of = stage_output_stats
    webui = ForgeWebUIStandIn()
    process_images(ForgeTxt2ImgStandIn(forge_sd1, webui, [PROMPT], adapter=facade, hr_scale=2.0), ON, facade)
    assert seen and not per_channel_of
    assert all(mean.shape == (1, 1, 1, 1) for mean, _, _ in seen)
