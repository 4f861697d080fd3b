"""Opt-in tests of Forge Neo's new families — Z-Image, Qwen-Image, Flux.2 Klein, Anima, Lumina 2, Ernie-Image — against a
live Neo with the extension: per family, txt2img hires 2x and 3x, img2img, a batch of one prompt
with one map per image, shifted and overlap windows, the infotext round trip, an X/Y/Z axis of ours,
the Upscale button, and disabled = not installed.

    SD_WEBUI_HOST=neo SD_WEBUI_URL=http://127.0.0.1:7866 SD_WEBUI_LOG=<Neo's log, SD_WEBUI_LOG_LEVEL=DEBUG> \\
        [SD_WEBUI_PLAIN_URL=<a Neo without the extension>] \\
        [SD_WEBUI_NEO_FAMILIES="zimage=tiny-zimage,qwenimage=tiny-qwenimage,klein=tiny-klein,anima=tiny-anima,lumina=tiny-lumina,ernie=tiny-ernie"] \\
        .venv/bin/python -m pytest -q tests/live/test_live_neo_families.py

Without SD_WEBUI_NEO_FAMILIES a family's checkpoint is the one of /sdapi/v1/sd-models whose name holds
the family's name. Made for the tiny random checkpoints of ../shared/tinymodel (their README: all four
are flow models without guidance input; Z-Image and Anima read the distilled-CFG field as the shift;
sizes are multiples of 64 on this Neo); tiny-lumina and tiny-ernie are made by tests/live/tools/make_tiny_lumina.py
and make_tiny_ernie.py and loaded through their preloads (docs/development.md; Ernie-Image, like Z-Image, reads the
distilled-CFG field as the shift). The tests switch the checkpoint (of both hosts) and put it back.
"""

import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hosts import HOST  # noqa: E402
from test_live_api import PLAIN_URL, URL, call, digests, init_image, sizes  # noqa: E402
from test_live_dit import LOG, Log, infotext, pixel_digests, stage_lines, tile_prompts  # noqa: E402

PROMPT = "a red cube on a blue table next to a green ball"
FAMILIES = ("zimage", "qwenimage", "klein", "anima", "lumina", "ernie")


def _checkpoints():
    if not URL or HOST.name != "neo":
        return {}
    if os.environ.get("SD_WEBUI_NEO_FAMILIES"):
        pairs = [item.split("=", 1) for item in os.environ["SD_WEBUI_NEO_FAMILIES"].split(",") if "=" in item]
        return {family.strip(): name.strip() for family, name in pairs}
    try:
        status, models = call("/sdapi/v1/sd-models", method="GET")
    except OSError:
        return {}
    out = {}
    for model in models if status == 200 else []:
        name = model["model_name"].lower()
        family = next((f for f in FAMILIES if f in name), None)
        if family is not None and family not in out:
            out[family] = model["title"].split(" [")[0]
    return out


CHECKPOINTS = _checkpoints()
pytestmark = pytest.mark.skipif(not CHECKPOINTS, reason="set SD_WEBUI_HOST=neo and SD_WEBUI_URL to a Forge Neo "
                                                        "with Z-Image / Qwen-Image / Klein / Anima / Lumina / Ernie checkpoints")
GUIDANCE = dict(cfg_scale=1, distilled_cfg_scale=3.0, hr_cfg=1, hr_distilled_cfg=3.0)
# Lumina 2 is not guidance-distilled (CFG rows) and reads the distilled-CFG field as its shift (6)
FAMILY_GUIDANCE = {"lumina": dict(cfg_scale=4, distilled_cfg_scale=6.0, hr_cfg=4, hr_distilled_cfg=6.0)}
guidance = dict(GUIDANCE)  # the current family's, set by the family fixture
needs_log = pytest.mark.skipif(not LOG, reason="set SD_WEBUI_LOG to Neo's log (SD_WEBUI_LOG_LEVEL=DEBUG)")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    family = request.param
    if family not in CHECKPOINTS:
        pytest.skip(f"no {family} checkpoint on this host")
    urls = [u for u in (URL, PLAIN_URL) if u]
    before = {u: call("/sdapi/v1/options", url=u, method="GET")[1]["sd_model_checkpoint"] for u in urls}
    for u in urls:
        status, out = call("/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINTS[family]}, url=u)
        assert status == 200, out
    guidance.clear()
    guidance.update(FAMILY_GUIDANCE.get(family, GUIDANCE))
    yield family
    for u in urls:
        call("/sdapi/v1/options", {"sd_model_checkpoint": before[u]}, url=u)


def txt2img(url=None, acc=None, **overrides):
    body = {"prompt": PROMPT, "negative_prompt": "", "steps": 4, "width": 128, "height": 128, "seed": 7,
            "sampler_name": "Euler", "scheduler": "Simple", "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": HOST.upscaler("Latent"), "denoising_strength": 0.6, "hr_sampler_name": "Euler",
            "hr_additional_modules": ["Use same choices"], **guidance, **overrides}
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/txt2img", body, url)
    assert status == 200, out
    return out


def img2img(url=None, acc=None, **overrides):
    body = {"init_images": [init_image()], "prompt": PROMPT, "negative_prompt": "", "steps": 4, "width": 256,
            "height": 256, "denoising_strength": 0.5, "seed": 7, "sampler_name": "Euler", "scheduler": "Simple",
            "resize_mode": 0, "cfg_scale": guidance["cfg_scale"], "distilled_cfg_scale": guidance["distilled_cfg_scale"],
            **overrides}
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/img2img", body, url)
    assert status == 200, out
    return out


def served(text):
    assert "Traceback" not in text and "the WebUI's own" not in text, text[-3000:]
    assert "no attention maps" not in text  # the capture reached this family's attention


@pytest.mark.parametrize("scale", [2, 3])
def test_hires_runs_accdiffusion_and_is_reproducible(family, scale):
    log = Log()
    on = txt2img(acc={"enabled": True, "tile_prompt_map": True}, hr_scale=scale)
    text = log.text()
    again = txt2img(acc={"enabled": True, "tile_prompt_map": True}, hr_scale=scale)
    off = txt2img(acc={"enabled": False}, hr_scale=scale)
    assert sizes(on) == [(128 * scale, 128 * scale)] * 2  # the image and its tile-prompt map
    assert digests(on) == digests(again)
    assert pixel_digests(on)[0] != pixel_digests(off)[0]
    assert "AccDiffusion: True" in infotext(on) and "AccDiffusion" not in infotext(off)
    if LOG:
        served(text)
        assert stage_lines(text)
        prompts = [p for key, p in tile_prompts(text).items() if key[1] == 0]
        assert prompts, "no tile prompts were logged (DEBUG)"


def test_img2img_runs_the_probe_and_the_tiled_pass(family):
    log = Log()
    on = img2img(acc={"enabled": True})
    text = log.text()
    again = img2img(acc={"enabled": True})
    off = img2img(acc={"enabled": False})
    assert sizes(on) == [(256, 256)]
    assert digests(on) == digests(again) and pixel_digests(on) != pixel_digests(off)
    assert "AccDiffusion: True" in infotext(on)
    if LOG:
        assert "AccDiffusion probe pass (img2img)" in text
        served(text)


@needs_log
def test_batch_of_one_prompt_gives_each_image_its_own_tile_prompts(family):
    acc = {"enabled": True, "tile_prompt_map": True, "window_mode": "overlap"}
    log = Log()
    out = txt2img(acc=acc, batch_size=2)
    batch = tile_prompts(log.text())
    assert sizes(out) == [(256, 256)] * 4  # two images, then their two maps
    alone = {}
    for i, seed in enumerate((7, 8)):
        log = Log()
        txt2img(acc=acc, seed=seed)
        alone[i] = tile_prompts(log.text())[(1, 0)]
    assert batch[(1, 0)] == alone[0] and batch[(1, 1)] == alone[1]


def test_shifted_and_overlap_windows(family):
    log = Log()
    shifted = txt2img(acc={"enabled": True, "window_mode": "shifted"})
    overlap = txt2img(acc={"enabled": True, "window_mode": "overlap"})
    text = log.text()
    assert sizes(shifted) == sizes(overlap) == [(256, 256)]
    assert pixel_digests(shifted) != pixel_digests(overlap)
    if LOG:
        assert [mode for *_, mode in stage_lines(text)] == ["shifted", "overlap"]


def test_infotext_round_trip_reproduces_the_image(family):
    first = txt2img(acc={"enabled": True, "patch_prompt_threshold": 0.45})
    text = infotext(first)
    assert "AccDiffusion patch prompt threshold: 0.45" in text and "Denoising strength: 0.6" in text
    body = {"infotext": text, "hr_sampler_name": "Euler", "styles": [], "hr_scheduler": "Simple",
            "hr_additional_modules": ["Use same choices"], "hr_cfg": guidance["hr_cfg"],
            "hr_distilled_cfg": guidance["hr_distilled_cfg"]}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert digests(out) == digests(first)


@pytest.mark.skipif(not PLAIN_URL, reason="set SD_WEBUI_PLAIN_URL to a Neo without the extension")
def test_disabled_is_identical_to_not_installed(family):
    plain = txt2img(url=PLAIN_URL)
    assert digests(txt2img(acc={"enabled": False})) == digests(plain)
    assert digests(txt2img()) == digests(plain)
    plain_i2i = img2img(url=PLAIN_URL, seed=3)
    assert digests(img2img(acc={"enabled": False}, seed=3)) == digests(plain_i2i)


def test_xyz_axis_sets_each_cells_threshold(family):
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = xyz["args"][0]["choices"].index("AccDiffusion Patch prompt threshold")
    log = Log()
    out = txt2img(acc={"enabled": True}, script_name="x/y/z plot", script_args=HOST.xyz_args(axis, "0.05,0.95"))
    text = log.text()
    infos = json.loads(out["info"])["infotexts"]
    assert len(out["images"]) == 3  # the grid and its two cells
    assert 'X Values: "0.05,0.95"' in infos[0]
    cells = [i for i in infos if "AccDiffusion patch prompt threshold" in i]
    assert any("AccDiffusion patch prompt threshold: 0.05" in i for i in cells)
    assert any("AccDiffusion patch prompt threshold: 0.95" in i for i in cells)
    if LOG:
        served(text)
        assert len(stage_lines(text)) == 2  # one tiled pass per cell


def _pixels(ui, entry):
    image = ui.image(entry)
    return image.size, hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def test_upscale_button(family):
    """The txt2img Upscale button (Gradio's own handler, as a person presses it) on a first-pass image."""
    from gradio_ui import GradioUI
    from test_live_dit import ENABLED_ID

    if not HOST.upscale_button:
        pytest.skip(f"{HOST.label} has no txt2img Upscale button")
    ui = GradioUI(URL)
    settings = {"txt2img_prompt": PROMPT, "txt2img_neg_prompt": "", "txt2img_width": 128, "txt2img_height": 128,
                "txt2img_steps": 4, "txt2img_sampling": "Euler", "txt2img_scheduler": "Simple",
                "txt2img_cfg_scale": guidance["cfg_scale"], "txt2img_distilled_cfg_scale": guidance["distilled_cfg_scale"],
                "txt2img_seed": 7, "txt2img_denoising_strength": 0.6, "txt2img_hr_scale": 2,
                "txt2img_hr_cfg": guidance["hr_cfg"], "txt2img_hr_distilled_cfg": guidance["hr_distilled_cfg"],
                "txt2img_hr_upscaler": HOST.upscaler("Lanczos")}
    event = ui.event("txt2img_generate", js="submit")
    data = ui.inputs(event, {**settings, "txt2img_hr-checkbox": False}, {0: "task(neo-first)"},
                     optional={ENABLED_ID: False})
    first = ui.call(event, data)
    gallery, info = first["txt2img_gallery"], first["generation_info_txt2img"]
    assert gallery and _pixels(ui, gallery[0])[0] == (128, 128)

    def press(enabled):
        event = ui.event("txt2img_upscale", js="submit_txt2img_upscale")
        data = ui.inputs(event, settings, {0: "task(neo-upscale)", 1: gallery, 2: 0, 3: info},
                         optional={ENABLED_ID: enabled})
        out = ui.call(event, data)
        assert out["txt2img_gallery"], out["_list"][3:]
        return out["txt2img_gallery"], json.loads(out["generation_info_txt2img"])["infotexts"][0]

    log = Log()
    on, on_text = press(True)
    text = log.text()
    size, on_pixels = _pixels(ui, on[0])
    assert size == (256, 256) and "AccDiffusion: True" in on_text
    if LOG:
        assert "AccDiffusion probe pass (Upscale button)" in text
        served(text)
    assert _pixels(ui, press(True)[0][0])[1] == on_pixels  # reproducible
    off, off_text = press(False)
    assert _pixels(ui, off[0]) != (size, on_pixels) and "AccDiffusion" not in off_text
