"""The backend is chosen by what the host has (Forge 2 / Neo, old Forge, A1111, none), and the
Forge backend runs on each Forge-lineage host's own building blocks (tests/oldforge_standins.py)."""

import sys
import types

import pytest
import torch

from accdiffusion.backends import forge
from accdiffusion.entry import facade
from accdiffusion.flows.txt2img import begin_hires_pass
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import assert_hooks_removed as assert_clean
from a1111_standins import process_images
from forge_standins import ForgeTxt2ImgStandIn, ForgeWebUIStandIn
from oldforge_standins import (FORGE2_MODULES, NeoModelStandIn, OldForgeModelStandIn, old_forge_host,  # noqa: F401
                               old_forge_modules)

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")  # the window-sized estimates are plain at this size
PROMPT = "a red-haired astronaut riding a horse on the moon"


def run(model, **kw):
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(model, webui, adapter=facade, prompts=[PROMPT, "a green dragon"], **kw)
    return p, webui, process_images(p, ON, facade)


# --- which backend ------------------------------------------------------------------------------
def test_forge2_building_blocks_are_found(forge_backend):
    parts = forge.detect_forge_parts()
    assert parts is not None and "backend.*" in parts.name
    assert facade.host_backends().name.startswith("the Forge backend (Forge 2 / Neo")


def test_old_forge_building_blocks_are_found_when_backend_is_absent(old_forge_host):
    parts = forge.detect_forge_parts()
    assert parts is not None and "ldm_patched" in parts.name
    q = k = v = torch.randn(2, 5, 8)
    parts.attention(q, k, v, 2, {"attn_precision": torch.float32})
    assert old_forge_host["ldm_patched.ldm.modules.attention"].precisions == [torch.float32]  # reForge's


def test_classic_attention_gets_no_precision(monkeypatch):
    for name in FORGE2_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    mods = old_forge_modules(with_precision=False)
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    parts = forge.detect_forge_parts()
    q = torch.randn(1, 4, 8)
    parts.attention(q, q, q, 2, {"attn_precision": torch.float32})
    assert mods["ldm_patched.ldm.modules.attention"].precisions == ["none"]


def test_a_host_with_none_of_the_building_blocks_gets_a_note_and_stock_behaviour(forge_sd1, monkeypatch, capsys):
    for name in FORGE2_MODULES + ("ldm_patched", "ldm_patched.ldm.modules.attention", "modules_forge",
                                  "modules_forge.forge_sampler", "ldm", "ldm.modules.diffusionmodules.openaimodel",
                                  "sgm", "sgm.modules.diffusionmodules.openaimodel"):
        monkeypatch.setitem(sys.modules, name, None)
    facade.host_backends.cache_clear()
    try:
        assert facade.host_backends().name is None
        assert "not one AccDiffusion knows" in facade.unknown_host_note()
        logger = facade.log
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))  # announce_host may add one: undone
        monkeypatch.setattr(logger, "propagate", logger.propagate)
        monkeypatch.setattr(logger, "level", logger.level)
        facade.announce_host()
        assert "not one AccDiffusion knows" in capsys.readouterr().out
        webui = ForgeWebUIStandIn()
        p = ForgeTxt2ImgStandIn(forge_sd1, webui, adapter=facade, prompts=[PROMPT])
        out = process_images(p, ON, facade)
        assert out.images[0].shape == (3, p.hr_upscale_to_y, p.hr_upscale_to_x)
        assert any("not one AccDiffusion knows" in c for c in p.comments)
        assert p.extra_generation_params["AccDiffusion stepped aside"].startswith("this WebUI is not one")
        assert "AccDiffusion" not in p.extra_generation_params
        assert not webui.encoded  # no tile prompt: the stock hires pass ran
        assert_clean(p, forge_sd1, webui)
    finally:
        facade.host_backends.cache_clear()


def test_a_model_of_forge_on_a_host_without_its_building_blocks_steps_aside(forge_sd1, monkeypatch):
    monkeypatch.setattr(facade, "host_backends", lambda: facade.HostBackends(None, "AUTOMATIC1111 building blocks"))
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(forge_sd1, webui, adapter=facade, prompts=[PROMPT])
    assert facade.start_job(p, ON, webui=webui) is None
    assert "not one AccDiffusion knows" in p.extra_generation_params["AccDiffusion stepped aside"]


# --- old Forge (Forge Classic, reForge) ---------------------------------------------------------
@pytest.fixture(scope="module")
def old_sd1(sd1_host):
    return OldForgeModelStandIn(sd1_host, sdxl=False)


@pytest.fixture(scope="module")
def old_sdxl(sdxl_host):
    return OldForgeModelStandIn(sdxl_host, sdxl=True)


@pytest.mark.parametrize("name", ["old_sd1", "old_sdxl"])
def test_old_forge_serves_the_hires_pass_on_its_own_blocks(request, old_forge_host, name):
    model = request.getfixturevalue(name)
    model.kmodel.memory_calls.clear()
    p, webui, out = run(model, width=64, height=64, hr_scale=2.0)
    assert [im.shape for im in out.images] == [(3, 128, 128)] * 2
    assert p.extra_generation_params.get("AccDiffusion") is True, p.extra_generation_params
    assert webui.encoded  # maps recorded through the attn2 patches on ldm_patched's attention
    assert old_forge_host["ldm_patched.ldm.modules.attention"].precisions  # the recording ran through it
    # the batching's estimate asked with window-sized shapes, with reForge's cond_shapes passed on
    last = model.kmodel.memory_calls[-1]
    assert last[2] * last[3] < 16 * 16
    assert model.kmodel.cond_shapes_seen[-1] == {"c_crossattn": []}  # a hires call, cond_shapes passed on
    assert_clean(p, model, webui)


def test_old_forge_sdxl_base_is_served_and_the_refiner_named(sdxl_host, old_forge_host):
    base = OldForgeModelStandIn(sdxl_host, sdxl=True)
    refiner = OldForgeModelStandIn(sdxl_host, sdxl=True, refiner=True)
    parts = forge.detect_forge_parts()
    p = types.SimpleNamespace(sd_model=base)
    assert forge.ForgeBackend(parts).unsupported_reason(p) is None
    assert forge.ForgeBackend(parts).unsupported_reason(types.SimpleNamespace(sd_model=refiner)) == \
        "the SDXL refiner model is not supported"


def test_old_forge_predictor_from_model_sampling(old_sd1):
    predictor = forge.model_predictor(old_sd1.forge_objects.unet)
    assert predictor.prediction_type == "epsilon"
    assert torch.equal(predictor.sigmas, old_sd1.kmodel.model_sampling.sigmas)
    sigma = predictor.sigmas[10:11]
    assert int(predictor.timestep(sigma)) == 10
    from oldforge_standins import ModelType

    old_sd1.kmodel.model_type = ModelType.V_PREDICTION
    try:  # a v-prediction model gets the dilated branch's c_skip, as on Forge 2
        assert forge.model_predictor(old_sd1.forge_objects.unet).prediction_type == "v_prediction"
        assert forge.ForgeBackend(None).skip_scale(types.SimpleNamespace(sd_model=old_sd1)) is not None
    finally:
        old_sd1.kmodel.model_type = ModelType.EPS


def test_reforge_controlnet_gets_the_transformer_options():
    """reForge's get_control takes the call's transformer_options (controlnet.py:217); Forge 2's,
    Neo's and Classic's do not. An instance wrapper of another extension is called the host's way."""
    calls = []

    class ReForgeControl:
        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            calls.append(("reforge", batched_number, transformer_options))

    class ClassicControl:
        def get_control(self, x_noisy, t, cond, batched_number):
            calls.append(("classic", batched_number))

    cond = {"transformer_options": {"cond_or_uncond": [1, 0]}}
    x, sigma = torch.zeros(2, 4, 8, 8), torch.ones(2)
    for head in (ReForgeControl(), ClassicControl()):
        wrapped = lambda *args, _head=head: _head.get_control(*args)  # noqa: E731
        forge.evaluate_control(head, wrapped, x, sigma, cond, 2)
    assert calls == [("reforge", 2, {"cond_or_uncond": [1, 0]}), ("classic", 2)]


# --- Forge Neo ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def neo_sd1(sd1_host):
    return NeoModelStandIn(sd1_host, sdxl=False)


def test_neo_patcher_answers_for_the_windows_without_a_peak_modifier(forge_backend, neo_sd1):
    neo_sd1.kmodel.memory_calls.clear()
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(neo_sd1, webui, adapter=facade, prompts=[PROMPT], width=64, height=64, hr_scale=2.0)
    p.hr_distilled_cfg = 3.0
    process_images(p, ON, facade)
    assert p.extra_generation_params.get("AccDiffusion") is True
    calls = neo_sd1.kmodel.memory_calls
    hires = calls[p.steps:]  # the first pass asks once a step, the hires stage's calls follow
    assert hires and all(s[2] * s[3] < 16 * 16 for s in hires), calls  # windows, never the 16×16 latent
    assert neo_sd1.shifts == [3.0]  # the hires pass's shift, as Neo's own sample_hr_pass sets it
    assert_clean(p, neo_sd1, webui)


def test_neo_hires_pass_writes_the_hires_infotext_and_shift():
    """Neo writes the hires fields in sample_hr_pass (processing.py:1435-1454), which the tiled pass
    replaces; A1111 / Forge 2 wrote them in init, and then nothing is added."""
    model = types.SimpleNamespace(shifts=[], use_distilled_cfg_scale=True, use_shift=False)
    model.set_shift = lambda shift: model.shifts.append(shift)
    p = types.SimpleNamespace(sd_model=model, extra_generation_params={"AccDiffusion": True}, hr_distilled_cfg=3.5,
                              hr_sampler_name="DPM++ 2M", sampler_name="Euler", hr_scheduler=None, scheduler="Automatic",
                              hr_upscaler="None", hr_second_pass_steps=10, denoising_strength=0.55, hr_cfg=6.0,
                              get_hr_prompt=lambda: "hr", get_hr_negative_prompt=lambda: "")
    begin_hires_pass(p)
    params = p.extra_generation_params
    assert model.shifts == [3.5]
    assert params["Denoising strength"] == 0.55 and params["Hires upscaler"] == "None"
    assert params["Hires CFG Scale"] == 6.0 and params["Hires Distilled CFG Scale"] == 3.5
    assert params["Hires sampler"] == "DPM++ 2M" and params["Hires steps"] == 10
    assert "Hires schedule type" not in params and "Hires Shift" not in params
    assert params["Hires prompt"] is p.get_hr_prompt  # read when the infotext is written, as Neo's
    forge2 = dict(params)
    begin_hires_pass(p)  # the second batch: written once
    assert p.extra_generation_params == forge2
    a1111 = types.SimpleNamespace(sd_model=object(), extra_generation_params={"Denoising strength": 0.5})
    begin_hires_pass(a1111)
    assert a1111.extra_generation_params == {"Denoising strength": 0.5}


def test_learned_conditioning_follows_the_hosts_signature():
    from accdiffusion.flows.webui import WebUI
    import contextlib

    seen = []

    def neo(model, prompts, steps, hires_steps=None):  # Neo prompt_parser.py:163
        seen.append(("neo", steps, hires_steps))
        return []

    def a1111(model, prompts, steps, hires_steps=None, use_old_scheduling=False):  # A1111 prompt_parser.py
        seen.append(("a1111", steps, hires_steps, use_old_scheduling))
        return []

    for function, opts in ((neo, types.SimpleNamespace()), (a1111, types.SimpleNamespace(use_old_scheduling=True))):
        webui = object.__new__(WebUI)
        webui.prompt_parser = types.SimpleNamespace(get_learned_conditioning=function,
                                                    SdConditioning=lambda prompts, width, height: prompts)
        webui.sd_samplers = types.SimpleNamespace(find_sampler_config=lambda name: None)
        webui.shared = types.SimpleNamespace(opts=opts)
        webui.devices = types.SimpleNamespace(autocast=contextlib.nullcontext)
        p = types.SimpleNamespace(hr_sampler_name=None, sampler_name="Euler", hr_second_pass_steps=6, steps=20,
                                  firstpass_steps=20, sd_model=None)
        webui.learned_conditioning(p, ["a cat"], 64, 64)
    assert seen == [("neo", 20, 6), ("a1111", 20, 6, True)]


def test_flux2_klein_is_never_served_as_flux1(forge_backend):
    """Neo's Flux.2 runs Flux's class with one shared modulation and a Qwen3 encoder."""
    transformer = torch.nn.Module()
    transformer.double_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1)])
    transformer.global_modulation = True
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=transformer))
    Flux2 = type("Flux2", (), {})
    klein = Flux2()
    klein.forge_objects = types.SimpleNamespace(unet=unet)
    klein.text_processing_engine_gemma = object()
    reason = forge.ForgeBackend(forge.detect_forge_parts()).unsupported_reason(types.SimpleNamespace(sd_model=klein))
    assert reason and reason.startswith("Flux2 models are not supported")
    transformer.global_modulation = False
    klein.text_processing_engine_t5 = object()  # a Flux.1 with its T5: served
    assert forge.ForgeBackend(None).unsupported_reason(types.SimpleNamespace(sd_model=klein)) is None


def test_a_joint_transformer_on_the_old_backend_steps_aside(old_sd1):
    """reForge loads SD 3 into ldm_patched's MMDiT (model_sampling, no predictor): not served."""
    transformer = torch.nn.Module()
    transformer.joint_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1)])
    unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=transformer,
                                                             model_sampling=old_sd1.kmodel.model_sampling))
    sd3 = type("StableDiffusion3", (), {})()
    sd3.forge_objects = types.SimpleNamespace(unet=unet)
    sd3.text_processing_engine_t5 = object()
    reason = forge.ForgeBackend(None).unsupported_reason(types.SimpleNamespace(sd_model=sd3))
    assert reason == "StableDiffusion3 models are not supported on the old Forge backend (SD 1.x, SD 2.x and SDXL are)"
