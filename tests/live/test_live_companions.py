"""Opt-in: AccDiffusion beside another UNet tiler in the same request, on a live WebUI.

A1111 needs Tiled Diffusion (pkuliyi2015/multidiffusion-upscaler-for-automatic1111, tried at
22798f68) installed; Forge 2 and reForge have their built-in "MultiDiffusion Integrated" (Forge Neo's
is offered in img2img only; Forge Classic has none): tests/live/hosts.py says which. With both enabled,
AccDiffusion steps aside with a note (server log; the API's answer has no notes) and the image is
the other tiler's alone. Tiled Diffusion enabled but idle (one of its tiles covers the whole first-pass
latent) changes nothing, so AccDiffusion runs and says so.

    SD_WEBUI_URL=http://127.0.0.1:7876 [SD_WEBUI_LOG=<host log>] .venv/bin/python -m pytest -q tests/live/test_live_companions.py
    SD_WEBUI_URL=http://127.0.0.1:7877 SD_WEBUI_HOST=forge [SD_WEBUI_LOG=...] .venv/bin/python -m pytest -q tests/live/test_live_companions.py
"""

import os

import pytest

from hosts import HOST, script_offered
from test_live_api import URL, call, digests, img2img, infotext, pixels, sizes, txt2img

FORGE = HOST.tiler != "Tiled Diffusion"  # a Forge's built-in MultiDiffusion Integrated
LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")


def tiler(enabled, tile=16):
    if FORGE:  # the host's MultiDiffusion Integrated (its arguments: hosts.py)
        return HOST.tiler_request(enabled)
    # tilediffusion.py:246-255: enabled, method, overwrite size, keep input size, width, height,
    # tile width/height, overlap (latent pixels), tile batch size
    return {"Tiled Diffusion": {"args": [enabled, "MultiDiffusion", False, True, 1024, 1024, tile, tile, 8, 1]}}


def need_tiler(tab):
    if HOST.tiler is None:
        pytest.skip(f"{HOST.label} has no other UNet tiler")
    if tab not in HOST.tiler_tabs:
        pytest.skip(f"{HOST.label}'s {HOST.tiler} is not offered in {tab}")
    if not script_offered(HOST.tiler, tab):
        pytest.skip(f"{HOST.tiler} is not installed ({tab})")


@pytest.fixture
def txt2img_tiler():
    need_tiler("txt2img")


def run(acc, other, width, tile=16):
    out = txt2img(acc=None, width=width, height=width, steps=3,
                  alwayson_scripts={"AccDiffusion": {"args": [{"enabled": acc}]}, **tiler(other, tile)})
    return out


def assert_the_other_tiler_ran(both, alone, ours, side, start, name):
    """``both`` (AccDiffusion and the other tiler enabled) is the other tiler's image alone, and its
    infotext and the console say AccDiffusion stepped aside (never "AccDiffusion: True")."""
    assert sizes(both) == [(side, side)]
    assert (pixels(both, 0) == pixels(alone, 0)).all() and digests(alone) != digests(ours)
    assert "AccDiffusion: True" not in infotext(both) and "AccDiffusion stepped aside: " in infotext(both)
    assert "AccDiffusion" not in infotext(alone) and "AccDiffusion: True" in infotext(ours)
    if LOG:
        with open(LOG, errors="replace") as f:
            f.seek(start)
            assert f"AccDiffusion: {name} is enabled and tiles the UNet itself" in f.read()


def test_another_tiler_enabled_makes_accdiffusion_step_aside(txt2img_tiler):
    width = 128 if FORGE else 192  # Tiled Diffusion only tiles a first pass larger than one tile
    start = os.path.getsize(LOG) if LOG else 0
    both = run(True, True, width)
    alone = run(False, True, width)
    ours = run(True, False, width)
    assert_the_other_tiler_ran(both, alone, ours, 2 * width, start,
                               "Forge's MultiDiffusion" if FORGE else "Tiled Diffusion")


@pytest.mark.skipif(FORGE, reason="Tiled Diffusion (A1111): a Forge's MultiDiffusion has no idle rule")
@pytest.mark.parametrize("tile", [32, 64])  # first-pass latent 24×24, hires latent 48×48
def test_tiled_diffusion_enabled_but_idle_leaves_the_hires_pass_to_accdiffusion(txt2img_tiler, tile):
    start = os.path.getsize(LOG) if LOG else 0
    both = run(True, True, 192, tile)
    ours = run(True, False, 192)
    assert sizes(both) == [(384, 384)]
    assert digests(both) == digests(ours)  # idle Tiled Diffusion touches nothing; AccDiffusion tiled the hires pass
    assert "AccDiffusion: True" in infotext(both) and "Tiled Diffusion" not in infotext(both)
    if LOG:
        with open(LOG, errors="replace") as f:
            f.seek(start)
            text = f.read()
        assert f"AccDiffusion: Tiled Diffusion is enabled but idle (one {tile}×{tile} tile covers the whole 24×24" in text
        assert "tiles the UNet itself" not in text


@pytest.mark.skipif(not FORGE, reason="img2img beside a Forge's MultiDiffusion Integrated (A1111's Tiled "
                                      "Diffusion is checked in txt2img)")
def test_multidiffusion_in_img2img_makes_accdiffusion_step_aside():
    """img2img upscale 64 → 256 px with the host's MultiDiffusion Integrated on: the image is its alone
    and the infotext says AccDiffusion stepped aside (Neo offers its tiler in img2img only)."""
    need_tiler("img2img")
    start = os.path.getsize(LOG) if LOG else 0

    def run(ours, theirs):
        return img2img(acc=None, width=256, height=256, steps=3, alwayson_scripts={
            "AccDiffusion": {"args": [{"enabled": ours}]}, **HOST.tiler_request(theirs)})

    # the WebUI encodes the init image with the global torch RNG before the request seeds it: each
    # compared request after the same one
    run(False, True)
    both = run(True, True)
    run(False, True)
    alone = run(False, True)
    ours = run(True, False)
    assert_the_other_tiler_ran(both, alone, ours, 256, start, "Forge's MultiDiffusion")
