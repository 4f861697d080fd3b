"""ControlNet (sd-webui-controlnet v1.1.455) in the tiled pass on A1111, through stand-ins of its
ControlParams / UnetHook / script (tests/a1111_standins.py) on the real ldm UNet and k-diffusion.

The hints are position-coded (tests/test_control.py): with a "control-only" model whose denoised
output is the hint it got (block means), the fused denoised latent equals the hires hint exactly
when every window and every dilated item got its own crop through ControlNet's own hint choice.
"""

from __future__ import annotations

import pytest
import torch

from accdiffusion.backends import a1111
from accdiffusion.entry import facade
from accdiffusion.method.hires import StageDenoiser, plan_stages, stage_windows
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import (ControlModelType, ControlParamsStandIn, HiResFixOption, StandInModel, Txt2ImgStandIn,
                            WebUIStandIn, attach_controlnet, process_images)
from test_control import block_means, position_hint

PROMPT = "a red-haired astronaut riding a horse on the moon"


@pytest.fixture()
def sd1_model(sd1_host):
    model = StandInModel(sd1_host, sdxl=False)
    yield model
    model.controlnet = None


def cfg_cond(model, p, rows):
    """The CFG denoiser's cond dict for ``rows`` rows (A1111 SD1 layout)."""
    text = torch.stack([model.encode(PROMPT)] * rows)
    return {"c_crossattn": [text], "c_concat": [torch.zeros(rows, 5, 1, 1)]}


@pytest.mark.parametrize("base,target,window_size,mode", [((8, 8), (16, 16), 0, "overlap"),
                                                          ((8, 8), (12, 12), 0, "overlap"),
                                                          ((8, 8), (20, 20), 16, "overlap"),
                                                          ((16, 8), (24, 12), 0, "overlap"),
                                                          ((8, 8), (32, 32), 16, "shifted"),
                                                          # not a multiple of 8 nor of the window: shifted
                                                          # edge windows padded, sub-latents 5×7 padded to 8×8
                                                          ((8, 8), (20, 28), 16, "shifted")])
def test_every_item_gets_its_own_hint_through_controlnets_hint_choice(sd1_model, base, target, window_size, mode):
    """2×, 1.5× (sub-latents padded), 2.5× (s = 3) with window_size 16, and a tall image: two
    units, a batch of two images (4 CFG rows), one hint per unit."""
    settings = AccDiffusionSettings(enabled=True, sigma=0.0, window_size=window_size, tile_batch_size=3,
                                    window_mode=mode)
    stage = plan_stages(base, target, progressive=False)[0]
    windows = stage_windows(stage, base, settings)
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT, PROMPT], width=base[1] * 8, height=base[0] * 8)
    hr = position_hint(*target)
    params = [ControlParamsStandIn(torch.full((1, 3, base[0] * 8, base[1] * 8), -1.0), hr),
              ControlParamsStandIn(torch.full((1, 3, base[0] * 8, base[1] * 8), -1.0), hr.clone(), weight=0.5)]
    network = attach_controlnet(p, params, control_only=True)
    originals = [param.hr_hint_cond for param in params]
    job = facade.start_job(p, settings, webui=webui)
    sampler = webui.create_sampler("Euler", sd1_model)
    denoiser = StageDenoiser(stage, windows, settings, 1, sampler.model_wrap.sigma_to_t)
    try:
        job.backend.hook_stage(job, p, sampler, denoiser, job.backend.sampler_space(p, sampler, "k-diffusion"), [[]],
                               [None, None], windows)
        x = torch.randn(4, 4, *target)
        for sigma in ((4.0, 2.0) if mode == "overlap" else (4.0, 3.0, 2.0, 1.0)):  # two steps: two shuffles
            out = sampler.model_wrap.forward(x, torch.full((4,), sigma), cond=cfg_cond(sd1_model, p, 4))
            assert torch.allclose(out, 1.5 * block_means(hr)[:, :1].expand_as(out), atol=1e-2)
        assert mode == "overlap" or denoiser.windows_at(3) != denoiser.windows_at(0)  # the grid moved
        if mode == "shifted" and target[0] % 8:  # edge windows that are not a multiple of 8 were padded
            assert any(w.height % 8 or w.width % 8 for step in range(4) for w in denoiser.windows_at(step))
    finally:
        job.end_batch()
    assert network.calls and all(is_hr and [u for u, _ in ran] == [0, 1] for _, is_hr, ran in network.calls)
    assert [param.hr_hint_cond for param in params] == originals  # ControlNet's state is put back
    assert "forward" not in sampler.model_wrap.__dict__


def test_hints_are_cut_once_per_stage_and_window(sd1_model, monkeypatch):
    cuts = []
    original = a1111.StageHints.window

    def window(self, win, pad=(0, 0)):
        before = len(self._windows)
        out = original(self, win, pad)
        if len(self._windows) > before:
            cuts.append((win.top, win.left))
        return out

    monkeypatch.setattr(a1111.StageHints, "window", window)
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT], width=64, height=64, hr_scale=2.0, hr_steps=3)
    attach_controlnet(p, [ControlParamsStandIn(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 128, 128))])
    process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert len(cuts) == len(set(cuts)) == 9  # 3×3 windows of the one stage, each cut once over 3 steps


def test_hires_modes_units_and_notes_in_a_whole_job(sd1_model):
    """window_size 16 on a 1.5× stage of 24×24 (sub-latents padded), batch 2: "Both" and "High res
    only" (canny: hires soft weighting) units control every hires call with window-sized hints, "Low
    res only" only the first pass; a T2I-adapter cannot be tiled: it gets a note and sits out."""
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT, "a cat"], width=128, height=128, hr_scale=1.5)
    low, hr = torch.rand(1, 3, 128, 128), torch.rand(1, 3, 192, 192)
    params = [ControlParamsStandIn(low, hr),
              ControlParamsStandIn(low, hr, module="canny", hr_option=HiResFixOption.HIGH_RES_ONLY),
              ControlParamsStandIn(low, hr, hr_option=HiResFixOption.LOW_RES_ONLY),
              ControlParamsStandIn(low, hr, module="t2ia_sketch", control_model_type=ControlModelType.T2I_Adapter)]
    network = attach_controlnet(p, params)
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap", window_size=16), facade)
    assert len(out.images) == 2 and out.images[0].shape == (3, 192, 192)
    first = [c for c in network.calls if c[0][-1] == 16 and not c[1]]
    hires = [c for c in network.calls if c[1]]
    assert first and all([u for u, _ in ran] == [0, 2, 3] for _, _, ran in first)
    assert hires and len(first) + len(hires) == len(network.calls)
    for shape, _, ran in hires:
        assert [u for u, _ in ran] == [0, 1]
        assert all(h[0] == shape[0] and h[-2:] == (shape[-2] * 8, shape[-1] * 8) for _, h in ran)
    assert {c[0][-1] for c in hires} == {16}  # windows 16, padded sub-latents 12 → 16
    assert any("unit 4 (t2ia_sketch)" in c and "left out" in c for c in p.comments)
    assert all(not param.guidance_stopped for param in params) and all(q.hr_hint_cond is hr for q in params)


def test_untiled_hires_without_accdiffusion_still_misplaces(sd1_model):
    """Sanity of the stand-in: the stock choice gives a first-pass-sized window the first-pass
    hint (the misplacement the adapter fixes)."""
    net = attach_controlnet(Txt2ImgStandIn(sd1_model, WebUIStandIn(), prompts=[PROMPT]),
                            [ControlParamsStandIn(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 128, 128))])
    net.control(torch.zeros(2, 4, 8, 8))
    assert net.calls[-1][1] is False
    with pytest.raises(RuntimeError, match="must match"):
        net.control(torch.zeros(2, 4, 12, 12))  # window_size 12: neither hint fits (the HTTP 500)


def test_tile_prompts_carry_controlnets_cond_mark():
    mark = torch.full((1, 8), 1024.0)
    row = torch.cat([mark, torch.randn(77, 8)])
    tile = torch.randn(77, 8)
    assert torch.equal(a1111.with_mark(row, tile), torch.cat([mark, tile]))
    assert torch.equal(a1111.with_mark(row, a1111.with_mark(row, tile)), torch.cat([mark, tile]))  # once
    plain = torch.randn(77, 8)
    assert a1111.with_mark(plain, tile) is tile


@pytest.mark.parametrize("title,enabled,steps_aside", [("Tiled Diffusion", True, True), ("Tiled Diffusion", False, False),
                                                       ("MultiDiffusion Integrated", True, True),
                                                       ("demofusion", True, True), ("Tiled VAE", True, False)])
def test_another_unet_tiler_in_the_job_makes_us_step_aside(sd1_model, title, enabled, steps_aside):
    from types import SimpleNamespace

    from a1111_standins import ScriptsStandIn

    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    other = SimpleNamespace(title=lambda: title, args_from=2, args_to=4)
    p.scripts = ScriptsStandIn(SimpleNamespace(title=lambda: "AccDiffusion", args_from=0, args_to=2), other)
    p.script_args = (True, {}, enabled, "MultiDiffusion")
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert out.images[0].shape == (3, 128, 128)
    assert (webui.encoded == []) is steps_aside  # no tile prompts: the stock hires pass ran
    assert any("tiles the UNet itself" in c for c in p.comments) is steps_aside


def tiled_diffusion_args(tile, *, overwrite=None, regions=False):
    """Tiled Diffusion's script arguments (tilediffusion.py:246-255): enabled, method, overwrite
    size, keep input size, width, height, tile width/height, overlap, tile batch size, upscaler,
    scale factor, noise inversion (5), ControlNet tensors on CPU, region control, draw background,
    causal layers."""
    width = overwrite or 1024
    return [True, "MultiDiffusion", overwrite is not None, True, width, width, tile, tile, 8, 1, "None", 2.0,
            False, 10, 1.0, 0.4, 64, False, regions, True, False]


@pytest.mark.parametrize("tile,overwrite,regions,steps_aside", [
    (8, None, False, False),    # one 8×8 tile covers the 8×8 first-pass latent: Tiled Diffusion stays idle
    (32, None, False, False),
    (4, None, False, True),     # 4×4 tiles split it: Tiled Diffusion tiles (and would tile our windows)
    (32, None, True, True),     # region control makes it run whatever the tile
    (16, 192, False, True),     # its "overwrite size" canvas (24×24 latent) is what it splits
])
def test_tiled_diffusion_makes_us_step_aside_only_when_it_tiles(sd1_model, tile, overwrite, regions, steps_aside):
    from types import SimpleNamespace

    from a1111_standins import ScriptsStandIn

    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])  # 64×64 → 128×128: 8×8 latent first pass
    td = tiled_diffusion_args(tile, overwrite=overwrite, regions=regions)
    other = SimpleNamespace(title=lambda: "Tiled Diffusion", args_from=2, args_to=2 + len(td))
    p.scripts = ScriptsStandIn(SimpleNamespace(title=lambda: "AccDiffusion", args_from=0, args_to=2), other)
    p.script_args = (True, {}, *td)
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert out.images[0].shape == (3, 128, 128)
    assert (webui.encoded == []) is steps_aside  # no tile prompts: the stock hires pass ran
    assert any("Tiled Diffusion is enabled and tiles the UNet itself" in c for c in p.comments) is steps_aside
    assert any("Tiled Diffusion is enabled but idle" in c and "AccDiffusion tiles the hires pass" in c
               for c in p.comments) is not steps_aside


def test_tiled_diffusion_canvas_follows_its_own_size_rules(sd1_model):
    from a1111_standins import Img2ImgStandIn, picture

    txt = Txt2ImgStandIn(sd1_model, WebUIStandIn(), prompts=[PROMPT])
    assert facade.tiled_diffusion_canvas(txt, tiled_diffusion_args(8)) == (64, 64)
    assert facade.tiled_diffusion_canvas(txt, tiled_diffusion_args(8, overwrite=192)) == (192, 192)
    txt.width_original_md, txt.width, txt.height = 64, 96, 80  # its process ran first and set its canvas
    assert facade.tiled_diffusion_canvas(txt, tiled_diffusion_args(8, overwrite=192)) == (96, 80)
    img = Img2ImgStandIn(sd1_model, WebUIStandIn(), [PROMPT], [picture(48, 40)], width=128, height=128)
    keep = tiled_diffusion_args(8)
    assert facade.tiled_diffusion_canvas(img, keep) == (48, 40)  # "keep input size": the input picture's
    upscaled = keep[:10] + ["Lanczos", 2.0] + keep[12:]
    assert facade.tiled_diffusion_canvas(img, upscaled) == (96, 80)
    upscaled[3] = False  # not keeping the input size: the target size times the factor
    assert facade.tiled_diffusion_canvas(img, upscaled) == (256, 256)


def test_img2img_with_controlnet_probe_gets_the_whole_hint_and_windows_their_crops(sd1_model):
    """img2img has no hires hint (only ``hint_cond``, at the target size): the probe pass (a small
    whole image) gets the whole hint resized to its size, every tiled call the crops of
    ``hint_cond`` under its items; the unit's hint is restored afterwards."""
    from a1111_standins import Img2ImgStandIn, picture, process_img2img

    webui = WebUIStandIn()
    p = Img2ImgStandIn(sd1_model, webui, [PROMPT], [picture(64, 64)], width=128, height=128)
    hint = position_hint(16, 16)
    params = [ControlParamsStandIn(hint, None)]
    network = attach_controlnet(p, params)
    seen = []
    control = network.control

    def spying(x):
        try:
            return control(x)
        finally:
            seen.append((tuple(x.shape), params[0].used_hint_cond.clone()))

    network.control = spying
    out = process_img2img(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert out.images[0].shape == (3, 128, 128)
    is_probe = [h.shape[0] == 1 and h.shape[-1] == s[-1] * 8 and torch.allclose(h, a1111.resize_hint(hint, h.shape[-2:]))
                for s, h in seen]
    assert any(is_probe) and all(s[-1] < 16 for (s, _), yes in zip(seen, is_probe) if yes)
    tiled = [(s, h) for (s, h), yes in zip(seen, is_probe) if not yes]
    assert tiled and all(h.shape[0] == s[0] and h.shape[-2:] == (s[-2] * 8, s[-1] * 8) for s, h in tiled)
    crops = {tuple(h[r, 0, ::8, ::8].flatten().tolist()) for s, h in tiled for r in range(h.shape[0])}
    windows = {tuple(hint[0, 0, y * 8:(y + s[-2]) * 8:8, x * 8:(x + s[-1]) * 8:8].flatten().tolist())
               for s, _ in tiled for y in range(0, 16 - s[-2] + 1) for x in range(0, 16 - s[-1] + 1)}
    local = [c for c in crops if c in windows]
    assert local  # local windows: crops of hint_cond (dilated sub-hints are strided gathers)
    assert params[0].hint_cond is hint and params[0].hr_hint_cond is None and not params[0].guidance_stopped
    assert not any("left out" in c for c in p.comments)
