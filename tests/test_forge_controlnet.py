"""Forge's built-in ControlNet in the tiled pass, through stand-ins of backend/patcher/controlnet.py
and sampling_function (tests/forge_standins.py). Position-coded hints as in tests/test_control.py:
with a control-only model the fused denoised latent equals the hires hint's block means exactly
when every window and dilated item got its own crop."""

from __future__ import annotations

import pytest
import torch

from accdiffusion import facade
from accdiffusion.hires import StageDenoiser, plan_stages, stage_windows
from accdiffusion.settings import AccDiffusionSettings

from a1111_standins import process_images
from forge_standins import (ControlNet, ControlNetScriptsStandIn, ForgeModelStandIn, ForgeTxt2ImgStandIn,
                            ForgeWebUIStandIn, T2IAdapter, install_backend_module, sampling_function)
from test_control import block_means, position_hint

PROMPT = "a red-haired astronaut riding a horse on the moon"


@pytest.fixture(autouse=True)
def backend_module():
    install_backend_module()


@pytest.fixture()
def sd1(sd1_host):
    return ForgeModelStandIn(sd1_host, sdxl=False)


@pytest.mark.parametrize("base,target,window_size,mode", [((8, 8), (16, 16), 0, "overlap"),
                                                          ((8, 8), (12, 12), 0, "overlap"),
                                                          ((8, 8), (20, 20), 16, "overlap"),
                                                          ((8, 8), (32, 32), 16, "shifted")])
def test_every_item_gets_its_own_hint_through_forges_controlnet(sd1, base, target, window_size, mode):
    """Two units (one hint per image of a batch of two, and one hint for all), Forge's [uncond,
    cond] chunks."""
    settings = AccDiffusionSettings(enabled=True, sigma=0.0, window_size=window_size, tile_batch_size=3,
                                    window_mode=mode)
    stage = plan_stages(base, target, progressive=False)[0]
    windows = stage_windows(stage, base, settings)
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(sd1, webui, adapter=facade, prompts=[PROMPT, PROMPT], width=base[1] * 8,
                            height=base[0] * 8)
    per_image, shared = position_hint(*target, batch=2), position_hint(*target) * 0.5
    units = [ControlNet(per_image), ControlNet(shared)]
    p.scripts = ControlNetScriptsStandIn(lambda hr: units)
    job = facade.start_job(p, settings, webui=webui)
    sampler = webui.create_sampler("Euler", sd1)
    denoiser = StageDenoiser(stage, windows, settings, 1, sampler.model_wrap.sigma_to_t)
    sd1.kmodel.control_only = True
    try:
        job.backend.prepare_stage(p, job)
        p.scripts.process_before_every_sampling(p)
        job.backend.hook_stage(job, p, sampler, denoiser, [[], []], [None, None], windows)
        text = torch.stack([sd1.encode(PROMPT)] * 2)
        x = torch.randn(2, 4, *target)
        for sigma in ((4.0, 2.0) if mode == "overlap" else (4.0, 3.0, 2.0, 1.0)):
            out = sampling_function(sd1, x, torch.full((2,), sigma), text, text, 1.0)
            expected = (block_means(per_image) + block_means(shared))[:, :1].expand_as(out)
            assert torch.allclose(out, expected, atol=1e-4)
        assert mode == "overlap" or denoiser.windows_at(3) != denoiser.windows_at(0)  # the grid moved
    finally:
        sd1.kmodel.control_only = False
        job.end_batch()
    assert all(shape[-2:] != (target[0] * 8, target[1] * 8) for u in units for shape in u.calls)  # never full size
    assert "get_control" not in units[0].__dict__ and all(u.cond_hint is None for u in units)


def test_whole_job_with_controlnet_and_an_untileable_unit(sd1, caplog):
    """1.5× with padding, window_size 16, batch 2: images come back, every control evaluation is
    window-sized, the T2I-adapter (the user's unit 2: Forge's chain has it as head) sits out with a
    note that names it, and the debug log names the tiled unit 1 with its windows."""
    import logging

    caplog.set_level(logging.DEBUG, logger="accdiffusion")
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(sd1, webui, adapter=facade, prompts=[PROMPT, "a cat"], width=128, height=128,
                            hr_scale=1.5)
    units = [ControlNet(torch.rand(1, 3, 192, 192)), T2IAdapter(torch.rand(1, 3, 192, 192))]
    p.scripts = ControlNetScriptsStandIn(lambda hr: units if hr else [])
    out = process_images(p, AccDiffusionSettings(enabled=True, window_size=16), facade)
    assert len(out.images) == 2 and out.images[0].shape == (3, 192, 192)
    assert units[0].calls and {shape[-1] for shape in units[0].calls} == {128}  # 16-latent windows and sub-latents
    assert units[1].calls == []
    assert any("unit 2" in c and "T2IAdapter" in c for c in p.comments)
    assert not any("unit 1" in c for c in p.comments)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "ControlNet unit" in r.getMessage()]
    assert logged and all(m.startswith("AccDiffusion ControlNet unit 1 hint (1, 3, 192, 192): ") for m in logged)
    assert any("window px y0:128 x0:128" in m for m in logged) and any("dilated slots" in m for m in logged)
    assert sd1.kmodel.control_calls and all(x[-1] == 16 for x, _ in sd1.kmodel.control_calls)
    assert "get_control" not in units[0].__dict__


def test_reference_preprocessor_runs_untiled_with_a_note(sd1):
    from types import SimpleNamespace

    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(sd1, webui, adapter=facade, prompts=[PROMPT], width=64, height=64)
    units = [ControlNet(torch.rand(1, 3, 128, 128))]
    p.scripts = ControlNetScriptsStandIn(lambda hr: units if hr else [])
    p.scripts.alwayson_scripts = [SimpleNamespace(title=lambda: "ControlNet", current_params={
        0: SimpleNamespace(preprocessor=SimpleNamespace(name="reference_only"))})]
    out = process_images(p, AccDiffusionSettings(enabled=True), facade)
    assert out.images[0].shape == (3, 128, 128)
    assert {shape[-1] for shape in units[0].calls} == {128}  # the whole latent
    assert any("reference_only" in c and "untiled" in c for c in p.comments)


class ControlNetScriptWithUnits(ControlNetScriptsStandIn):
    """The script as Forge runs it: its units in ``p.script_args``, "Low res only" ones left out of
    the hires pass (scripts/controlnet.py:101-109, 431-446)."""

    def __init__(self, p, units):
        from types import SimpleNamespace

        self.units = units  # (hr_option, ControlNet)
        super().__init__(lambda hr: [cnet for option, cnet in units if not (hr and option == "Low res only")])
        script = SimpleNamespace(title=lambda: "ControlNet", current_params={}, args_from=1, args_to=1 + len(units),
                                 get_enabled_units=lambda args: [u for u in args if u.enabled])
        self.alwayson_scripts = [script]
        p.script_args = [True] + [SimpleNamespace(enabled=True, hr_option=option) for option, _ in units]


def test_notes_name_the_users_unit_when_a_low_res_unit_sits_out_the_hires_pass(sd1):
    """Units 1 "Low res only" (a ControlNet), 2 and 3 "Both": in the hires pass Forge's chain holds
    unit 3 (head) and unit 2; the T2I-adapter in unit 2 gets the note with its number."""
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(sd1, webui, adapter=facade, prompts=[PROMPT], width=64, height=64)
    units = [("Low res only", ControlNet(torch.rand(1, 3, 128, 128))), ("Both", T2IAdapter(torch.rand(1, 3, 128, 128))),
             ("Both", ControlNet(torch.rand(1, 3, 128, 128)))]
    p.scripts = ControlNetScriptWithUnits(p, units)
    out = process_images(p, AccDiffusionSettings(enabled=True), facade)
    assert out.images[0].shape == (3, 128, 128)
    notes = [c for c in p.comments if "left out" in c]
    assert len(notes) == 1 and "unit 2 " in notes[0] and "T2IAdapter" in notes[0]
    assert units[2][1].calls
