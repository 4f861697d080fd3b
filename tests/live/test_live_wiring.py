"""Live checks of the window mode, the automatic tile batch and their surfaces (API schema,
infotext, X/Y/Z axis), txt2img hires and img2img; run like test_live_api.py:

    SD_WEBUI_URL=http://127.0.0.1:7860 [SD_WEBUI_HOST=...] .venv/bin/python -m pytest -q tests/live

Sizes are chosen so the shifted grid really moves: its offsets are multiples of 8 latent px, so
the window must be at least 16 latent px (128 px first pass, or window_size 16).
"""

import json

import pytest

from hosts import HOST
from test_live_api import URL, call, digests, img2img, infotext, init_image, pixel_digests, sizes, txt2img

pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

SHIFTED = {"enabled": True, "window_mode": "shifted"}


def test_settings_endpoint_lists_window_mode_and_automatic_batch():
    status, schema = call("/accdiffusion/v1/settings")
    assert status == 200
    props = schema["properties"]
    assert props["window_mode"]["enum"] == ["overlap", "shifted"] and props["window_mode"]["default"] == "shifted"
    assert props["tile_batch_size"]["default"] == 0


def test_shifted_hires_sizes_reproducible_and_differs_from_overlap():
    kw = dict(width=128, height=128, hr_scale=2, steps=3, hr_second_pass_steps=4)
    shifted = txt2img(acc=SHIFTED, **kw)
    again = txt2img(acc=SHIFTED, **kw)
    overlap = txt2img(acc={"enabled": True, "window_mode": "overlap"}, **kw)  # shifted is the default
    assert digests(txt2img(acc={"enabled": True}, **kw)) == digests(shifted)
    assert sizes(shifted) == [(256, 256)]
    assert digests(shifted) == digests(again)
    assert digests(shifted) != digests(overlap)
    # both written (an infotext without the key replays overlap, the mode of the days before the key)
    assert "AccDiffusion window mode: shifted" in infotext(shifted)
    assert "AccDiffusion window mode: overlap" in infotext(overlap)
    assert "AccDiffusion tile batch size" not in infotext(shifted)  # automatic: not written


def test_shifted_hires_with_tile_prompt_map_and_a_set_batch():
    out = txt2img(acc={**SHIFTED, "tile_prompt_map": True, "tile_batch_size": 3}, width=128, height=128,
                  hr_scale=2, steps=3, hr_second_pass_steps=3)
    assert sizes(out) == [(256, 256)] * 2  # the image, then its map
    assert "AccDiffusion tile batch size: 3" in infotext(out)


def test_shifted_img2img_sizes_reproducible_and_differs_from_overlap():
    acc = {**SHIFTED, "window_size": 16, "progressive": False}  # 64 px probe → 256 px: 32 latent px
    kw = dict(images=[init_image(64, 64)], width=256, height=256, steps=3)
    shifted = img2img(acc=acc, **kw)
    again = img2img(acc=acc, **kw)
    overlap = img2img(acc={**acc, "window_mode": "overlap"}, **kw)
    assert sizes(shifted) == [(256, 256)]
    assert digests(shifted) == digests(again)
    assert digests(shifted) != digests(overlap)
    assert "AccDiffusion window mode: shifted" in infotext(shifted)


def test_xyz_axis_window_mode():
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = xyz["args"][0]["choices"].index("AccDiffusion Window mode")
    body = {"prompt": "a red-haired astronaut riding a horse on the moon", "steps": 3, "width": 128, "height": 128,
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler",
            "seed": 5, "denoising_strength": 0.6, "hr_second_pass_steps": 3, **HOST.hires(7),
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True}]}}, "script_name": "x/y/z plot",
            # an axis with choices takes its values from the dropdown list (the third argument)
            "script_args": HOST.xyz_args(axis, "", ["overlap", "shifted"])}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert len(out["images"]) == 3  # grid + two cells
    grid, overlap, shifted = pixel_digests(out)
    assert overlap != shifted
    infos = json.loads(out["info"])["infotexts"]
    assert "X Type: AccDiffusion Window mode" in infos[0] and "overlap" in infos[0] and "shifted" in infos[0]
    assert any("AccDiffusion window mode: shifted" in t for t in infos[1:])
