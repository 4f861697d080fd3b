"""Opt-in tests against a running WebUI with the extension installed (A1111 1.10, Forge 2, Forge Neo,
reForge, Forge Classic).

    SD_WEBUI_URL=http://127.0.0.1:7860 [SD_WEBUI_HOST=a1111|forge|neo|reforge|classic] .venv/bin/python -m pytest -q tests/live

Optional: SD_WEBUI_PLAIN_URL, the same WebUI and model started without the extension
(``--disable-all-extensions``), for the "disabled is bit-identical to not installed" check;
SD_WEBUI_HOST picks the host's request quirks (tests/live/hosts.py; SD_WEBUI_FORGE=1 = forge).
Use a tiny model (../shared/tinymodel): images are small and every request takes seconds.
"""

import base64
import hashlib
import io
import json
import os
import urllib.error
import urllib.request

import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hosts import HOST  # noqa: E402

URL = os.environ.get("SD_WEBUI_URL")
PLAIN_URL = os.environ.get("SD_WEBUI_PLAIN_URL")
FORGE = HOST.name == "forge"  # Forge 2 (kept for older callers; use HOST)
pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

PROMPT = "a red-haired astronaut riding a horse on the moon"


def call(path, body=None, url=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request((url or URL).rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode() or "{}")


def txt2img(url=None, acc=None, **overrides):
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "width": 64, "height": 64,
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6,
            "seed": 7, "sampler_name": "Euler", "cfg_scale": 5, "hr_sampler_name": "Euler"}
    body.update(overrides)
    body["hr_upscaler"] = HOST.upscaler(body["hr_upscaler"])
    body = {**HOST.hires(body["cfg_scale"]), **body}
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/txt2img", body, url)
    assert status == 200, out
    return out


def digests(out):
    return [hashlib.sha256(base64.b64decode(i)).hexdigest() for i in out["images"]]


def pixel_digests(out):
    """Digests of the images' RGB pixels (and size), not of the PNG files: reForge's X/Y/Z plot saves
    its cells with the host's "stealth infotext" (modules/stealth_infotext.py; `stealth_pnginfo_opt`
    unset reads as "Alpha"), which writes the gzipped infotext into an alpha channel of the cell
    images themselves, so the API returns those cells as RGBA PNGs whose bytes change on every run."""
    from PIL import Image

    out_digests = []
    for i in out["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB")
        out_digests.append(hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest())
    return out_digests


def sizes(out):
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(i))).size for i in out["images"]]


def infotext(out, i=0):
    return json.loads(out["info"])["infotexts"][i]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M"])
@pytest.mark.parametrize("size,scale", [((64, 96), 2), ((64, 64), 1.5), ((64, 64), 3)])
def test_hires_pass_runs_and_is_reproducible(sampler, size, scale):
    w, h = size
    kw = dict(width=w, height=h, hr_scale=scale, sampler_name=sampler, hr_sampler_name=sampler)
    on = txt2img(acc={"enabled": True}, **kw)
    again = txt2img(acc={"enabled": True}, **kw)
    off = txt2img(acc={"enabled": False}, **kw)
    assert sizes(on) == [HOST.hires_size(w, h, scale)]
    assert digests(on) == digests(again)
    assert digests(on) != digests(off)
    assert "AccDiffusion: True" in infotext(on)
    assert "AccDiffusion" not in infotext(off)


def test_batch_of_two():
    out = txt2img(acc={"enabled": True}, batch_size=2, prompt=PROMPT, seed=3)
    assert len(out["images"]) == 2 and sizes(out) == [(128, 128)] * 2


def test_positional_args_work_like_the_dict():
    named = txt2img(acc={"enabled": True, "patch_prompt_threshold": 0.4})
    status, out = call("/sdapi/v1/txt2img", {
        **{k: v for k, v in json.loads(named["parameters"] if isinstance(named["parameters"], str) else json.dumps(named["parameters"])).items()
           if k in ("prompt", "negative_prompt", "steps", "width", "height", "enable_hr", "hr_scale",
                    "hr_upscaler", "denoising_strength", "seed", "sampler_name", "cfg_scale",
                    "hr_sampler_name", "hr_additional_modules", "hr_cfg")},
        "alwayson_scripts": {"AccDiffusion": {"args": [True, True, 0.4]}}})
    assert status == 200, out
    assert digests(out) == digests(named)


def test_bad_arguments_are_rejected_with_a_message():
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler", **HOST.hires(7),
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True, "patch_prompt_threshold": 1.5}]}}}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 422  # a client error (every setting: test_live_refusals.py)
    assert "'patch_prompt_threshold'" in out["detail"]
    status, out = call("/sdapi/v1/txt2img", {**body, "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True, "treshold": 0.3}]}}})
    assert status == 422 and "'treshold'" in out["detail"]


def test_infotext_round_trip_reproduces_the_image():
    first = txt2img(acc={"enabled": True, "patch_prompt_threshold": 0.45, "sigma": 1.0})
    text = infotext(first)
    assert "AccDiffusion patch prompt threshold: 0.45" in text and "AccDiffusion sigma: 1.0" in text
    body = {"infotext": text, "hr_sampler_name": "Euler", **HOST.infotext_fields(5)}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert digests(out) == digests(first)


def test_settings_schema_endpoint():
    status, schema = call("/accdiffusion/v1/settings")
    assert status == 200
    assert schema["properties"]["patch_prompt_threshold"]["default"] == 0.3


def test_xyz_grid_over_threshold():
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    body = {"prompt": PROMPT, "steps": 3, "width": 128, "height": 128, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler", "seed": 5,
            "denoising_strength": 0.6, **HOST.hires(7),
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True}]}},
            "script_name": "x/y/z plot"}
    # the axis index is its position in the txt2img X/Y/Z list: find it from the script's own choices
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    axis = choices.index("AccDiffusion Patch prompt threshold")
    body["script_args"] = HOST.xyz_args(axis, "0.05,0.95")
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert len(out["images"]) == 3  # grid + two cells
    grid, low, high = pixel_digests(out)
    assert low != high  # c changes the tile prompts, so the image
    assert 'X Values: "0.05,0.95"' in json.loads(out["info"])["infotexts"][0]


@pytest.mark.skipif(not PLAIN_URL, reason="set SD_WEBUI_PLAIN_URL to a WebUI without the extension")
@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_disabled_is_identical_to_not_installed(sampler):
    kw = dict(width=64, height=96, sampler_name=sampler, hr_sampler_name=sampler)
    assert digests(txt2img(acc={"enabled": False}, **kw)) == digests(txt2img(url=PLAIN_URL, **kw))
    assert digests(txt2img(**kw)) == digests(txt2img(url=PLAIN_URL, **kw))


@pytest.mark.parametrize("extra", [
    {"hr_upscaler": "Lanczos"},  # a pixel upscaler for the first jump
    {"hr_scale": 1, "hr_resize_x": 160, "hr_resize_y": 96},  # another aspect ratio: cropped like the WebUI
    {"hr_prompt": PROMPT + ", golden light"},  # a hires prompt of its own
    {"prompt": "a cat AND a dog"},
    {"prompt": "a (red:1.4) BREAK [blue] car, masterpiece"},
    {"prompt": ", ".join(f"detailed {w}" for w in "castle dragon river forest mountain cloud knight horse "
                         "banner tower bridge village lantern moon star ship sail wave rock tree flower "
                         "bird wolf fox deer owl sword shield armor helmet gate wall road cart".split())},
])
def test_hires_variants(extra):
    out = txt2img(acc={"enabled": True, "tiled_decode": "on"}, **extra)
    resize = (extra["hr_resize_x"], extra["hr_resize_y"]) if "hr_resize_x" in extra else None
    assert sizes(out) == [HOST.hires_size(64, 64, 2, resize)]
    assert "AccDiffusion: True" in infotext(out)


def test_interrupt_leaves_the_webui_ready():
    import threading
    import time

    kw = dict(width=128, height=128, hr_scale=3, steps=8, hr_second_pass_steps=8, seed=11)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=txt2img(acc={"enabled": True}, **kw)))
    worker.start()
    for _ in range(200):  # wait until the hires pass has started
        status, progress = call("/sdapi/v1/progress?skip_current_image=true", method="GET")
        if progress.get("state", {}).get("job_no", 0) >= 1:
            break
        time.sleep(0.05)
    call("/sdapi/v1/interrupt", {})
    worker.join(timeout=300)
    assert "out" in result  # the interrupted job still answers with what it had
    small = dict(seed=12)
    first = txt2img(acc={"enabled": True}, **small)
    assert digests(first) == digests(txt2img(acc={"enabled": True}, **small))
    if PLAIN_URL:
        assert digests(txt2img(acc={"enabled": False}, **small)) == digests(txt2img(url=PLAIN_URL, **small))


def pixels(out, i):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][i]))).convert("RGB"), dtype=np.float32)


def test_batch_of_one_prompt_one_tile_prompt_map_per_image():
    """batch_size 2, one prompt (seeds 7, 8): two images and two tile-prompt maps, one per image,
    each drawn from its own image's first pass and tile prompts: closer to the map of a job of
    that seed alone than to the other image's map. Overlap windows: a map shows the last step's
    windows, and the shifted windows' offsets are drawn from the batch's first seed."""
    acc = {"enabled": True, "tile_prompt_map": True, "window_mode": "overlap"}
    out = txt2img(acc=acc, batch_size=2)
    assert sizes(out) == [(128, 128)] * 4  # two images, then two maps
    assert len(set(digests(out))) == 4
    maps = [pixels(out, 2), pixels(out, 3)]
    alone = [pixels(txt2img(acc=acc, seed=seed), 1) for seed in (7, 8)]
    for i in range(2):
        own = abs(maps[i] - alone[i]).mean()
        other = abs(maps[i] - alone[1 - i]).mean()
        assert own < other, (i, own, other)


# --- img2img (and the probe pass) -------------------------------------------------------------------
MODELS = {"sd15": "tiny-sd15.safetensors", "sdxl": "tiny-sdxl.safetensors"}


def init_image(width=64, height=64, seed=0):
    """A small picture with structure (disc on a gradient), PNG base64."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    for y in range(height):
        for x in range(width):
            image.putpixel((x, y), (int(255 * x / width), int(255 * y / height), 90))
    r = min(width, height) // 4
    cx, cy = width // 2 + (seed * 7) % 9 - 4, height // 2
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(240, 220, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


_last_model = {}


def img2img(url=None, acc=None, model="sd15", images=None, **overrides):
    # the WebUI's first img2img after a checkpoint switch differs from the next ones, with or without
    # the extension (seen on A1111 1.10.1): switch with a throw-away request first
    if _last_model.get(url or URL) != model:
        _last_model[url or URL] = model
        img2img(url, None, model, images[:1] if images else None, steps=1)
    body = {"init_images": images or [init_image()], "prompt": PROMPT, "negative_prompt": "blurry", "steps": 4,
            "width": 128, "height": 128, "denoising_strength": 0.5, "seed": 7, "sampler_name": "Euler",
            "cfg_scale": 5, "resize_mode": 0,
            "override_settings": {"sd_model_checkpoint": MODELS[model]}, "override_settings_restore_afterwards": True}
    body.update(overrides)
    if acc is not None:
        body["alwayson_scripts"] = {"AccDiffusion": {"args": [acc]}}
    status, out = call("/sdapi/v1/img2img", body, url)
    assert status == 200, out
    return out


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("image,target", [((64, 64), (128, 128)), ((64, 64), (192, 192)), ((96, 64), (192, 128))])
def test_img2img_runs_and_is_reproducible(model, image, target):
    kw = dict(model=model, images=[init_image(*image)], width=target[0], height=target[1])
    on = img2img(acc={"enabled": True}, **kw)
    again = img2img(acc={"enabled": True}, **kw)
    off = img2img(acc={"enabled": False}, **kw)
    assert sizes(on) == [target]
    assert digests(on) == digests(again)
    assert digests(on) != digests(off)
    assert "AccDiffusion: True" in infotext(on) and "AccDiffusion" not in infotext(off)


def test_img2img_batch_and_tile_prompt_map():
    out = img2img(acc={"enabled": True, "tile_prompt_map": True}, batch_size=2,
                  images=[init_image(seed=1), init_image(seed=2)])
    assert sizes(out)[:2] == [(128, 128)] * 2 and len(out["images"]) == 4  # two images, two maps
    assert digests(out)[0] != digests(out)[1]


@pytest.mark.parametrize("extra", [{"mask": init_image(), "inpainting_fill": 1}, {"width": 64, "height": 64}])
def test_img2img_fallbacks_are_stock(extra):
    """Inpainting, and a target not larger than the probe: the stock img2img, and the infotext says
    so (``AccDiffusion stepped aside: <why>; the WebUI's own img2img ran``, never
    ``AccDiffusion: True``); the pixels are the stock img2img's."""
    img2img(acc={"enabled": False}, **extra)  # the first request of a new kind may differ (see img2img())
    off = img2img(acc={"enabled": False}, **extra)
    on = img2img(acc={"enabled": True}, **extra)
    assert (pixels(on, 0) == pixels(off, 0)).all()
    text = infotext(on)
    assert "AccDiffusion: True" not in text and "AccDiffusion stepped aside: " in text
    assert "the WebUI's own img2img ran" in text and "AccDiffusion" not in infotext(off)


def test_img2img_infotext_round_trip_reproduces_the_image():
    # the WebUI encodes the init image with the global torch RNG, whose state the previous request's
    # seed left (test_live_samplers.test_img2img_with_a_timestep_sampler): the same request first, so
    # the job before `first` and the one before the infotext request are alike (seed 7, 128 px img2img)
    img2img(acc={"enabled": True, "patch_prompt_threshold": 0.45})
    first = img2img(acc={"enabled": True, "patch_prompt_threshold": 0.45})
    text = infotext(first)
    assert "AccDiffusion patch prompt threshold: 0.45" in text
    # the img2img API takes neither the prompts nor the size, CFG scale and denoising strength from
    # the infotext (A1111 1.10.1 api.py apply_infotext with the img2img tab's paste fields): give
    # those; the rest, AccDiffusion's settings too, come from the text
    body = {"infotext": text, "init_images": [init_image()], "prompt": PROMPT, "negative_prompt": "blurry",
            "width": 128, "height": 128, "cfg_scale": 5,
            "denoising_strength": 0.5, "override_settings": {"sd_model_checkpoint": MODELS["sd15"]},
            "override_settings_restore_afterwards": True}
    body.update(HOST.infotext_fields(hires=False), **HOST.img2img_infotext_fields(steps=4))
    status, out = call("/sdapi/v1/img2img", body)
    assert status == 200, out
    assert sizes(out) == [(128, 128)] and "AccDiffusion patch prompt threshold: 0.45" in infotext(out)
    assert digests(out) == digests(first)
    stripped = ", ".join(part for part in text.split(", ") if not part.startswith("AccDiffusion patch"))
    status, other = call("/sdapi/v1/img2img", {**body, "infotext": stripped})
    assert status == 200 and digests(other) != digests(first)  # the threshold came from the infotext


def test_img2img_bad_arguments_are_rejected_with_a_message():
    body = {"init_images": [init_image()], "prompt": PROMPT, "steps": 2, "width": 128, "height": 128,
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True, "sigma": -1}]}}}
    status, out = call("/sdapi/v1/img2img", body)
    assert status == 422 and "'sigma'" in out["detail"]


def test_img2img_xyz_axis():
    status, scripts = call("/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and s["is_img2img"])
    axis = xyz["args"][0]["choices"].index("AccDiffusion Patch prompt threshold")
    body = {"init_images": [init_image()], "prompt": PROMPT, "steps": 3, "width": 128, "height": 128, "seed": 5,
            "denoising_strength": 0.6, "sampler_name": "Euler",
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True}]}}, "script_name": "x/y/z plot",
            "script_args": HOST.xyz_args(axis, "0.05,0.95")}
    status, out = call("/sdapi/v1/img2img", body)
    assert status == 200, out
    grid, low, high = pixel_digests(out)
    assert low != high


@pytest.mark.skipif(not PLAIN_URL, reason="set SD_WEBUI_PLAIN_URL to a WebUI without the extension")
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_img2img_disabled_is_identical_to_not_installed(model):
    # img2img encodes the init image with the global torch RNG (the VAE's sample()), whose state the
    # previous request's seed left behind: give both hosts the same throw-away request first
    for url in (URL, PLAIN_URL):
        _last_model.pop(url, None)
    assert digests(img2img(acc={"enabled": False}, model=model)) == digests(img2img(url=PLAIN_URL, model=model))
