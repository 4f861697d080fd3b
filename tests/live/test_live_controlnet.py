"""Opt-in: ControlNet units in the tiled pass of a live AUTOMATIC1111 1.10.1 with
sd-webui-controlnet v1.1.455, or of a live Forge 2 with its built-in ControlNet, and the tiny
ControlNet of ../shared/tinymodel/controlnet/.

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

Forge 2 (built-in ControlNet; the same tiny-cn-sd15.safetensors loads unchanged once the tiny SD1.5
shapes are registered, e.g. by a preload extension that adds them to huggingface_guess's model list;
its module is called "None" there):

    mkdir -p /work/live-x/extensions /work/live-x/models/ControlNet
    ln -sfn <this checkout> /work/live-x/extensions/sd-webui-accdiffusion
    ln -sfn <forge-tiny-models> /work/live-x/extensions/forge-tiny-models
    cp ../shared/tinymodel/controlnet/tiny-cn-sd15.safetensors /work/live-x/models/ControlNet/
    echo '{"show_progress_type": "Approx cheap"}' > /work/live-x/config.json
    /work/ext-forge/start-forge.sh 7877 --data-dir /work/live-x --loglevel DEBUG
    SD_WEBUI_URL=http://127.0.0.1:7877 SD_WEBUI_HOST=forge SD_WEBUI_LOG=/work/ext-forge/logs/forge-7877.log \
        .venv/bin/python -m pytest -q tests/live/test_live_controlnet.py

With SD_WEBUI_LOG (the host's log, started with ``--loglevel DEBUG``) the per-window hint crops the
extension logs are compared with the windows of the stage. On Forge, a probe extension in the host
that wraps every ControlNet's ``get_control`` and logs, per batch row, where the hint it really got
sits in ``cond_hint_original`` (lines "[cn-probe] Forge unit ... src: crop (top, left) ...", as
the workplace's test-extensions/zz-cn-probe writes them) is checked too, when present: no hires
call may get the whole hint, and the crops found are exactly the logged windows.
"""

import base64
import io
import os
import re

import pytest

from hosts import HOST
from test_live_api import URL, call

FORGE = HOST.controlnet == "builtin"  # a Forge's built-in ControlNet (Forge 2, Neo, reForge, Classic)

LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL (A1111 with sd-webui-controlnet, or a Forge)")


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
        what = "sd-webui-controlnet" if HOST.controlnet == "extension" else f"{HOST.label}'s built-in ControlNet"
        pytest.skip(f"{what} with tiny-cn-sd15 (models/ControlNet) is not installed")
    return next(m for m in out["model_list"] if m.startswith("tiny-cn-sd15"))


def unit(model, **kw):
    return {"enabled": True, "image": hint_png(), "module": "None" if FORGE else "none", "model": model, "weight": 1.0,
            "pixel_perfect": True, **kw}


def log_size():
    return os.path.getsize(LOG) if LOG else 0


def log_text(start):
    with open(LOG, errors="replace") as f:
        f.seek(start)
        text = f.read()
    # Neo's log lines carry no level name: our debug lines (the tile prompts) tell that DEBUG is on
    if "AccDiffusion stage" in text and "DEBUG" not in text and " tile prompts: " not in text:
        pytest.fail(f"{LOG} has AccDiffusion's info lines but none of its debug lines: start the host with "
                    "--loglevel DEBUG (or unset SD_WEBUI_LOG to skip the log checks)")
    return text


def logged_crops(text):
    return re.findall(r"AccDiffusion ControlNet unit (\d+) hint \(\d+, 3, (\d+), (\d+)\): (.*)", text)


def probed_forge_crops(text):
    """(hires?, src) of every Forge ControlNet call the probe saw."""
    return re.findall(r"\[cn-probe\] Forge unit \d+ \w+ x \([^)]*\) hint \([^)]*\) is_hr_pass=(\w+) src: (.*)", text)


def forge_calls(text):
    """(unit, x shape, hint shape, src) of every Forge ControlNet call the probe extension saw."""
    return re.findall(r"\[cn-probe\] Forge unit (\d+) \w+ x \(([^)]*)\) hint \(([^)]*)\) is_hr_pass=\w+ src: (.*)", text)


def split_probe_pass(text):
    """(the AccDiffusion probe pass's part of a job's log or None, the rest): the probe's ControlNet
    calls follow its "AccDiffusion probe pass" line and come before the next sampling's
    "[cn-probe] pass" line (written when that sampling's units are attached), or, on a host
    without the cn-probe extension, end with the probe's summary line ("AccDiffusion probe pass
    (img2img): ... UNet calls"), written before the tiled pass starts."""
    found = re.search(r"AccDiffusion probe pass: \d+ ControlNet", text)
    if found is None:
        return None, text
    marks = [i for i in (text.find("[cn-probe] pass ", found.end()),) if i >= 0]
    summary = re.search(r"AccDiffusion probe pass \([^)]*\): .*\n?", text[found.end():])
    if summary is not None:
        marks.append(found.end() + summary.end())
    end = min(marks, default=len(text))
    return text[found.start():end], text[:found.start()] + text[end:]


CASES = {
    "2x": dict(width=128, height=128, hr_scale=2),
    "1.5x padded": dict(width=128, height=128, hr_scale=1.5),
    "320 at 1.5x": dict(width=320, height=320, hr_scale=1.5, steps=2, hr_second_pass_steps=2),
    "overlap": dict(width=128, height=128, hr_scale=2, acc={"window_mode": "overlap"}),
    "window 24": dict(width=128, height=128, hr_scale=2, acc={"window_mode": "overlap", "window_size": 24}),
    "batch 2": dict(width=128, height=128, hr_scale=2, batch_size=2),
    # shifted windows (the default; the cases above name overlap, whose windows all have one size)
    "shifted": dict(width=128, height=128, hr_scale=2, acc={"window_mode": "shifted"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("modes", [("Both", "Both"), ("Low res only", "High res only")])
def test_two_units_in_the_tiled_pass(cn_model, case, modes):
    kw = dict(CASES[case])
    acc = {"enabled": True, "window_mode": "overlap", **kw.pop("acc", {})}
    start = log_size()
    body_units = [unit(cn_model, resize_mode="Crop and Resize", hr_option=modes[0]),
                  unit(cn_model, weight=0.6, hr_option=modes[1], guidance_start=0.2, guidance_end=0.9)]
    status, out = call("/sdapi/v1/txt2img", {**HOST.hires(5),
        "prompt": "a red-haired astronaut riding a horse on the moon", "negative_prompt": "blurry", "steps": 3,
        "enable_hr": True, "hr_upscaler": HOST.upscaler("Latent"), "denoising_strength": 0.6, "seed": 7, "sampler_name": "Euler",
        "cfg_scale": 5, **kw,
        "alwayson_scripts": {"AccDiffusion": {"args": [acc]}, "ControlNet": {"args": body_units}}})
    assert status == 200, out
    from PIL import Image

    images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in out["images"]]
    target = HOST.hires_size(kw["width"], kw["height"], kw["hr_scale"])[0]  # Neo: rounded to 64 (480 -> 512)
    assert [im.size for im in images[:kw.get("batch_size", 1)]] == [(target, target)] * kw.get("batch_size", 1)
    assert "AccDiffusion: True" in out["info"]
    if not LOG:
        return
    text = log_text(start)
    crops = logged_crops(text)
    units = {int(u) for u, *_ in crops}
    # A1111 swaps the hint of every unit (a "Low res only" one then sits the call out); Forge's
    # ControlNet leaves a "Low res only" unit out of the hires pass itself
    assert units == ({2} if FORGE and modes[0] == "Low res only" else {1, 2})
    side = target // 8 * 8
    windows = {tuple(map(int, box)) for *_, where in crops
               for box in re.findall(r"px y(\d+):(\d+) x(\d+):(\d+)", where)}
    assert windows
    for _, h, w, where in crops:
        assert (int(h), int(w)) == (side, side)
    for top, bottom, left, right in windows:
        assert 0 <= top < bottom <= side and 0 <= left < right <= side
        if acc.get("window_mode") == "overlap":  # windows of the window size (first-pass latent), overlapping
            window = acc.get("window_size") or kw["width"] // 8
            assert bottom - top == min(window, target // 8) * 8
        else:  # shifted (the default): each step's windows tile the image, cut where another window starts
            assert top == 0 or top in {b for _, b, _, _ in windows}
            assert bottom == side or bottom in {t for t, _, _, _ in windows}
            assert left == 0 or left in {r for _, _, _, r in windows}
            assert right == side or right in {lft for _, _, lft, _ in windows}
    probed = probed_forge_crops(text)
    if FORGE and probed:
        hires = [src for is_hr, src in probed if is_hr == "True" and not src.startswith("skipped")]
        assert hires and not any(src.startswith("whole hint") for src in hires)
        found = {tuple(map(int, xy)) for src in hires for xy in re.findall(r"\((\d+), (\d+)\)", src)}
        assert found == {(top, left) for top, _, left, _ in windows}


def test_img2img_with_two_units(cn_model):
    """img2img upscale through the tiled pass (probe pass first): two units, crops logged and, on
    Forge with the probe extension, found where the logged windows are; on Forge the probe pass
    itself runs with both units (its log line; with the probe extension: each unit's whole hint at
    the probe size, on the positive row only)."""
    from test_live_api import init_image

    start = log_size()
    status, out = call("/sdapi/v1/img2img", {
        "init_images": [init_image()], "prompt": "a red-haired astronaut riding a horse on the moon",
        "negative_prompt": "blurry", "steps": 4, "width": 128, "height": 128, "denoising_strength": 0.5, "seed": 7,
        "sampler_name": "Euler", "cfg_scale": 5, "resize_mode": 0,
        "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True}]},
                             "ControlNet": {"args": [unit(cn_model), unit(cn_model, weight=0.6, guidance_start=0.2)]}}})
    assert status == 200, out
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).size == (128, 128)
    assert "AccDiffusion: True" in out["info"]
    if not LOG:
        return
    text = log_text(start)
    probe_part, text = split_probe_pass(text)
    if FORGE:  # the probe pass (64 px: the init image's size) runs with both units, whole hints
        assert probe_part is not None and "AccDiffusion probe pass: 2 ControlNet(s)" in probe_part
        calls = forge_calls(probe_part)
        if calls:  # with the probe extension: both units, three noise levels, the positive row only
            assert len(calls) == 6 and {u for u, *_ in calls} == {"0", "1"}
            # the 128 px hint resized to 64 px: no crop of it ("?"), or "whole hint" at equal sizes
            assert all(x == "1, 4, 8, 8" and hint == "1, 3, 64, 64" and src.startswith(("whole hint", "crop ? x1"))
                       for _, x, hint, src in calls)
    crops = logged_crops(text)
    assert {int(u) for u, *_ in crops} == {1, 2}
    windows = {(int(top), int(left)) for _, h, w, where in crops
               for top, _, left, _ in re.findall(r"px y(\d+):(\d+) x(\d+):(\d+)", where)}
    assert all((int(h), int(w)) == (128, 128) for _, h, w, _ in crops) and windows
    probed = probed_forge_crops(text)
    if FORGE and probed:
        found = {tuple(map(int, xy)) for _, src in probed for xy in re.findall(r"\((\d+), (\d+)\)", src)}
        assert found == windows and not any(src.startswith("whole hint") for _, src in probed)
