"""Engine features wired through the job and both adapters (A1111 and Forge stand-ins, real ldm
UNet and k-diffusion samplers): shifted windows with tile prompts cut from the windows actually
denoised, the automatic tile batch (one per job, Forge's free memory, Forge's memory estimate),
the last stage re-standardised before decoding, and the v-prediction skip scale.

The tiny UNet barely reacts to a prompt, so these tests spy on what reaches the model: the rows of
every hires UNet call (``Host._eps``, where both hosts end up) next to the items the stage
denoiser says the call holds (``StageDenoiser.items``: the window of each batch row)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from accdiffusion.backends import a1111, forge
from accdiffusion.entry import facade
from accdiffusion.method import hires
from accdiffusion.flows import img2img as img2img_flow, txt2img as txt2img_flow
from accdiffusion.method.batching import CPU_TILE_BATCH, AutoTileBatch, fit_tile_batch
from accdiffusion.method.hires import latent_stats, restandardise
from accdiffusion.method.prompts import ImagePromptPlan, WordMasks
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.tiles import nearest_window
from accdiffusion.method.words import split_words

from a1111_standins import (Img2ImgStandIn, StandInModel, Txt2ImgStandIn, WebUIStandIn, picture, process_images,
                            process_img2img)
from forge_standins import ForgeImg2ImgStandIn, ForgeModelStandIn, ForgeTxt2ImgStandIn, ForgeWebUIStandIn

PROMPT = "a red-haired astronaut riding a horse on the moon"
NEGATIVE = "blurry photo"
# 64 px first pass (8×8 latent) → 256 px (32×32) in one stage, 16×16 windows: the shifted grid moves
# by 0 or 8 latent px per step, so windows (0, 16) and (0, 24)+(24, 8) alternate
SHIFTED = AccDiffusionSettings(enabled=True, window_mode="shifted", window_size=16, progressive=False,
                               dilated_sampling=False)
GEOMETRY = dict(width=64, height=64, hr_scale=4.0, hr_steps=4)
POSITIVE_ROW = {"a1111": 0, "forge": 1}  # the CFG row of the image's positive prompt (Forge: [uncond, cond])


pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def models(sd1_host):
    return {"a1111": StandInModel(sd1_host, sdxl=False), "forge": ForgeModelStandIn(sd1_host, sdxl=False)}


def txt2img(host, model, **kw):
    if host == "a1111":
        webui = WebUIStandIn()
        return Txt2ImgStandIn(model, webui, negative=NEGATIVE, **{**GEOMETRY, **kw}), webui
    webui = ForgeWebUIStandIn()
    return ForgeTxt2ImgStandIn(model, webui, adapter=facade, negative=NEGATIVE, **{**GEOMETRY, **kw}), webui


def img2img(host, model, **kw):
    webui = ForgeWebUIStandIn() if host == "forge" else WebUIStandIn()
    webui.native = 64  # the probe (the "first pass") at 64 px: 8×8 latent, as the txt2img case
    cls = ForgeImg2ImgStandIn if host == "forge" else Img2ImgStandIn
    extra = {"adapter": facade} if host == "forge" else {}
    kw = {"width": 256, "height": 256, "steps": 4, **kw}
    return cls(model, webui, [PROMPT], [picture(64, 64)], negative=NEGATIVE, **kw, **extra), webui


def region_plan(prompt: str = PROMPT) -> ImagePromptPlan:
    """Words placed by hand on an 8×8 map, so windows at different places get different prompts:
    "astronaut" the left half, "horse" the top quarter, "moon" the bottom-right corner; the other
    words have no map (kept everywhere)."""
    words = split_words(prompt)
    masks = torch.zeros(len(words), 8, 8, dtype=torch.bool)
    located = torch.zeros(len(words), dtype=torch.bool)
    regions = {"astronaut": (slice(0, 8), slice(0, 4)), "horse": (slice(0, 2), slice(0, 8)),
               "moon": (slice(6, 8), slice(6, 8))}
    for i, word in enumerate(words):
        if word.text in regions:
            masks[i][regions[word.text]] = True
            located[i] = True
    return ImagePromptPlan(prompt, list(words), WordMasks(masks, located))


@pytest.fixture
def plans(monkeypatch):
    """Every image with maps gets :func:`region_plan` (txt2img and img2img)."""
    def image_plans(p, job, maps):
        return [region_plan(p.hr_prompts[i] if getattr(p, "hr_prompts", None) else prompt)
                for i, prompt in enumerate(p.prompts)]

    monkeypatch.setattr(txt2img_flow, "image_plans", image_plans)
    monkeypatch.setattr(img2img_flow, "image_plans", image_plans)


@pytest.fixture
def calls(monkeypatch, denoisers):
    """Per hires UNet call: the denoiser's items (window per batch row) and the rows' contexts."""
    seen = []

    def watch(p, model):
        real = model.host._eps

        def eps(x, t, conds):
            if p.is_hr_pass or getattr(p, "init_images", None) is not None and denoisers:
                items = denoisers[-1].items
                seen.append((items, [c.context.clone() for c in conds]))
            return real(x, t, conds)

        monkeypatch.setattr(model.host, "_eps", eps)

    seen_watch = SimpleNamespace(calls=seen, watch=watch)
    return seen_watch


def expected_prompt(plan: ImagePromptPlan, denoiser, window) -> str:
    """The tile prompt of one window as the overlap schedule's own cut computes it."""
    return plan.tile_prompts(denoiser.stage.size, [window], denoiser.settings.patch_prompt_threshold)[0]


def check_windows_got_their_prompts(host, model, denoiser, calls, encoded):
    """Every local item of every call: the positive row carries exactly its window's prompt, the
    negative row the negative prompt. Returns the (window, prompt) pairs seen."""
    plan = region_plan()
    negative = model.encode(NEGATIVE)
    pairs = set()
    for items, contexts in calls:
        assert items is not None and items.kind == "local" and len(items) == len(contexts)
        for window, row, context in zip(items.slots, items.rows, contexts):
            if row == POSITIVE_ROW[host]:
                prompt = expected_prompt(plan, denoiser, window)
                assert torch.equal(context, model.encode(prompt).to(context)), (window, prompt)
                pairs.add((window, prompt))
            else:
                assert torch.equal(context, negative.to(context))
    # a real check: the windows moved, their prompts differ, and some shifted window's prompt is not
    # the one of the overlap window it overlaps most (the approximate fallback would give that one)
    windows = {w for w, _ in pairs}
    assert len(windows) > len(denoiser.windows_at(0))
    assert len({p for _, p in pairs}) >= 3
    assert any(prompt != expected_prompt(plan, denoiser, denoiser.windows[nearest_window(w, denoiser.windows)])
               for w, prompt in pairs)
    # each distinct tile prompt encoded once in the job, and only prompts some window needed
    assert sorted(encoded) == sorted(set(encoded)) and set(encoded) == {p for _, p in pairs}
    return pairs


# 64 px → 288 px: a 36×36 latent, a multiple of neither 8 nor the 16-px window: the grid's pieces
# (16, 8, 12 or 8, 8, 20 latent px) change every step and edge windows are padded to a multiple of 8
UNEVEN = dict(width=64, height=64, hr_scale=4.5)


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("geometry", ["even", "uneven"])
def test_shifted_txt2img_tile_prompts_follow_the_windows_of_each_step(models, plans, denoisers, calls, host, geometry):
    model = models[host]
    p, webui = txt2img(host, model, prompts=[PROMPT], **(UNEVEN if geometry == "uneven" else {}))
    calls.watch(p, model)
    out = process_images(p, SHIFTED, facade)
    assert out.images[0].shape == ((3, 256, 256) if geometry == "even" else (3, 288, 288))
    assert len(denoisers) == 1 and denoisers[0].stats.steps == 4
    check_windows_got_their_prompts(host, model, denoisers[0], calls.calls, webui.encoded)
    if geometry == "uneven":  # padded edge windows took part, each with the prompt of its own (unpadded) window
        assert any(any(items.pad) for items, _ in calls.calls)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_shifted_img2img_tile_prompts_follow_the_windows_of_each_step(models, plans, denoisers, calls, host):
    model = models[host]
    p, webui = img2img(host, model)
    calls.watch(p, model)
    out = process_img2img(p, SHIFTED, facade)
    assert out.images[0].shape == (3, 256, 256)
    assert len(denoisers) == 1
    check_windows_got_their_prompts(host, model, denoisers[0], calls.calls, webui.encoded)


def test_shifted_is_reproducible_and_differs_from_overlap(models):
    model = models["a1111"]
    run = lambda settings: process_images(txt2img("a1111", model, prompts=[PROMPT], hr_steps=2)[0], settings,
                                          facade).images[0]
    a, b = run(SHIFTED), run(SHIFTED)
    overlap = run(SHIFTED.replace(window_mode="overlap"))
    assert torch.equal(a, b) and not torch.allclose(a, overlap)


def test_shifted_each_distinct_prompt_encoded_once_across_stages(models, plans, denoisers):
    """Progressive 64 → 256 px: stages at 2×, 3×, 4× share the batch's encode cache."""
    p, webui = txt2img("a1111", models["a1111"], prompts=[PROMPT], hr_steps=2)
    process_images(p, SHIFTED.replace(progressive=True), facade)
    assert len(denoisers) == 3
    assert webui.encoded and sorted(webui.encoded) == sorted(set(webui.encoded))


class NetworkParams:
    """extra_networks.ExtraNetworkParams: compared by its items."""

    def __init__(self, items):
        self.items = list(items)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_each_distinct_tile_prompt_encoded_once_per_job_across_batches(models, plans, host):
    """Batch count 2, same prompt and networks: the second batch encodes nothing new; a batch that
    activates another LoRA (wildcards) gets its tile prompts encoded again, under that LoRA.
    (overlap windows: both batches need the same tile prompts)"""
    overlap = SHIFTED.replace(window_mode="overlap")
    def networks(per_batch):
        def parse(p, n):
            p.extra_network_data = {"lora": [NetworkParams(per_batch[n])]}
        return parse

    p, webui = img2img(host, models[host])
    process_img2img(p, overlap, facade, n_iter=2, parse_prompts=networks([["a", "1"], ["a", "1"]]))
    once = list(webui.encoded)
    assert len(once) >= 3 and sorted(once) == sorted(set(once))

    p, webui = img2img(host, models[host])
    process_img2img(p, overlap, facade, n_iter=2, parse_prompts=networks([["a", "1"], ["b", "0.5"]]))
    assert sorted(webui.encoded) == sorted(once + once)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_shifted_tile_prompt_map_shows_the_last_steps_windows(models, plans, denoisers, monkeypatch, host):
    from accdiffusion.method import tilemap

    drawn = []
    draw = tilemap.draw_tile_prompt_map
    monkeypatch.setattr(tilemap, "draw_tile_prompt_map",
                        lambda source, windows, prompts, size, **kw: drawn.append((list(windows), list(prompts)))
                        or draw(source, windows, prompts, size, **kw))  # pixels_per_latent= since ebd80fe
    p, webui = txt2img(host, models[host], prompts=[PROMPT])
    out = process_images(p, SHIFTED.replace(tile_prompt_map=True), facade)
    assert len(out.images) == 2
    (windows, prompts), = drawn
    den = denoisers[-1]
    assert den.windows_at(den.stats.steps - 1) != den.windows_at(0)  # (seed 1: the grid moved by then)
    assert windows == den.windows_at(den.stats.steps - 1)
    assert sum(w.height * w.width for w in windows) == 32 * 32  # a tiling: no overlap, nothing left out
    assert prompts == [expected_prompt(region_plan(), den, w) for w in windows]


# --- automatic tile batch -------------------------------------------------------------------------
WINDOW_COST = 100 * 2**20
BATCH_OF_3 = int((512 * 2**20 + 3.5 * WINDOW_COST) / 0.8)  # free memory in which 3 windows fit


def cuda_like(**kwargs):
    """An AutoTileBatch that behaves as on CUDA: each new window shape measured (a fixed cost)."""
    return AutoTileBatch(applies=lambda device: True, peak_of=lambda run, device: (run(), WINDOW_COST),
                         **{"free_bytes": lambda device: BATCH_OF_3, **kwargs})


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_automatic_tile_batch_is_resolved_once_per_job_and_logged(models, denoisers, caplog, host):
    p, webui = txt2img(host, models[host], prompts=[PROMPT], hr_scale=3.0, width=64, height=64, hr_steps=2)
    with caplog.at_level(logging.INFO, logger="accdiffusion"):
        process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)  # tile_batch_size 0, progressive: 2 stages
    assert len(denoisers) == 2 and denoisers[0].auto_batch is denoisers[1].auto_batch is not None
    assert all(d.stats.tile_batch == CPU_TILE_BATCH for d in denoisers)  # on a CPU: a fixed small batch
    logged = [r.getMessage() for r in caplog.records if "windows per UNet call" in r.getMessage()]
    assert len(logged) == 2 and all(f"{CPU_TILE_BATCH} windows per UNet call (automatic)" in m for m in logged)
    assert "AccDiffusion tile batch size" not in p.extra_generation_params  # automatic: not in the infotext


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_automatic_tile_batch_from_measured_memory_reaches_the_calls_and_forges_estimate(
        models, denoisers, monkeypatch, caplog, host):
    from backend import memory_management

    model = models[host]
    monkeypatch.setattr(a1111, "AutoTileBatch", cuda_like)
    monkeypatch.setattr(forge, "AutoTileBatch", cuda_like)  # gets Forge's own free-memory query
    monkeypatch.setattr(memory_management, "free", BATCH_OF_3)
    memory_management.asked.clear()
    p, webui = txt2img(host, model, prompts=[PROMPT], hr_scale=2.0, width=128, height=128, hr_steps=2)
    if host == "forge":
        model.kmodel.memory_calls.clear()
    with caplog.at_level(logging.INFO, logger="accdiffusion"):
        process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap", dilated_sampling=False), facade)
    assert fit_tile_batch(BATCH_OF_3, WINDOW_COST) == 3
    den, = denoisers
    assert den.stats.tile_batch == 3 and den.auto_batch.chosen and set(den.auto_batch.chosen.values()) == {3}
    assert any("3 windows per UNet call (automatic)" in r.getMessage() for r in caplog.records)
    if host == "forge":
        assert memory_management.asked  # free memory as Forge counts it
        # Forge's per-step estimate: 3 windows × (cond + uncond) rows, window-sized
        assert model.kmodel.memory_calls[-1] == [3 * 2, 4, 16, 16]
    else:
        assert not memory_management.asked


def test_forge_memory_estimate_uses_the_set_batch_and_the_infotext_names_it(models):
    model = models["forge"]
    model.kmodel.memory_calls.clear()
    p, webui = txt2img("forge", model, prompts=[PROMPT, PROMPT], hr_scale=2.0, hr_steps=2)
    process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=3), facade)
    assert model.kmodel.memory_calls[-1][0] == 3 * 2 * 2  # windows × (cond + uncond) × images
    assert p.extra_generation_params["AccDiffusion tile batch size"] == 3


# --- the last stage re-standardised before decoding ------------------------------------------------
@pytest.fixture
def stage_io(monkeypatch):
    from a1111_standins import KDiffusionSamplerStandIn

    seen = {"outs": [], "decoded": []}
    real = KDiffusionSamplerStandIn.sample_img2img

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        out = real(self, p, x, noise, c, uc, steps=steps, image_conditioning=image_conditioning)
        seen["outs"].append(out.clone())
        return out

    monkeypatch.setattr(KDiffusionSamplerStandIn, "sample_img2img", sample_img2img)
    return seen


def watch_decode(webui, seen):
    decode_batch = webui.decode_batch
    webui.decode_batch = lambda m, z: seen["decoded"].append(z.clone()) or decode_batch(m, z)


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("flow", ["txt2img", "img2img"])
def test_last_stage_is_restandardised_before_decoding(models, stage_io, host, flow):
    """txt2img: to the first pass's mean/std; img2img: to the init latent's (what the stage inputs
    are standardised to)."""
    model = models[host]
    settings = AccDiffusionSettings(enabled=True, window_mode="overlap")
    if flow == "txt2img":
        p, webui = txt2img(host, model, prompts=[PROMPT, "a green dragon"], hr_scale=3.0, hr_steps=2)
        watch_decode(webui, stage_io)
        process_images(p, settings, facade)
        reference = p.first_pass_latent
    else:
        p, webui = img2img(host, model, width=192, height=192, steps=2)
        watch_decode(webui, stage_io)
        process_img2img(p, settings, facade)
        reference = p.init_latent
    raw = stage_io["outs"][-1]
    final = stage_io["decoded"][-1]
    mean, std = latent_stats(reference.float())
    assert len(stage_io["outs"]) == 2  # two stages: 2×, 3×
    assert not torch.allclose(latent_stats(raw)[1], std, rtol=1e-4)  # the raw output drifted
    assert torch.allclose(final, restandardise(raw.float(), mean, std), atol=1e-5)
    assert torch.allclose(latent_stats(final)[1], std, rtol=1e-4)


# --- v-prediction ---------------------------------------------------------------------------------
@pytest.fixture
def c_skip_calls(monkeypatch):
    calls = []

    def spy(sigma, sigma_data=1.0):
        value = hires.v_prediction_c_skip(sigma, sigma_data)
        calls.append((sigma.clone(), sigma_data, value))
        return value

    monkeypatch.setattr(a1111, "v_prediction_c_skip", spy)
    monkeypatch.setattr(forge, "v_prediction_c_skip", spy)
    return calls


def v_model(host, sd1_host, flag):
    if host == "a1111":
        model = StandInModel(sd1_host, sdxl=False)
        if flag:
            model.parameterization = flag
    else:
        model = ForgeModelStandIn(sd1_host, sdxl=False)
        if flag:
            model.kmodel.predictor.prediction_type, model.kmodel.predictor.sigma_data = flag, 0.5
    return model


@pytest.mark.parametrize("host,flag,sigma_data", [("a1111", "v", 1.0), ("forge", "v_prediction", 0.5),
                                                  ("forge", "edm", 0.5)])
def test_v_prediction_skip_scale_reaches_the_dilated_branch(sd1_host, denoisers, c_skip_calls, host, flag,
                                                            sigma_data):
    model = v_model(host, sd1_host, flag)
    p, webui = txt2img(host, model, prompts=[PROMPT], width=64, height=64, hr_scale=2.0, hr_steps=2)
    process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    den, = denoisers
    assert den.skip_scale is not None
    # the dilated branch asked for c_skip at every step it ran, with the model's sigma_data
    dilated_steps = den.stats.steps - den.stats.skipped_dilated_evals // (den.stage.dilation ** 2 * 2)
    assert dilated_steps >= 1 and len(c_skip_calls) == dilated_steps
    assert all(sd == sigma_data and torch.allclose(v, sd ** 2 / (s ** 2 + sd ** 2)) for s, sd, v in c_skip_calls)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_eps_models_get_no_skip_scale(sd1_host, denoisers, c_skip_calls, host):
    model = v_model(host, sd1_host, None)
    p, webui = txt2img(host, model, prompts=[PROMPT], width=64, height=64, hr_scale=2.0, hr_steps=2)
    process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert denoisers[0].skip_scale is None and not c_skip_calls


def test_a1111_v_scale_is_the_v_wrappers_c_skip(sd1_host):
    """What A1111 samples a v-model with (CompVisVDenoiser) has exactly this c_skip; its ε wrapper's
    get_scalings()[0] is c_out, not c_skip (why the flag, not get_scalings, decides)."""
    from k_diffusion.external import CompVisDenoiser, CompVisVDenoiser

    model = v_model("a1111", sd1_host, "v")
    scale = a1111.A1111Backend().skip_scale(SimpleNamespace(sd_model=model))
    sigma = torch.tensor([0.3, 1.0, 7.0])
    assert torch.allclose(scale(sigma), CompVisVDenoiser(model).get_scalings(sigma)[0])
    assert not torch.allclose(scale(sigma), CompVisDenoiser(model).get_scalings(sigma)[0])
