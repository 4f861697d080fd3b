"""The ``prompt_units`` setting on a live WebUI: through the API, the infotext (written, and read
back by the host's own infotext paste) and as an X/Y/Z axis.

    SD_WEBUI_URL=http://127.0.0.1:7860 [SD_WEBUI_HOST=...] .venv/bin/python -m pytest -q tests/live/test_live_prompt_units.py

The tile-prompt map (the second image) draws each tile's prompt, so it shows whether phrases or
words were the units even where the tiny model's image would not.
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hosts import HOST  # noqa: E402
from test_live_api import URL, call, digests, infotext, pixel_digests, txt2img  # noqa: E402

pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

TAGS = "1girl, red hair, blue eyes, white dress, city street, night"


def run(units=None, **kw):
    acc = {"enabled": True, "tile_prompt_map": True}
    if units:
        acc["prompt_units"] = units
    return txt2img(acc=acc, prompt=TAGS, **kw)


def test_words_and_phrases_make_different_tile_prompts_and_say_so():
    # 128 px first pass: the map's 128 px tiles show enough of each tile prompt to tell them apart
    # (Forge Neo's Pillow 12 default font at 64 px tiles draws both maps alike)
    size = dict(width=128, height=128)
    default, words, phrases = run(**size), run("words", **size), run("phrases", **size)
    assert len(words["images"]) == 2  # the image and its tile-prompt map
    assert digests(default) == digests(phrases)  # phrases is the default
    assert digests(words)[1] != digests(phrases)[1]  # other tile prompts on the map
    assert "AccDiffusion prompt units: words" in infotext(words)
    assert "AccDiffusion prompt units" not in infotext(phrases)  # the default is not written


def test_prompt_units_round_trip_through_the_infotext():
    first = run("words")
    text = infotext(first)
    body = {"infotext": text, "hr_sampler_name": "Euler", **HOST.infotext_fields(5)}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    assert digests(out)[0] == digests(first)[0]
    assert "AccDiffusion prompt units: words" in infotext(out)
    # without the key the infotext reads as the default (phrases): another tile-prompt map
    stripped = text.replace(", AccDiffusion prompt units: words", "")
    assert stripped != text
    status, other = call("/sdapi/v1/txt2img", {**body, "infotext": stripped})
    assert status == 200, other
    assert "AccDiffusion prompt units" not in infotext(other)


def test_bad_prompt_units_are_rejected_with_a_message():
    body = {"prompt": TAGS, "steps": 2, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler", **HOST.hires(7),
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": True, "prompt_units": "sentences"}]}}}
    status, out = call("/sdapi/v1/txt2img", body)
    assert status >= 400 and "prompt_units" in json.dumps(out) and "phrases" in json.dumps(out)


@pytest.mark.parametrize("img2img", [False, True])
def test_prompt_units_is_an_xyz_axis(img2img):
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and s["is_img2img"] == img2img)
    choices = xyz["args"][0]["choices"]
    axis = choices.index("AccDiffusion Prompt units")
    if img2img:
        return  # offered in the img2img list too; the run below is the txt2img one
    body = {"prompt": TAGS, "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64,
            "enable_hr": True, "hr_scale": 2, "hr_upscaler": HOST.upscaler("Latent"), "hr_sampler_name": "Euler",
            "seed": 5, "denoising_strength": 0.6, "sampler_name": "Euler", "cfg_scale": 5, **HOST.hires(5),
            "alwayson_scripts": {"AccDiffusion": {"args": [{"enabled": False}]}},
            "script_name": "x/y/z plot"}
    # a choices axis reads its values from the dropdown list (xyz_grid: not csv_mode)
    body["script_args"] = HOST.xyz_args(axis, "", ["phrases", "words"])
    status, out = call("/sdapi/v1/txt2img", body)
    assert status == 200, out
    texts = json.loads(out["info"])["infotexts"]
    assert 'X Values: "phrases,words"' in texts[0]
    # the axis turns AccDiffusion on for its cells, with the cell's units
    cells = [t for t in texts[1:] if "AccDiffusion: True" in t]
    assert len(cells) == 2, texts
    assert "AccDiffusion prompt units: words" in cells[1] and "prompt units" not in cells[0]
    # each cell equals a plain request with that setting (same seed), pixel for pixel (reForge returns
    # the cells it saved as RGBA PNGs: test_live_api.pixel_digests)
    alone = {u: pixel_digests(txt2img(acc={"enabled": True, "prompt_units": u}, prompt=TAGS, steps=3, seed=5))[0]
             for u in ("phrases", "words")}
    assert pixel_digests(out)[1:] == [alone["phrases"], alone["words"]]
