"""Opt-in: ControlNet units in the tiled pass of a live AUTOMATIC1111 1.10.1 with
sd-webui-controlnet v1.1.455 and the tiny ControlNet of ../shared/tinymodel/controlnet/.

Recipe (paths of this workplace; any A1111 with the tiny SD1.5 model works the same way):

    mkdir -p /work/live-issue10/extensions /work/live-issue10/models/ControlNet
    ln -sfn <this checkout> /work/live-issue10/extensions/sd-webui-accdiffusion
    ln -sfn <webui>/extensions/sd-webui-controlnet /work/live-issue10/extensions/   # v1.1.455
    ln -sfn ../shared/tinymodel/controlnet/cn-tiny-shim /work/live-issue10/extensions/cn-tiny-shim
    cp ../shared/tinymodel/controlnet/tiny-cn-sd15.safetensors /work/live-issue10/models/ControlNet/
    cp <webui>/config.json /work/live-issue10/   # "show_progress_type": "Approx cheap"
    /work/ext/start-a1111.sh 7874 --data-dir /work/live-issue10 --loglevel DEBUG
    SD_WEBUI_URL=http://127.0.0.1:7874 SD_WEBUI_LOG=/work/ext/logs/a1111-7874.log \\
        .venv/bin/python -m pytest -q tests/live/test_live_controlnet.py

With SD_WEBUI_LOG (the host's log, started with ``--loglevel DEBUG``) the per-window hint crops the
extension logs are compared with the windows of the stage.
"""

import base64
import io
import os
import re

import pytest

from test_live_api import FORGE, URL, call, txt2img

LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = pytest.mark.skipif(not URL or FORGE, reason="set SD_WEBUI_URL (A1111 with sd-webui-controlnet)")


def hint_png(size=256):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 8, size // 8, size // 2, size // 2], fill="white")
    draw.ellipse([size // 2, size // 2, size - 8, size - 8], fill="gray")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def cn_model():
    status, out = call("/controlnet/model_list")
    if status != 200 or not any(m.startswith("tiny-cn-sd15") for m in out.get("model_list", [])):
        pytest.skip("sd-webui-controlnet with tiny-cn-sd15 is not installed")
    return next(m for m in out["model_list"] if m.startswith("tiny-cn-sd15"))


def unit(model, **kw):
    return {"enabled": True, "image": hint_png(), "module": "none", "model": model, "weight": 1.0,
            "pixel_perfect": True, **kw}


def log_size():
    return os.path.getsize(LOG) if LOG else 0


def logged_crops(start):
    with open(LOG, errors="replace") as f:
        f.seek(start)
        text = f.read()
    return re.findall(r"AccDiffusion ControlNet unit (\d+) hint \(1, 3, (\d+), (\d+)\): (.*)", text)


CASES = {
    "2x": dict(width=128, height=128, hr_scale=2),
    "1.5x padded": dict(width=128, height=128, hr_scale=1.5),
    "320 at 1.5x": dict(width=320, height=320, hr_scale=1.5, steps=2, hr_second_pass_steps=2),
    "window 24": dict(width=128, height=128, hr_scale=2, acc={"window_size": 24}),
    "batch 2": dict(width=128, height=128, hr_scale=2, batch_size=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("modes", [("Both", "Both"), ("Low res only", "High res only")])
def test_two_units_in_the_tiled_pass(cn_model, case, modes):
    kw = dict(CASES[case])
    acc = {"enabled": True, **kw.pop("acc", {})}
    start = log_size()
    body_units = [unit(cn_model, resize_mode="Crop and Resize", hr_option=modes[0]),
                  unit(cn_model, weight=0.6, hr_option=modes[1], guidance_start=0.2, guidance_end=0.9)]
    status, out = call("/sdapi/v1/txt2img", {
        "prompt": "a red-haired astronaut riding a horse on the moon", "negative_prompt": "blurry", "steps": 3,
        "enable_hr": True, "hr_upscaler": "Latent", "denoising_strength": 0.6, "seed": 7, "sampler_name": "Euler",
        "cfg_scale": 5, **kw,
        "alwayson_scripts": {"AccDiffusion": {"args": [acc]}, "ControlNet": {"args": body_units}}})
    assert status == 200, out
    from PIL import Image

    images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in out["images"]]
    target = int(kw["width"] * kw["hr_scale"])
    assert [im.size for im in images[:kw.get("batch_size", 1)]] == [(target, target)] * kw.get("batch_size", 1)
    assert "AccDiffusion: True" in out["info"]
    if not LOG:
        return
    crops = logged_crops(start)
    units = {int(u) for u, *_ in crops}
    assert units == ({1, 2} if modes == ("Both", "Both") else {1, 2})  # the hint is swapped for every unit
    for _, h, w, text in crops:
        assert (int(h), int(w)) == (target // 8 * 8, target // 8 * 8)
        for top, bottom, left, right in re.findall(r"px y(\d+):(\d+) x(\d+):(\d+)", text):
            assert 0 <= int(top) < int(bottom) <= int(h) and 0 <= int(left) < int(right) <= int(w)
            side = acc.get("window_size") or kw["width"] // 8
            assert int(bottom) - int(top) == min(side, target // 8) * 8
