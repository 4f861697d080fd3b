"""Forge's built-in ControlNet in the tiled pass, through stand-ins of backend/patcher/controlnet.py
and sampling_function (tests/forge_standins.py). Position-coded hints as in tests/test_control.py:
with a control-only model the fused denoised latent equals the hires hint's block means exactly
when every window and dilated item got its own crop."""

from __future__ import annotations

import pytest
import torch

from accdiffusion.entry import facade
from accdiffusion.method.hires import StageDenoiser, plan_stages, stage_windows
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import process_images
from forge_standins import (ControlNet, ControlNetScriptsStandIn, ForgeModelStandIn, ForgeTxt2ImgStandIn,
                            ForgeWebUIStandIn, T2IAdapter, install_backend_module, sampling_function)
from test_control import block_means, position_hint

PROMPT = "a red-haired astronaut riding a horse on the moon"
ON = AccDiffusionSettings(enabled=True, window_mode="overlap")


@pytest.fixture(autouse=True)
def backend_module():
    install_backend_module()


@pytest.fixture()
def sd1(sd1_host):
    return ForgeModelStandIn(sd1_host, sdxl=False)


@pytest.mark.parametrize("base,target,window_size,mode", [((8, 8), (16, 16), 0, "overlap"),
                                                          ((8, 8), (12, 12), 0, "overlap"),
                                                          ((8, 8), (20, 20), 16, "overlap"),
                                                          ((8, 8), (32, 32), 16, "shifted"),
                                                          # not a multiple of 8 nor of the window: shifted
                                                          # edge windows padded, sub-latents 5×7 padded to 8×8
                                                          ((8, 8), (20, 28), 16, "shifted")])
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
        job.backend.hook_stage(job, p, sampler, denoiser, job.backend.sampler_space(p, sampler, "k-diffusion"),
                               [[], []], [None, None], windows)
        text = torch.stack([sd1.encode(PROMPT)] * 2)
        x = torch.randn(2, 4, *target)
        for sigma in ((4.0, 2.0) if mode == "overlap" else (4.0, 3.0, 2.0, 1.0)):
            out = sampling_function(sd1, x, torch.full((2,), sigma), text, text, 1.0)
            expected = (block_means(per_image) + block_means(shared))[:, :1].expand_as(out)
            assert torch.allclose(out, expected, atol=1e-4)
        assert mode == "overlap" or denoiser.windows_at(3) != denoiser.windows_at(0)  # the grid moved
        if mode == "shifted" and target[0] % 8:  # edge windows that are not a multiple of 8 were padded
            assert any(w.height % 8 or w.width % 8 for step in range(4) for w in denoiser.windows_at(step))
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
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap", window_size=16), facade)
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
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
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
    out = process_images(p, AccDiffusionSettings(enabled=True, window_mode="overlap"), facade)
    assert out.images[0].shape == (3, 128, 128)
    notes = [c for c in p.comments if "left out" in c]
    assert len(notes) == 1 and "unit 2 " in notes[0] and "T2IAdapter" in notes[0]
    assert units[2][1].calls


# --- the probe pass (img2img, the Upscale button) -----------------------------------------------------
class PatchingScripts(ControlNetScriptsStandIn):
    """The job's scripts before every sampling: ControlNet's chain (``make_units(is_hr_pass)``), and
    when asked an IP-Adapter-like attn2 replace patch at every position (counting its calls), a
    conditioning modifier (reference-only's kind) and a ``p.modified_noise`` (inpaint+lama's kind).
    ``calls`` logs (is_hr_pass, x shape, c given) of every call."""

    def __init__(self, make_units, attn2_patch=False, modifier=False, noise=False):
        super().__init__(make_units)
        self.attn2_patch, self.modifier, self.noise = attn2_patch, modifier, noise
        self.calls: list = []
        self.patch_calls = 0

    def process_before_every_sampling(self, p, **kwargs):
        from accdiffusion.backends.forge import attn2_positions
        from forge_standins import attention_function

        x = kwargs.get("x")
        self.calls.append((p.is_hr_pass, None if x is None else tuple(x.shape), kwargs.get("c") is not None))
        super().process_before_every_sampling(p, **kwargs)
        unet = p.sd_model.forge_objects.unet
        if self.attn2_patch:
            def patch(q, k, v, extra):
                self.patch_calls += 1
                return attention_function(q, k, v, extra["n_heads"])

            for block, number, index in attn2_positions(unet.model.diffusion_model):
                unet.set_model_attn2_replace(patch, block, number, index)
        if self.modifier:
            unet.model_options["conditioning_modifiers"] = [lambda *args: args]
        if self.noise:
            p.modified_noise = torch.zeros(1)


def forge_img2img(model, scripts, settings=ON, prompts=(PROMPT, "a green dragon")):
    from a1111_standins import picture, process_img2img
    from forge_standins import ForgeImg2ImgStandIn

    webui = ForgeWebUIStandIn()
    p = ForgeImg2ImgStandIn(model, webui, init_images=[picture(64, 96)], prompts=list(prompts), width=192,
                            height=128, adapter=facade)
    p.scripts = scripts
    return p, webui, process_img2img(p, settings, facade)


def test_img2img_probe_runs_the_controlnet_units_on_the_positive_rows_at_the_probe_size(sd1):
    """Batch of two (one hint per image): before the probe the scripts patch the UNet as before a
    sampling (img2img: no hires pass), the probe's three calls evaluate the unit on the two positive
    rows (one chunk, cond_mark 0, soft weighting works) with the whole hint at the probe size, and
    the control reaches the UNet; the hint cache is dropped after the probe and nothing is left."""
    import sys

    from a1111_standins import assert_hooks_removed

    prepared = sys.modules["backend.sampling.sampling_function"].calls
    prepared.clear()
    hint = torch.rand(2, 3, 128, 192)
    unit = ControlNet(hint, soft=(0.5, 0.0))
    scripts = PatchingScripts(lambda hr: [unit])
    p, webui, out = forge_img2img(sd1, scripts)
    assert [im.shape for im in out.images] == [(3, 128, 192)] * 2
    probe = (8, 8)  # a 64×96 image into a 192×128 target (accdiffusion.method.probe.probe_latent_size)
    assert scripts.calls[0] == (False, (2, 4, *probe), True)  # the probe's own call, first
    assert len(scripts.calls) == 1 + 2  # then one per stage (128, 192 px)
    probe_calls = unit.seen[:3]
    for seen in probe_calls:
        assert seen["x"] == (2, 4, *probe) and seen["batched_number"] == 1 and seen["cond_or_uncond"] == [0]
        assert torch.equal(seen["cond_mark"], torch.zeros(2))
        expected = torch.nn.functional.interpolate(hint, size=(probe[0] * 8, probe[1] * 8), mode="nearest-exact")
        assert torch.equal(seen["hint"], expected)  # the whole hint, each image its own row
    assert sorted(float(s["t"][0]) for s in probe_calls) == sorted(float(s["t"][1]) for s in probe_calls)
    assert len({float(s["t"][0]) for s in probe_calls}) == 3  # three noise levels
    assert [x for x, _ in sd1.kmodel.control_calls[:3]] == [(2, 4, *probe)] * 3  # control given to the UNet
    assert len(unit.seen) > 3 and all(1 in s["cond_or_uncond"] for s in unit.seen[3:])  # the stages: with CFG
    assert prepared[:2] == ["prepare", "cleanup"] and unit.pre_runs == 1 and unit.cleanups >= 1
    assert_hooks_removed(p, sd1, webui)


def probe_call(sd1, scripts, images=(0, 1), batch=2, made=None):
    """One probe call through the Forge backend: (denoised, the recorder's maps of image 0, p);
    ``made`` gets p and the ForgeObjects from before."""
    from accdiffusion.method.attention import AttentionRecorder
    from accdiffusion.flows.img2img import positive_conds
    from forge_standins import ForgeImg2ImgStandIn
    from a1111_standins import picture

    webui = ForgeWebUIStandIn()
    p = ForgeImg2ImgStandIn(sd1, webui, init_images=[picture(64, 64)], prompts=[PROMPT] * batch, width=128,
                            height=128, adapter=facade)
    p.scripts = scripts
    objects = sd1.forge_objects
    if made is not None:
        made.update(p=p, objects=objects)
    job = facade.start_job(p, ON, webui=webui)
    conds = positive_conds(p.conds(p.prompts))
    job.conditioning = p.conds(p.prompts)
    recorder = AttentionRecorder((8, 8), len(images))
    latents = torch.randn(len(images), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = webui.create_sampler("Euler", sd1)
    try:
        with job.backend.probe_unet(p, job, sampler, recorder, [conds[i] for i in images], latents,
                                    list(images)) as call:
            out = call(latents, torch.full((len(images),), 2.0))
    finally:
        job.end_batch()
    assert sd1.forge_objects is objects  # put back
    return out, recorder.maps(0), p


def test_probe_control_changes_the_unet_output_and_nothing_without_a_unit(sd1):
    """The probe call's denoised output moves by exactly the unit's control (block means of the
    hint at the probe size); with no unit the scripts' run changes nothing."""
    hint = torch.rand(1, 3, 64, 64)
    plain, plain_maps, _ = probe_call(sd1, None)
    without, without_maps, _ = probe_call(sd1, PatchingScripts(lambda hr: []))
    with_unit, maps, _ = probe_call(sd1, PatchingScripts(lambda hr: [ControlNet(hint)]))
    assert torch.equal(plain, without) and torch.equal(plain_maps, without_maps)
    assert torch.allclose(with_unit - plain, block_means(hint)[:, :1].expand_as(plain), atol=1e-5)
    assert torch.equal(maps, plain_maps)  # the stand-in adds control after attention


def test_probe_of_some_images_takes_their_hint_rows_and_puts_them_back(sd1):
    """Probing image 1 of 2 (image 0 has an AND prompt): its hint row, not Forge's first row."""
    hint = torch.cat([torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)])
    unit = ControlNet(hint)
    probe_call(sd1, PatchingScripts(lambda hr: [unit]), images=(1,))
    assert unit.seen[0]["x"][0] == 1 and torch.equal(unit.seen[0]["hint"], torch.ones(1, 3, 64, 64))
    assert unit.cond_hint_original is hint and unit.cond_hint is None  # restored, cache dropped


def test_probe_chains_other_attn2_patches_and_serves_no_cfg_loop_patches(sd1):
    """An IP-Adapter-like attn2 replace patch still runs under the recorder (same maps); with a
    conditioning modifier (reference-only's kind) the probe keeps only the ControlNet units, with a
    note; a ``p.modified_noise`` set for the probe does not outlive it."""
    hint = torch.rand(1, 3, 64, 64)
    _, plain_maps, _ = probe_call(sd1, None)
    patched = PatchingScripts(lambda hr: [], attn2_patch=True)
    _, maps, p = probe_call(sd1, patched)
    assert patched.patch_calls > 0 and torch.allclose(maps, plain_maps, atol=1e-6) and not p.comments
    unit = ControlNet(hint)
    cfg_loop = PatchingScripts(lambda hr: [unit], attn2_patch=True, modifier=True, noise=True)
    _, _, p = probe_call(sd1, cfg_loop)
    assert cfg_loop.patch_calls == 0 and len(unit.seen) == 1
    assert any("probe pass used the UNet with the ControlNet units only" in c for c in p.comments)
    assert "modified_noise" not in p.__dict__


def test_probe_puts_everything_back_on_error(sd1):
    import sys

    class Broken(ControlNet):
        def get_control(self, *args, **kwargs):
            raise RuntimeError("boom")

    prepared = sys.modules["backend.sampling.sampling_function"].calls
    prepared.clear()
    hint = torch.rand(2, 3, 64, 64)
    unit = Broken(hint)
    made: dict = {}
    with pytest.raises(RuntimeError, match="boom"):
        probe_call(sd1, PatchingScripts(lambda hr: [unit], noise=True), images=(1,), made=made)
    assert prepared == ["prepare", "cleanup"] and unit.cleanups == 1 and unit.cond_hint_original is hint
    assert sd1.forge_objects is made["objects"] and "modified_noise" not in made["p"].__dict__


def test_upscale_button_probe_uses_the_hires_hint(sd1):
    """The Upscale button's probe runs inside the hires pass (p.is_hr_pass): ControlNet attaches its
    hires units and hint ("Low res only" units sit out), as for the hires sampling."""
    from a1111_standins import picture, process_images

    low, high = ControlNet(torch.zeros(1, 3, 64, 64)), ControlNet(torch.ones(1, 3, 128, 128))
    scripts = PatchingScripts(lambda hr: [high] if hr else [low])
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(sd1, webui, adapter=facade, prompts=[PROMPT], width=64, height=64)
    p.firstpass_image = picture(64, 64)
    p.scripts = scripts
    out = process_images(p, ON, facade)
    assert out.images[0].shape == (3, 128, 128)
    assert (True, (1, 4, 8, 8), True) in scripts.calls  # the probe, in the hires pass
    assert low.seen == []
    assert high.seen[0]["x"] == (1, 4, 8, 8) and torch.equal(high.seen[0]["hint"], torch.ones(1, 3, 64, 64))
    assert high.seen[0]["cond_or_uncond"] == [0]


def test_recording_patches_replace_their_own_and_call_another_extensions(sd1):
    """Installed twice (Forge calls the hook twice per pass) over an IP-Adapter-like attn2 patch:
    one recording patch per position, calling that patch, not a second recorder."""
    from accdiffusion.method.attention import AttentionRecorder
    from accdiffusion.backends.forge import _recording_unet, attn2_positions
    from forge_standins import attention_function

    def foreign(q, k, v, extra):
        return attention_function(q, k, v, extra["n_heads"])

    unet = sd1.forge_objects.unet.clone()
    positions = attn2_positions(unet.model.diffusion_model)
    for position in positions:
        unet.set_model_attn2_replace(foreign, *position)
    recorder = AttentionRecorder((8, 8), 1)
    attend = lambda q, k, v, heads, extra: attention_function(q, k, v, heads)  # noqa: E731
    twice = _recording_unet(_recording_unet(unet, recorder, attend), recorder, attend)
    patches = twice.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert positions and all(patches[position].accdiffusion_replaced is foreign for position in positions)
    assert unet.model_options["transformer_options"]["patches_replace"]["attn2"][positions[0]] is foreign  # a clone
