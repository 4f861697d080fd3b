"""Opt-in tests of Flux, Chroma and SD 3.5 (joint-attention flow transformers) against a live Forge 2
or Forge Neo (no SD 3.5 there) with the extension: every flow (txt2img hires 2x and 3x, img2img, the Upscale button, batch of one
prompt, shifted windows, infotext round trip, disabled = not installed) on each family.

    SD_WEBUI_URL=http://127.0.0.1:7920 SD_WEBUI_HOST=forge|neo SD_WEBUI_LOG=<the host's DEBUG log> \\
        [SD_WEBUI_PLAIN_URL=http://127.0.0.1:7921] .venv/bin/python -m pytest -q tests/live/test_live_dit.py

The module runs only when the host's loaded checkpoint (GET /sdapi/v1/options ``sd_model_checkpoint``)
is a Flux, Chroma or SD 3.5 model, or when SD_WEBUI_DIT names the checkpoints to use, e.g.
``SD_WEBUI_DIT="flux=tiny-flux,chroma=tiny-chroma,sd35=tiny-sd35"`` (a family left out is skipped).
Without SD_WEBUI_DIT, a family's checkpoint is the one of /sdapi/v1/sd-models whose name holds
"flux", "chroma" or "sd35"/"sd3.5". The tests switch the checkpoint (of both hosts) through
/sdapi/v1/options and put the host's back at the end. Made for the tiny random checkpoints of
../shared/tinymodel (forge/forge-tiny-models): 64-128 px, 4 steps. SD 3.5 needs the option
``sd3_enable_t5`` off (the tiny checkpoint's T5 is not 4096 wide).

SD_WEBUI_LOG (the host started with ``--loglevel DEBUG``): the tests read the stage lines and the
per-image tile prompts there. SD_WEBUI_PLAIN_URL: the same Forge and checkpoints without the
extension, for "disabled is bit-identical to not installed".
"""

import base64
import hashlib
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hosts import HOST  # noqa: E402
from test_live_api import PLAIN_URL, URL, call, digests, init_image, sizes  # noqa: E402

LOG = os.environ.get("SD_WEBUI_LOG")
PROMPT = "a red cube on a blue table next to a green ball"
FAMILIES = ("flux", "chroma", "sd35")
NAME_HINTS = {"flux": ("flux",), "chroma": ("chroma",), "sd35": ("sd35", "sd3.5", "sd3_5", "sd3-5")}


def _family_of(name):
    name = (name or "").lower()
    return next((f for f, hints in NAME_HINTS.items() if any(h in name for h in hints)), None)


def _checkpoints():
    """family -> checkpoint title for POST /sdapi/v1/options, or {} when this host runs no DiT."""
    if not URL:
        return {}
    if os.environ.get("SD_WEBUI_DIT"):
        pairs = [item.split("=", 1) for item in os.environ["SD_WEBUI_DIT"].split(",") if "=" in item]
        return {family.strip(): name.strip() for family, name in pairs}
    try:
        status, options = call("/sdapi/v1/options", method="GET")
        if status != 200 or _family_of(options.get("sd_model_checkpoint")) is None:
            return {}
        status, models = call("/sdapi/v1/sd-models", method="GET")
    except OSError:
        return {}
    out = {}
    for model in models:
        family = _family_of(model["model_name"])
        if family is not None and family not in out:
            out[family] = model["title"].split(" [")[0]  # without the hash: a host that has not hashed it yet
    return out


CHECKPOINTS = _checkpoints()
pytestmark = pytest.mark.skipif(not CHECKPOINTS, reason="set SD_WEBUI_URL to a Forge running a Flux, Chroma or "
                                                        "SD 3.5 checkpoint (or SD_WEBUI_DIT)")


def guidance(family):
    """Flux is guidance-distilled: CFG 1 (no uncond row) and the distilled scale; the others real CFG."""
    if family == "flux":
        return dict(cfg_scale=1, distilled_cfg_scale=3.5, hr_cfg=1, hr_distilled_cfg=3.5)
    return dict(cfg_scale=4, hr_cfg=4)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """The family whose checkpoint both hosts run for the tests that take this fixture."""
    family = request.param
    HOST.need_family(family)
    if family not in CHECKPOINTS:
        pytest.skip(f"no {family} checkpoint on this host")
    urls = [u for u in (URL, PLAIN_URL) if u]
    before = {u: call("/sdapi/v1/options", url=u, method="GET")[1]["sd_model_checkpoint"] for u in urls}
    for u in urls:
        status, out = call("/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINTS[family]}, url=u)
        assert status == 200, out
    yield family
    for u in urls:
        call("/sdapi/v1/options", {"sd_model_checkpoint": before[u]}, url=u)


def txt2img(family, url=None, acc=None, **overrides):
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64, "seed": 7,
            "sampler_name": "Euler", "scheduler": "Simple", "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": HOST.upscaler("Latent"), "denoising_strength": 0.6, "hr_sampler_name": "Euler",
            "hr_additional_modules": ["Use same choices"], **guidance(family)}
    body.update(overrides)
    body["hr_upscaler"] = HOST.upscaler(body["hr_upscaler"])
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/txt2img", body, url)
    assert status == 200, out
    return out


def img2img(family, url=None, acc=None, **overrides):
    body = {"init_images": [init_image()], "prompt": PROMPT, "negative_prompt": "blurry", "steps": 4,
            "width": 128, "height": 128, "denoising_strength": 0.5, "seed": 7, "sampler_name": "Euler",
            "scheduler": "Simple", "resize_mode": 0, **guidance(family)}
    for key in ("hr_cfg", "hr_distilled_cfg"):
        body.pop(key, None)
    body.update(overrides)
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/img2img", body, url)
    assert status == 200, out
    return out


def pixel_digests(out):
    from io import BytesIO

    from PIL import Image

    return [hashlib.sha256(Image.open(BytesIO(base64.b64decode(i))).convert("RGB").tobytes()).hexdigest()
            for i in out["images"]]


def infotext(out, i=0):
    return json.loads(out["info"])["infotexts"][i]


class Log:
    """What the host wrote to its log since this object was made ("" without SD_WEBUI_LOG)."""

    def __init__(self):
        self.start = os.path.getsize(LOG) if LOG else 0

    def text(self):
        if not LOG:
            return ""
        with open(LOG, errors="replace") as f:
            f.seek(self.start)
            return f.read()


def stage_lines(text):
    return re.findall(r"AccDiffusion stage (\d+) \((\d+)x(\d+) latent, (\w+) windows\)", text)


def tile_prompts(text):
    """{(stage, image): the tile prompts} from the DEBUG lines of one job."""
    return {(int(s), int(i)): p for s, i, p in
            re.findall(r"AccDiffusion stage (\d+) image (\d+) tile prompts: (\[.*\])", text)}


needs_log = pytest.mark.skipif(not LOG, reason="set SD_WEBUI_LOG to the host's log (started with --loglevel DEBUG)")


# --- txt2img hires -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,stages", [(2, [(16, 16)]), (3, [(16, 16), (24, 24)])])
def test_hires_runs_accdiffusion_and_is_reproducible(family, scale, stages):
    log = Log()
    on = txt2img(family, acc={"enabled": True}, hr_scale=scale)
    text = log.text()
    again = txt2img(family, acc={"enabled": True}, hr_scale=scale)
    off = txt2img(family, acc={"enabled": False}, hr_scale=scale)
    assert sizes(on) == [(64 * scale, 64 * scale)]
    assert digests(on) == digests(again)
    assert digests(on) != digests(off)
    assert "AccDiffusion: True" in infotext(on) and "AccDiffusion" not in infotext(off)
    assert f"Model: {CHECKPOINTS[family].rsplit('.', 1)[0]}" in infotext(on)
    if LOG:
        assert [(int(h), int(w)) for _, h, w, _ in stage_lines(text)] == stages
        assert "the WebUI's own hires fix ran instead" not in text and "Traceback" not in text
        assert "no attention maps" not in text  # the capture reached this model's attention


# --- img2img (probe pass) ------------------------------------------------------------------------------
def test_img2img_runs_the_probe_and_the_tiled_pass(family):
    log = Log()
    on = img2img(family, acc={"enabled": True})
    text = log.text()
    again = img2img(family, acc={"enabled": True})
    off = img2img(family, acc={"enabled": False})
    assert sizes(on) == [(128, 128)]
    assert digests(on) == digests(again) and digests(on) != digests(off)
    assert "AccDiffusion: True" in infotext(on) and "AccDiffusion" not in infotext(off)
    if LOG:
        assert "AccDiffusion probe pass (img2img)" in text and "no attention maps" not in text
        assert [(int(h), int(w)) for _, h, w, _ in stage_lines(text)] == [(16, 16)]
        assert "Traceback" not in text


# --- batch, shifted windows, infotext, disabled ---------------------------------------------------------
@needs_log
def test_batch_of_one_prompt_gives_each_image_its_own_tile_prompts(family):
    """batch_size 2 of one prompt (seeds 7, 8): each image's tile prompts are the ones a job of its
    seed alone gets (its own first pass's maps), and the two differ; one tile-prompt map per image.
    Overlap windows: the shifted windows' offsets (and the dilated shuffles) are drawn from the
    batch's first seed, so a shifted job of seed 8 alone shows other windows than image 1 of the batch."""
    acc = {"enabled": True, "tile_prompt_map": True, "window_mode": "overlap"}
    log = Log()
    out = txt2img(family, acc=acc, batch_size=2)
    batch = tile_prompts(log.text())
    assert sizes(out) == [(128, 128)] * 4  # two images, then their two maps
    assert len(set(digests(out))) == 4
    alone = {}
    for i, seed in enumerate((7, 8)):
        log = Log()
        txt2img(family, acc=acc, seed=seed)
        alone[i] = tile_prompts(log.text())[(1, 0)]
    assert batch[(1, 0)] == alone[0] and batch[(1, 1)] == alone[1]
    assert batch[(1, 0)] != batch[(1, 1)]


def test_shifted_windows(family):
    log = Log()
    shifted = txt2img(family, acc={"enabled": True, "window_mode": "shifted"})
    text = log.text()
    overlap = txt2img(family, acc={"enabled": True, "window_mode": "overlap"})  # shifted is the default
    assert sizes(shifted) == [(128, 128)]
    assert digests(shifted) != digests(overlap)
    assert "AccDiffusion window mode: shifted" in infotext(shifted)
    if LOG:
        assert [mode for *_, mode in stage_lines(text)] == ["shifted"]


def test_infotext_round_trip_reproduces_the_image(family):
    first = txt2img(family, acc={"enabled": True, "patch_prompt_threshold": 0.45, "window_mode": "shifted"})
    text = infotext(first)
    assert "AccDiffusion patch prompt threshold: 0.45" in text
    assert ("Distilled CFG Scale: 3.5" in text) == (family == "flux")
    # Forge's apply_infotext fails on the list-typed fields (styles, hires modules): the request sets them.
    # hr_scheduler too: the text has no "Hires schedule type" (the same as the first pass), so the API
    # fills in "Use same scheduler", which only the UI maps to None (modules/txt2img.py:43); the hires
    # pass would then look that name up, find no scheduler and take the model's own sigmas
    # (sd_samplers_kdiffusion.py:89-101), with or without AccDiffusion
    body = {"infotext": text, "hr_sampler_name": "Euler", "styles": [], "hr_scheduler": "Simple",
            "hr_additional_modules": ["Use same choices"],
            **{k: v for k, v in guidance(family).items() if k.startswith("hr_")}}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert digests(out) == digests(first)
    assert "AccDiffusion patch prompt threshold: 0.45" in infotext(out)


@pytest.mark.skipif(not PLAIN_URL, reason="set SD_WEBUI_PLAIN_URL to a Forge without the extension")
def test_disabled_is_identical_to_not_installed(family):
    plain = txt2img(family, url=PLAIN_URL)
    assert digests(txt2img(family, acc={"enabled": False})) == digests(plain)
    assert digests(txt2img(family)) == digests(plain)
    # img2img encodes the init image with the global torch RNG, which the previous request (txt2img of
    # seed 7 on both hosts) left in the same state
    plain_i2i = img2img(family, url=PLAIN_URL, seed=3)
    assert digests(img2img(family, acc={"enabled": False}, seed=3)) == digests(plain_i2i)


# --- the Upscale button (Gradio handlers, see test_live_upscale_button.py) ------------------------------------
ENABLED_ID = "script_txt2img_accdiffusion_enabled-checkbox"


def ui_settings(family):
    """The txt2img controls by elem_id (Forge modules/ui.py, processing_scripts/sampler.py)."""
    g = guidance(family)
    return {"txt2img_prompt": PROMPT, "txt2img_neg_prompt": "blurry", "txt2img_width": 64, "txt2img_height": 64,
            "txt2img_steps": 4, "txt2img_sampling": "Euler", "txt2img_scheduler": "Simple",
            "txt2img_cfg_scale": g["cfg_scale"], "txt2img_distilled_cfg_scale": 3.5, "txt2img_seed": 7,
            "txt2img_denoising_strength": 0.6, "txt2img_hr_scale": 2, "txt2img_hr_cfg": g["hr_cfg"],
            "txt2img_hr_distilled_cfg": 3.5}


def _pixels(ui, entry):
    image = ui.image(entry)
    return image.size, hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_upscale_button(family, upscaler):
    from gradio_ui import GradioUI

    if not HOST.upscale_button:
        pytest.skip(f"{HOST.label} has no txt2img Upscale button")
    if upscaler == "Latent":
        HOST.need_latent_upscaler("the Upscale button's latent path")
    upscaler = HOST.upscaler(upscaler)

    ui = GradioUI(URL)
    event = ui.event("txt2img_generate", js="submit")
    settings = ui_settings(family)
    data = ui.inputs(event, {**settings, "txt2img_hr_upscaler": upscaler, "txt2img_hr-checkbox": False},
                     {0: "task(dit-first)"}, optional={ENABLED_ID: False})
    first = ui.call(event, data)
    gallery, info = first["txt2img_gallery"], first["generation_info_txt2img"]
    assert gallery, first["_list"][3:]
    assert _pixels(ui, gallery[0])[0] == (64, 64)

    def press(enabled):
        event = ui.event("txt2img_upscale", js="submit_txt2img_upscale")
        data = ui.inputs(event, {**settings, "txt2img_hr_upscaler": upscaler},
                         {0: "task(dit-upscale)", 1: gallery, 2: 0, 3: info}, optional={ENABLED_ID: enabled})
        out = ui.call(event, data)
        assert out["txt2img_gallery"], out["_list"][3:]
        return out["txt2img_gallery"], json.loads(out["generation_info_txt2img"])["infotexts"][0], \
            json.dumps(out["_list"][3:])

    log = Log()
    on, on_text, on_html = press(True)
    text = log.text()
    size, on_pixels = _pixels(ui, on[0])
    assert size == (128, 128)
    assert "AccDiffusion: True" in on_text and "Hires upscale: 2" in on_text
    assert f"Model: {CHECKPOINTS[family].rsplit('.', 1)[0]}" in on_text
    assert "the WebUI's own hires fix ran instead" not in on_html
    if LOG:
        assert "AccDiffusion probe pass (Upscale button)" in text
        assert [(int(h), int(w)) for _, h, w, _ in stage_lines(text)] == [(16, 16)]
    assert _pixels(ui, press(True)[0][0])[1] == on_pixels  # reproducible
    if upscaler == "Latent" and ui.image(gallery[0]).mode == "RGBA":
        return  # Forge's own button fails on an RGBA image with a latent upscaler (test_live_upscale_button.py)
    off, off_text, _ = press(False)
    assert _pixels(ui, off[0]) != (size, on_pixels) and "AccDiffusion" not in off_text


# --- beside Forge's MultiDiffusion Integrated --------------------------------------------------------------
def test_multidiffusion_integrated_enabled_makes_accdiffusion_step_aside(family):
    """One tiler per job: with Forge's built-in tiler on, the image is its alone (forge_multidiffusion.py
    args: enabled, method, tile width/height, overlap, batch). Forge 2: txt2img hires; Neo offers its
    tiler in img2img only (tiles of at least 256 px): img2img 64 -> 256 px there."""
    tab = "txt2img" if "txt2img" in HOST.tiler_tabs else "img2img"

    def run(ours, theirs):
        scripts = {"AccDiffusion": {"args": [{"enabled": ours}]},
                   "MultiDiffusion Integrated": {"args": [theirs, *HOST.tiler_args]}}
        if tab == "txt2img":
            scripts["MultiDiffusion Integrated"] = {"args": [theirs, "MultiDiffusion", 64, 64, 32, 4]}
            return txt2img(family, width=128, height=128, alwayson_scripts=scripts)
        # the WebUI encodes the init image with the global torch RNG before the request seeds it:
        # each compared request comes after the same one (test_disabled_is_identical_to_not_installed)
        img2img(family, width=256, height=256,
                alwayson_scripts={**scripts, "AccDiffusion": {"args": [{"enabled": False}]}})
        return img2img(family, width=256, height=256, alwayson_scripts=scripts)

    status, scripts = call("/sdapi/v1/scripts", method="GET")
    if status != 200 or "multidiffusion integrated" not in scripts.get(tab, []):
        pytest.skip(f"Forge's MultiDiffusion Integrated is not there ({tab})")
    log = Log()
    both = run(True, True)
    text = log.text()
    alone = run(False, True)
    # the pixels are Forge's MultiDiffusion's alone; the PNGs differ only by the infotext, which says
    # that AccDiffusion stepped aside (never "AccDiffusion: True")
    assert pixel_digests(both) == pixel_digests(alone) != pixel_digests(run(True, False))
    assert "AccDiffusion: True" not in infotext(both) and "AccDiffusion stepped aside: " in infotext(both)
    assert "AccDiffusion" not in infotext(alone)
    if LOG:
        assert "AccDiffusion: Forge's MultiDiffusion is enabled and tiles the UNet itself" in text
