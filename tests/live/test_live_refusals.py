"""A bad value for every AccDiffusion setting (tests/bad_settings.py: every forbidden value of
every setting, an unknown name, a stride above the window), sent to a live WebUI: each is answered
HTTP 422 with the setting named, the host's log gets one line per refusal and no traceback
("Traceback", "Exception in ASGI application"; needs SD_WEBUI_LOG), the UI shows the same message,
and the host makes the same image afterwards as before."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from bad_settings import cases  # noqa: E402
from hosts import HOST  # noqa: E402
from test_live_api import PROMPT, URL, call, digests, img2img, init_image, txt2img  # noqa: E402

LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

REFUSED_LINE = "(the request was refused)"  # accdiffusion.flows.job.refusal


def log_text(start: int) -> str:
    with open(LOG, errors="replace") as f:
        f.seek(start)
        return f.read()


def txt2img_body(settings):
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "width": 64, "height": 64, "enable_hr": True,
            "hr_scale": 2, "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler", "seed": 3,
            **HOST.hires(7), "alwayson_scripts": {"AccDiffusion": {"args": [settings]}}}
    return body


def test_every_bad_value_is_a_422_naming_the_setting_without_a_traceback():
    good = dict(acc={"enabled": True, "window_mode": "shifted"}, seed=21)
    before = digests(txt2img(**good))
    start = os.path.getsize(LOG) if LOG else 0
    answers = []
    for name, settings in cases():
        status, out = call("/sdapi/v1/txt2img", txt2img_body(settings))
        answers.append((name, settings, status, out))
    wrong = [(name, settings, status, str(out)[:300]) for name, settings, status, out in answers
             if status != 422 or f"'{name}'" not in out.get("detail", "")]
    assert not wrong, wrong
    # A1111's handler (api.py handle_exception) also names the class and repeats the message; Forge's
    # FastAPI answers an HTTPException with {"detail": ...} alone
    assert all(out.get("error", "AccDiffusionSettingsError") == "AccDiffusionSettingsError"
               and out.get("errors", out["detail"]) == out["detail"] for *_, out in answers)
    if LOG:
        text = log_text(start)
        assert "Traceback" not in text and "Exception in ASGI application" not in text
        assert text.count(REFUSED_LINE) == len(answers)  # one console line each
    assert digests(txt2img(**good)) == before  # the host is as healthy as before


def test_img2img_bad_value_is_a_422():
    status, out = call("/sdapi/v1/img2img", {
        "init_images": [init_image()], "prompt": PROMPT, "steps": 2, "width": 128, "height": 128,
        "alwayson_scripts": {"AccDiffusion": {"args": [True, True, 0.3, True, True, True, 3.0, 1.0, 1.0, -1]}}})
    assert status == 422 and "'sigma'" in out["detail"], out
    # the WebUI encodes the init image with the global torch RNG before the request seeds it (see
    # test_live_samplers.test_img2img_with_a_timestep_sampler): one same request first
    img2img(acc={"enabled": True})
    assert digests(img2img(acc={"enabled": True})) == digests(img2img(acc={"enabled": True}))


def test_the_ui_shows_the_same_message():
    """The txt2img Generate button with an out-of-range slider value (a browser can send one): the
    job stops before sampling and the UI's info box shows the refusal, as the API's detail says."""
    from gradio_ui import GradioUI
    from test_live_upscale_button import ENABLED_ID, HOST_ONLY, SETTINGS

    ui = GradioUI(URL)
    event = ui.event("txt2img_generate", js="submit")
    data = ui.inputs(event, {**SETTINGS, "txt2img_hr-checkbox": True}, {0: "task(accdiffusion-refused)"},
                     optional={ENABLED_ID: True, **HOST_ONLY, "script_txt2img_accdiffusion_sigma": 5})
    start = os.path.getsize(LOG) if LOG else 0
    out = ui.call(event, data)
    ui_log = log_text(start) if LOG else ""
    status, api = call("/sdapi/v1/txt2img", txt2img_body({"enabled": True, "sigma": 5}))
    assert status == 422
    shown = json.dumps(out["_list"], ensure_ascii=False).replace("\\'", "'").replace("&#x27;", "'")
    if not HOST.ui_shows_job_errors:
        # reForge / Forge Classic: the main-thread loop prints the job's exception and hands the page
        # None; the refusal is in the console (one line), the page shows the host's own TypeError
        assert "TypeError: 'NoneType' object is not iterable" in shown, shown[:2000]
        if LOG:
            assert ui_log.count(REFUSED_LINE) == 1 and api["detail"] in ui_log
        return
    assert f"AccDiffusionSettingsError: {api['detail']}" in shown, shown[:2000]
