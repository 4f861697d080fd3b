"""Every sampler of the WebUI's hires (and img2img) pass runs AccDiffusion's tiled pass: the
k-diffusion ones and the timestep ones (DDIM, DDIM CFG++, PLMS, UniPC: A1111
modules/sd_samplers_timesteps.py and Forge's copy), each reproducible with the same seed, with its
stage lines in the host's log (SD_WEBUI_LOG: window evaluations, every UNet call a batch of
windows) and AccDiffusion in the infotext (Forge's extra DDPM, a k-diffusion sampler, too); a sampler it cannot drive (A1111's and Forge's LCM)
steps aside and the infotext says so."""

from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hosts import HOST, need_sampler, need_scheduler  # noqa: E402
from test_live_api import URL, digests, img2img, infotext, init_image, sizes, txt2img  # noqa: E402

LOG = os.environ.get("SD_WEBUI_LOG")
pytestmark = pytest.mark.skipif(not URL, reason="set SD_WEBUI_URL to run against a live WebUI")

TIMESTEP_SAMPLERS = ["DDIM", "DDIM CFG++", "PLMS", "UniPC"]
STAGE = re.compile(r"AccDiffusion stage (\d+) \((\d+)x(\d+) latent, (\w+) windows\): (\d+) windows per UNet call "
                   r".*?, (\d+) UNet calls, (\d+) window evaluations")


def log_size() -> int:
    return os.path.getsize(LOG) if LOG else 0


def stage_lines(start: int) -> list[tuple[int, ...]]:
    """(stage, width, height, windows per call, UNet calls, window evaluations) of the stage lines
    the host wrote since ``start``."""
    if not LOG:
        return []
    with open(LOG, errors="replace") as f:
        f.seek(start)
        text = f.read()
    return [(int(m[1]), int(m[2]), int(m[3]), int(m[5]), int(m[6]), int(m[7])) for m in STAGE.finditer(text)]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"] + TIMESTEP_SAMPLERS + list(HOST.extra_samplers))
def test_each_hires_sampler_runs_the_tiled_pass(sampler):
    need_sampler(sampler)
    kw = dict(sampler_name=sampler, hr_sampler_name=sampler, hr_scale=3, steps=6, hr_second_pass_steps=4)
    start = log_size()
    on = txt2img(acc={"enabled": True}, **kw)
    lines = stage_lines(start)
    again = txt2img(acc={"enabled": True}, **kw)
    off = txt2img(acc={"enabled": False}, **kw)
    assert sizes(on) == [(192, 192)]
    assert digests(on) == digests(again)  # the same seed, the same image
    assert digests(on) != digests(off)
    text = infotext(on)
    assert "AccDiffusion: True" in text and "AccDiffusion stepped aside" not in text
    if LOG:  # 3×: stages 2× (16×16) and 3× (24×24), each denoised in windows of the 8×8 first-pass latent
        assert [(s, w, h) for s, w, h, *_ in lines] == [(1, 16, 16), (2, 24, 24)], lines
        assert all(calls > 0 and evals >= calls for *_, calls, evals in lines)


@pytest.mark.parametrize("sampler", ["DDIM", "UniPC"])
def test_img2img_with_a_timestep_sampler(sampler):
    need_sampler(sampler)
    kw = dict(images=[init_image()], width=192, height=192, sampler_name=sampler, steps=8)  # UniPC: order < steps
    # The WebUI encodes the init image before it seeds torch's global RNG in the request, and the VAE
    # samples its posterior from it (Forge backend/nn/vae.py; a tiny random VAE's std is large): the
    # stock img2img depends on the seed of the request before (seen live on the plain Forge). One
    # same request first, so both compared requests start from the state it leaves.
    img2img(acc={"enabled": True}, **kw)
    start = log_size()
    on = img2img(acc={"enabled": True}, **kw)
    lines = stage_lines(start)
    assert digests(on) == digests(img2img(acc={"enabled": True}, **kw))
    assert digests(on) != digests(img2img(acc={"enabled": False}, **kw))
    assert "AccDiffusion: True" in infotext(on) and sizes(on) == [(192, 192)]
    if LOG:
        assert lines and all(calls > 0 for *_, calls, _ in lines), lines


@pytest.mark.parametrize("scheduler", ["Karras", "Exponential", "SGM Uniform"])
def test_hires_scheduler_is_honoured(scheduler):
    need_scheduler(scheduler)
    kw = dict(sampler_name="Euler", hr_sampler_name="DPM++ 2M", hr_scheduler=scheduler)
    on = txt2img(acc={"enabled": True}, **kw)
    assert digests(on) == digests(txt2img(acc={"enabled": True}, **kw))
    other = "Exponential" if scheduler != "Exponential" else "Karras"
    assert digests(on) != digests(txt2img(acc={"enabled": True}, **{**kw, "hr_scheduler": other}))
    assert f"Hires schedule type: {scheduler}" in infotext(on) and "AccDiffusion: True" in infotext(on)


def test_an_unsupported_sampler_steps_aside_and_says_so():
    """LCM has its own output scaling: the WebUI's own hires fix runs, with a note, and the infotext
    says AccDiffusion stepped aside (not that it ran); the pixels are the stock hires fix's."""
    need_sampler("LCM")
    if not HOST.lcm_steps_aside:
        pytest.skip(f"{HOST.label}'s LCM is k-diffusion's sample_lcm: the tiled pass drives it "
                    "(test_each_hires_sampler_runs_the_tiled_pass[LCM])")
    from test_live_api import pixels

    on = txt2img(acc={"enabled": True, "sigma": 1.0}, hr_sampler_name="LCM")
    off = txt2img(acc={"enabled": False}, hr_sampler_name="LCM")
    text = infotext(on)
    assert "AccDiffusion: True" not in text and "AccDiffusion sigma" not in text
    assert "AccDiffusion stepped aside: \"the hires sampler 'LCM' is not supported" in text
    assert "the WebUI's own hires fix ran" in text
    assert (pixels(on, 0) == pixels(off, 0)).all()
