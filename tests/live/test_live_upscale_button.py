"""The txt2img *Upscale* button (✨ under the gallery) on a live WebUI, through its own Gradio handlers.

The button re-runs Hires. fix on a finished image (A1111 1.10.1 modules/txt2img.py:49-80
``txt2img_upscale``: ``txt2img_create_processing(..., force_enable_hr=True)`` and
``p.firstpass_image``; Forge 2 modules/txt2img.py:62-111 the same). It is not in the /sdapi REST
API, so these tests press it the way the browser does (tests/live/gradio_ui.py): a first pass with
Hires. fix off through the Generate button's handler, then the Upscale button's handler with that
gallery and its generation info.

    SD_WEBUI_URL=http://127.0.0.1:7860 [SD_WEBUI_PLAIN_URL=...] [SD_WEBUI_HOST=...] \\
        [SD_WEBUI_LOG=<the host's log, started with --loglevel DEBUG>] \\
        .venv/bin/python -m pytest -q tests/live/test_live_upscale_button.py

SD_WEBUI_PLAIN_URL: the same WebUI without the extension (see test_live_api.py) for the
"disabled is bit-identical" check; its UI lacks our controls, so they are set only where present.
With SD_WEBUI_LOG the probe pass and the tiled stages must appear in the host's log.
"""

import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gradio_ui import GradioUI  # noqa: E402
from hosts import HOST  # noqa: E402

from test_live_api import PLAIN_URL, URL, call  # noqa: E402

LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = [pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI"),
              pytest.mark.skipif(not HOST.upscale_button, reason=f"{HOST.label} has no txt2img Upscale button")]

PROMPT = "a red-haired astronaut riding a horse on the moon"
# by elem_id: the same on A1111 1.10.1 and Forge 2 (modules/ui.py, the Sampler and Seed scripts)
SETTINGS = {
    "txt2img_prompt": PROMPT, "txt2img_neg_prompt": "blurry", "txt2img_width": 64, "txt2img_height": 64,
    "txt2img_steps": 4, "txt2img_sampling": "Euler", "txt2img_cfg_scale": 5, "txt2img_seed": 7,
    "txt2img_denoising_strength": 0.6, "txt2img_hr_scale": 2, "txt2img_hr_upscaler": HOST.upscaler("Latent"),
}
ENABLED_ID = "script_txt2img_accdiffusion_enabled-checkbox"  # InputAccordion's checkbox (scripts/accdiffusion.py)
HOST_ONLY = {"txt2img_hr_cfg": 5}  # Forge's Hires CFG Scale (its default 7 would differ from the first pass)
FALLBACK_NOTE = "the WebUI's own hires fix ran instead"


def log_size():
    return os.path.getsize(LOG) if LOG else 0


def log_text(start):
    with open(LOG, errors="replace") as f:
        f.seek(start)
        return f.read()


def pixels(ui, gallery_entry):
    image = ui.image(gallery_entry)
    return image.size, hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def first_pass(ui):
    """A finished 64 px image with Hires. fix off and AccDiffusion off: (gallery, generation_info)."""
    event = ui.event("txt2img_generate", js="submit")
    data = ui.inputs(event, {**SETTINGS, "txt2img_hr-checkbox": False}, {0: "task(upscale-button-first)"},
                     optional={ENABLED_ID: False, **HOST_ONLY})
    out = ui.call(event, data)
    assert out["txt2img_gallery"], out["_list"][3:]
    return out["txt2img_gallery"], out["generation_info_txt2img"]


def the_webui_fails(ui, gallery, upscaler):
    """Forge 2 saves images as RGBA by default (Settings → "Stealth infotext mode": Alpha), and its
    own Upscale button then fails for a latent upscaler: processing.py:1356-1364 encodes
    np.array(firstpass_image), 4 channels, and the VAE takes 3 ("expected input ... to have 3
    channels, but got 4"). Pixel upscalers work (images.resize_image drops the alpha), and so does
    AccDiffusion (facade.before_batch hands the job the RGB image)."""
    return upscaler == "Latent" and ui.image(gallery[0]).mode == "RGBA"


def host_upscaler(upscaler):
    """The host's name for ``upscaler``; a host without latent upscalers (Neo) skips the "Latent" case,
    whose point is the first-pass latent (the "Lanczos" case is its pixel one)."""
    if upscaler.startswith("Latent"):
        HOST.need_latent_upscaler("the Upscale button's latent path")
    return HOST.upscaler(upscaler)


def press_upscale(ui, gallery, generation_info, enabled, upscaler="Latent", **accdiffusion):
    """What a click on ✨ sends: task id, gallery, selected index, generation info, then the txt2img
    inputs (submit_txt2img_upscale in javascript/ui.js). Hires. fix stays unticked: the button forces it."""
    upscaler = HOST.upscaler(upscaler)
    event = ui.event("txt2img_upscale", js="submit_txt2img_upscale")
    ours = {ENABLED_ID: enabled, **HOST_ONLY,
            **{f"script_txt2img_accdiffusion_{k}": v for k, v in accdiffusion.items()}}
    data = ui.inputs(event, {**SETTINGS, "txt2img_hr_upscaler": upscaler}, {0: "task(upscale-button)", 1: gallery, 2: 0, 3: generation_info},
                     optional=ours)
    out = ui.call(event, data)
    assert out["txt2img_gallery"], out["_list"][3:]  # the WebUI's error message, if any
    info = json.loads(out["generation_info_txt2img"])
    return out["txt2img_gallery"], info["infotexts"][0], json.dumps(out["_list"][3:])


@pytest.fixture(scope="module")
def ui():
    return GradioUI(URL)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])  # Lanczos: no first-pass latent (samples None)
def test_upscale_button_with_accdiffusion_runs_the_probe_and_the_tiled_pass(ui, upscaler):
    upscaler = host_upscaler(upscaler)
    gallery, info = first_pass(ui)
    assert pixels(ui, gallery[0])[0] == (64, 64)
    start = log_size()
    on_gallery, on_text, on_html = press_upscale(ui, gallery, info, True, upscaler, patch_prompt_threshold=0.4)
    text = log_text(start) if LOG else ""
    size, on = pixels(ui, on_gallery[0])
    assert size == (128, 128)
    assert "AccDiffusion: True" in on_text and "AccDiffusion patch prompt threshold: 0.4" in on_text
    assert "Hires upscale: 2" in on_text and f"Hires upscaler: {upscaler}" in on_text
    assert FALLBACK_NOTE not in on_html and FALLBACK_NOTE not in text
    if LOG:
        assert "AccDiffusion probe pass (Upscale button)" in text
        assert "AccDiffusion stage 1 (16x16 latent" in text
    again = press_upscale(ui, gallery, info, True, upscaler, patch_prompt_threshold=0.4)[0]
    assert pixels(ui, again[0])[1] == on  # reproducible
    if the_webui_fails(ui, gallery, upscaler):
        return
    off_gallery, off_text, _ = press_upscale(ui, gallery, info, False, upscaler)
    assert pixels(ui, off_gallery[0]) != (size, on)  # the tiled pass, not the stock hires pass
    assert "AccDiffusion" not in off_text


@pytest.mark.skipif(not PLAIN_URL, reason="set SD_WEBUI_PLAIN_URL to a WebUI without the extension")
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_upscale_button_disabled_is_identical_to_not_installed(ui, upscaler):
    upscaler = host_upscaler(upscaler)
    plain = GradioUI(PLAIN_URL)
    gallery, info = first_pass(ui)
    plain_gallery, plain_info = first_pass(plain)
    assert pixels(ui, gallery[0]) == pixels(plain, plain_gallery[0])
    if the_webui_fails(ui, gallery, upscaler):
        pytest.skip("the WebUI's own Upscale button fails on an RGBA gallery image with a latent upscaler "
                    "(Forge: set Stealth infotext mode to None)")
    off_gallery, off_text, _ = press_upscale(ui, gallery, info, False, upscaler)
    plain_out, plain_text, _ = press_upscale(plain, plain_gallery, plain_info, False, upscaler)
    assert pixels(ui, off_gallery[0])[0] == (128, 128)
    assert pixels(ui, off_gallery[0]) == pixels(plain, plain_out[0])
    assert "AccDiffusion" not in off_text


@pytest.fixture
def sdxl_checkpoint():
    """The WebUI's checkpoint switched to the tiny SDXL model (the UI's handlers use the loaded one),
    and back afterwards."""
    before = call("/sdapi/v1/options")[1]["sd_model_checkpoint"]
    assert call("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sdxl.safetensors"})[0] == 200
    try:
        yield
    finally:
        call("/sdapi/v1/options", {"sd_model_checkpoint": before})


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_upscale_button_with_sdxl(ui, sdxl_checkpoint, upscaler):
    """SDXL (vector conditioning, its own native size for the probe rule) through the same button."""
    upscaler = host_upscaler(upscaler)
    gallery, info = first_pass(ui)
    start = log_size()
    out, text, html = press_upscale(ui, gallery, info, True, upscaler)
    assert pixels(ui, out[0])[0] == (128, 128)
    assert "AccDiffusion: True" in text and "Model: tiny-sdxl" in text
    assert FALLBACK_NOTE not in html
    if LOG:
        log = log_text(start)
        assert "AccDiffusion probe pass (Upscale button)" in log and "AccDiffusion stage 1 (16x16 latent" in log
