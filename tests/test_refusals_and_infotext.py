"""Client errors and the infotext, through the job on the A1111 and Forge stand-ins.

Refused settings: every forbidden value of every setting (tests/bad_settings.py) stops the job
before anything is sampled with the host's client-error exception, which the WebUI's API turns
into HTTP 422 with the message and no traceback (stand-in of modules/api/api.py handle_exception),
the UI into "AccDiffusionSettingsError: <message>"; one line in the console; the host stays ready.

Step-asides: whatever makes AccDiffusion step aside (model, refiner, another tiler, sampler, sizes,
inpainting; at the start of the job or at its sampling) leaves no ``AccDiffusion: True`` nor any
setting key in the infotext, but ``AccDiffusion stepped aside: <why>; the WebUI's own <pass> ran``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from accdiffusion.entry import facade, surfaces
from accdiffusion.flows.webui import refusal_class
from accdiffusion.method.hires import AccDiffusionError
from accdiffusion.method.settings import STEP_ASIDE_KEY, AccDiffusionSettings, SettingsError

from a1111_standins import (HTTPExceptionStandIn, Img2ImgStandIn, ScriptsStandIn, Txt2ImgStandIn, WebUIStandIn,
                            api_handle_exception, gradio_error_message, picture, process_images, process_img2img)
from a1111_standins import assert_hooks_removed as assert_clean
from bad_settings import case_id, cases
from forge_standins import ForgeImg2ImgStandIn, ForgeModelStandIn, ForgeTxt2ImgStandIn, ForgeWebUIStandIn

PROMPT = "a red-haired astronaut riding a horse on the moon"
CASES = cases()

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def forge_model(sd1_host):
    return ForgeModelStandIn(sd1_host, sdxl=False)


def glue_process(p, args, webui):
    """scripts/accdiffusion.py ``process``: settings from the script args, or the job refused."""
    try:
        settings = surfaces.job_settings(args, None)
    except SettingsError as error:
        if surfaces.requested_enabled(args, None):
            facade.fail_job(p, error, webui=webui)
        return
    if settings.enabled:
        facade.start_job(p, settings, webui=webui)


def refused(p, webui, args):
    """Run the job as the WebUI does until p.sample raises; the exception."""
    glue_process(p, args, webui)
    facade.before_batch(p)
    with pytest.raises(AccDiffusionError) as caught:
        p.sample(conditioning=p.conds(p.prompts), unconditional_conditioning=p.conds([""], negative=True),
                 seeds=p.seeds, subseeds=p.seeds, subseed_strength=0.0, prompts=p.prompts)
    return caught.value


def test_the_cases_cover_every_setting():
    from accdiffusion.method.settings import FIELDS

    assert {name for name, _ in CASES} >= {f.name for f in FIELDS}
    assert len(CASES) >= 86  # what was tried from outside (issue 19)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_every_forbidden_value_is_a_client_error(sd1_model, case, caplog):
    name, settings = case
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    with caplog.at_level(logging.WARNING, logger="accdiffusion"):
        error = refused(p, webui, [settings])
    status, body, traceback_printed = api_handle_exception(error)
    assert status == 422 and not traceback_printed
    assert f"'{name}'" in body["detail"] and body["detail"] == body["errors"] == str(error)
    assert gradio_error_message(error) == f"AccDiffusionSettingsError: {body['detail']}"
    lines = [r for r in caplog.records if r.name == "accdiffusion"]
    assert len(lines) == 1 and f"'{name}'" in lines[0].getMessage()
    assert webui.steps_done == 0 and "sample" not in p.__dict__  # nothing sampled, the hook undone


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_refused_img2img_and_positional_args(sd1_model, forge_model, forge):
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    if forge:
        p = ForgeImg2ImgStandIn(forge_model, webui, [PROMPT], [picture(64, 64)], width=128, height=128, adapter=facade)
    else:
        p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], width=128, height=128)
    p.init()
    p.rng = None
    error = refused(p, webui, [True, True, 1.5])  # positional, as the UI sends them: the threshold
    status, body, traceback_printed = api_handle_exception(error)
    assert status == 422 and not traceback_printed and "'patch_prompt_threshold'" in body["detail"]


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_the_host_is_ready_after_a_refusal(sd1_model, forge_model, forge):
    """A refused job changes nothing: the next job gives the image it gave before."""
    def good():
        webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
        p = (ForgeTxt2ImgStandIn(forge_model, webui, adapter=facade, prompts=[PROMPT]) if forge else
             Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT]))
        out = process_images(p, AccDiffusionSettings(enabled=True), facade)
        assert_clean(p, p.sd_model, webui)
        return out.images[0]

    before = good()
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    p = (ForgeTxt2ImgStandIn(forge_model, webui, adapter=facade, prompts=[PROMPT]) if forge else
         Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT]))
    p.scripts = ScriptsStandIn(adapter=facade)
    refused(p, webui, [{"enabled": True, "sigma": -1}])
    assert "sample" not in p.__dict__ and not webui.samplers  # p is dropped by the WebUI; nothing else was touched
    assert torch.equal(good(), before)


def test_the_glue_refuses_without_a_webui_object(sd1_model, monkeypatch):
    """scripts/accdiffusion.py calls ``facade.fail_job(p, error)`` without a WebUI object: the job
    makes the host's own (flows/webui.py) and refuses through it."""
    from accdiffusion.flows import webui as webui_module

    monkeypatch.setattr(webui_module, "WebUI", WebUIStandIn)
    p = Txt2ImgStandIn(sd1_model, WebUIStandIn(), prompts=[PROMPT])
    facade.fail_job(p, SettingsError("AccDiffusion: invalid value 5 for 'sigma'"))
    facade.before_batch(p)
    with pytest.raises(AccDiffusionError) as caught:
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=p.seeds, subseeds=p.seeds,
                 subseed_strength=0.0, prompts=p.prompts)
    assert api_handle_exception(caught.value)[:1] == (422,)


def test_refusal_class_is_the_hosts_http_exception():
    """What WebUI.refusal builds on fastapi's HTTPException (here its stand-in): status 422, the
    message as detail and as str(), an AccDiffusionError too; one class per base."""
    cls = refusal_class(HTTPExceptionStandIn)
    error = cls("AccDiffusion: invalid value 2 for 'sigma'")
    assert isinstance(error, HTTPExceptionStandIn) and isinstance(error, AccDiffusionError)
    assert (error.status_code, error.detail, str(error)) == (422, "AccDiffusion: invalid value 2 for 'sigma'",
                                                             "AccDiffusion: invalid value 2 for 'sigma'")
    assert refusal_class(HTTPExceptionStandIn) is cls
    # without the host's exception (no job WebUI), the job still stops with the message
    from accdiffusion.flows.job import Job, refusal

    plain = refusal(Job(AccDiffusionSettings(), None, error=SettingsError("AccDiffusion: bad 'x'")))
    assert type(plain) is AccDiffusionError and str(plain) == "AccDiffusion: bad 'x'"


# --- step-asides ------------------------------------------------------------------------------------
SETTINGS = AccDiffusionSettings(enabled=True, patch_prompt_threshold=0.4, sigma=1.0)  # keys beyond the switch


def tiler_scripts(p):
    other = SimpleNamespace(title=lambda: "Tiled Diffusion", args_from=2, args_to=23)
    p.scripts = ScriptsStandIn(SimpleNamespace(title=lambda: "AccDiffusion", args_from=0, args_to=2), other,
                               adapter=facade)
    p.script_args = (True, {}, True, "MultiDiffusion", False, True, 1024, 1024, 4, 4, 8, 1, "None", 2.0,
                     False, 10, 1.0, 0.4, 64, False, False, True, False)


TXT2IMG_REASONS = {
    "model": ("models are not supported (SD 1.x, SD 2.x, SDXL", "no UNet cross-attention"),
    "refiner": ("refiner",) * 2,
    "tiler": ("Tiled Diffusion is enabled and tiles the UNet itself",) * 2,
    "hires sampler": ("hires sampler 'Euler' is not supported",) * 2,
    "hires size": ("is not larger than the first pass",) * 2,
}


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
@pytest.mark.parametrize("reason", list(TXT2IMG_REASONS))
def test_txt2img_step_aside_says_so_in_the_infotext(sd1_model, forge_model, forge, reason):
    model = forge_model if forge else sd1_model
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    p = (ForgeTxt2ImgStandIn(model, webui, adapter=facade, prompts=[PROMPT]) if forge else
         Txt2ImgStandIn(model, webui, prompts=[PROMPT]))
    p.extra_generation_params = {"Hires upscale": 2.0}
    restore = []
    if reason == "model":
        flag = "is_sd1" if forge else "is_sd3"
        restore.append((model, flag, getattr(model, flag)))
        setattr(model, flag, not getattr(model, flag))
    elif reason == "refiner":
        p.refiner_checkpoint = "refiner.safetensors"
    elif reason == "tiler":
        tiler_scripts(p)
    elif reason == "hires sampler":
        webui.sampler_kind = lambda name: None
    elif reason == "hires size":
        p.hr_upscale_to_x, p.hr_upscale_to_y = p.width, p.height
    try:
        out = process_images(p, SETTINGS, facade)
    finally:
        for obj, name, value in restore:
            setattr(obj, name, value)
    params = p.extra_generation_params
    expected = TXT2IMG_REASONS[reason][1 if reason == "model" and not forge else 0]
    assert not any(k == "AccDiffusion" or k.startswith("AccDiffusion ") and k != STEP_ASIDE_KEY for k in params)
    assert expected in params[STEP_ASIDE_KEY] and params[STEP_ASIDE_KEY].endswith("the WebUI's own hires fix ran")
    assert params["Hires upscale"] == 2.0  # the WebUI's own keys stay
    assert any(expected in c and "ran instead" in c for c in p.comments)
    assert not webui.encoded and out.images
    if reason not in ("hires sampler", "hires size"):  # decided at the start: nothing attached
        assert not hasattr(p, facade.JOB_ATTR)


@pytest.mark.parametrize("forge", [False, True], ids=["a1111", "forge"])
def test_img2img_mask_found_at_sampling_steps_aside_in_the_infotext(sd1_model, forge_model, forge):
    webui = ForgeWebUIStandIn() if forge else WebUIStandIn()
    cls = ForgeImg2ImgStandIn if forge else Img2ImgStandIn
    extra = {"adapter": facade} if forge else {}
    p = cls(forge_model if forge else sd1_model, webui, [PROMPT], [picture(64, 64)], width=128, height=128, **extra)
    original_init = p.init

    def init_with_mask(*args, **kwargs):  # a mask that only exists once init() ran (another extension's)
        original_init(*args, **kwargs)
        p.mask = torch.ones_like(p.init_latent[:, :1])
        p.nmask = 1 - p.mask

    p.init = init_with_mask
    process_img2img(p, SETTINGS, facade)
    params = p.extra_generation_params
    assert "AccDiffusion" not in params and "AccDiffusion patch prompt threshold" not in params
    assert params[STEP_ASIDE_KEY] == "inpainting (a mask) is not supported; the WebUI's own img2img ran"
    assert params["Denoising strength"] == 0.5


def test_a_job_that_ran_keeps_its_settings_in_the_infotext(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    process_images(p, SETTINGS, facade)
    assert p.extra_generation_params == {"Denoising strength": 0.6, "AccDiffusion": True,
                                         "AccDiffusion patch prompt threshold": 0.4, "AccDiffusion sigma": 1.0,
                                         "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    assert surfaces.settings_from_pasted(p.extra_generation_params) == SETTINGS
    # a stepped-aside infotext pastes back as AccDiffusion off: the same (stock) image again
    stepped = {STEP_ASIDE_KEY: "the hires sampler 'LCM' is not supported; the WebUI's own hires fix ran"}
    assert surfaces.settings_from_pasted(stepped).enabled is False
