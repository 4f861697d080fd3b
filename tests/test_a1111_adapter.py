"""The A1111 adapter driven on CPU through stand-ins of the v1.10.1 objects (tests/a1111_standins.py)
with the real ldm UNet and the real k-diffusion samplers."""

from types import SimpleNamespace

import pytest
import torch

from accdiffusion.backends import a1111
from accdiffusion.entry import facade
from accdiffusion.method.attention import find_cross_attention
from accdiffusion.method.hires import AccDiffusionError
from accdiffusion.method.settings import AccDiffusionSettings, SettingsError

from a1111_standins import (ImageRNGStandIn, Txt2ImgStandIn, WebUIStandIn,
                            assert_hooks_removed, process_images)

ON = AccDiffusionSettings(enabled=True)
PROMPT = "a red-haired astronaut riding a horse on the moon"


def assert_clean(p, model, webui):
    assert_hooks_removed(p, model, webui)
    assert p.is_hr_pass is False


def job(model, settings=ON, **kw):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(model, webui, **kw)
    return p, webui, process_images(p, settings, facade)


@pytest.mark.parametrize("model_name", ["sd1_model", "sdxl_model"])
@pytest.mark.parametrize("size,scale,stages", [((64, 64), 2.0, 1), ((64, 128), 1.5, 1), ((64, 64), 3.0, 2)])
def test_hires_pass_runs_through_the_webui_sampler(request, model_name, size, scale, stages):
    model = request.getfixturevalue(model_name)
    p, webui, out = job(model, prompts=[PROMPT], width=size[1], height=size[0], hr_scale=scale)
    assert out.images[0].shape == (3, p.hr_upscale_to_y, p.hr_upscale_to_x)
    assert bool(torch.isfinite(out.images[0]).all())
    hires_samplers = webui.samplers[1:]
    assert len(hires_samplers) == stages
    # tile prompts went through the WebUI's encoder; words of the prompt only
    tile_prompts = set(webui.encoded)
    assert tile_prompts and all(set(t.split()) <= set(PROMPT.split()) for t in tile_prompts)
    assert webui.state.job_count == 2 + stages - 1
    assert webui.steps_done == p.steps + stages * p.hr_second_pass_steps
    assert p.extra_generation_params == {"Denoising strength": p.denoising_strength, "AccDiffusion": True,
                                         "AccDiffusion window mode": "shifted", "AccDiffusion window grain": 1}
    assert_clean(p, model, webui)


def test_batch_of_two_gets_tile_prompts_from_each_images_own_maps(sd1_model):
    p, webui, out = job(sd1_model, prompts=[PROMPT, "a green dragon over a castle"], hr_scale=2.0)
    assert len(out.images) == 2
    words = set(" ".join(webui.encoded).split())
    assert words & {"dragon", "castle", "green", "over"} and words & {"astronaut", "horse", "moon", "riding"}
    assert_clean(p, sd1_model, webui)


def test_disabled_and_no_hires_are_bit_identical_and_attach_nothing(sd1_model, monkeypatch):
    attached = []
    monkeypatch.setattr(a1111.AttentionRecorder, "attach", lambda self, m: attached.append(1))
    _, _, plain = job(sd1_model, settings=None, prompts=[PROMPT])
    _, _, disabled = job(sd1_model, settings=AccDiffusionSettings(enabled=False), prompts=[PROMPT])
    assert all(torch.equal(a, b) for a, b in zip(plain.images, disabled.images))

    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    p.enable_hr = False
    out = process_images(p, ON, facade)
    webui2 = WebUIStandIn()
    q = Txt2ImgStandIn(sd1_model, webui2, prompts=[PROMPT])
    q.enable_hr = False
    ref = process_images(q, None, facade)
    assert torch.equal(out.images[0], ref.images[0]) and not attached
    assert_clean(p, sd1_model, webui)


def test_enabled_differs_from_stock_hires(sd1_model):
    _, _, plain = job(sd1_model, settings=None, prompts=[PROMPT])
    _, _, acc = job(sd1_model, prompts=[PROMPT])
    assert plain.images[0].shape == acc.images[0].shape
    assert not torch.allclose(plain.images[0], acc.images[0])


def test_same_seed_same_image(sd1_model):
    _, _, a = job(sd1_model, prompts=[PROMPT], sampler_name="Euler a")
    _, _, b = job(sd1_model, prompts=[PROMPT], sampler_name="Euler a")
    assert torch.equal(a.images[0], b.images[0])


def test_row_layout_does_not_matter(sd1_model):
    """batch_cond_uncond off: cond and uncond rows reach the model in separate calls."""
    _, _, together = job(sd1_model, prompts=[PROMPT])
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    original = webui.create_sampler

    def split_sampler(name, model):
        sampler = original(name, model)
        sampler.model_wrap_cfg.batch_cond_uncond = False
        return sampler

    webui.create_sampler = split_sampler
    apart = process_images(p, ON, facade)
    assert torch.allclose(together.images[0], apart.images[0], atol=1e-4)


def test_interrupt_mid_stage_stops_and_removes_hooks(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT], hr_scale=3.0, hr_steps=3)
    calls = {"n": 0}
    original = webui.create_sampler

    def interrupting_sampler(name, model):
        sampler = original(name, model)
        callback = sampler.callback_state

        def count(d):
            callback(d)
            calls["n"] += 1
            if calls["n"] == p.steps + 2:  # second step of the first hires stage
                webui.state.interrupted = True

        sampler.callback_state = count
        return sampler

    webui.create_sampler = interrupting_sampler
    out = process_images(p, ON, facade)
    assert len(webui.samplers) == 2  # the second stage never started
    assert out.images[0].shape[-2:] == (128, 128)  # the first stage's size: the partial result
    assert_clean(p, sd1_model, webui)


def test_error_mid_stage_propagates_and_removes_hooks(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    original = webui.create_sampler

    def failing_sampler(name, model):
        sampler = original(name, model)
        if len(webui.samplers) == 2:
            def boom(*a, **k):
                raise RuntimeError("CUDA out of memory")
            sampler.model_wrap.kd.forward = boom
        return sampler

    webui.create_sampler = failing_sampler
    facade.start_job(p, ON, webui=webui)
    facade.before_batch(p)
    with pytest.raises(RuntimeError, match="out of memory"):
        p.sample(conditioning=p.conds(p.prompts), unconditional_conditioning=p.conds([""], True),
                 seeds=p.seeds, subseeds=p.seeds, subseed_strength=0, prompts=p.prompts)
    assert all("forward" not in m.__dict__ for m in find_cross_attention(sd1_model.model.diffusion_model))
    assert "forward" not in webui.samplers[-1].model_wrap.__dict__
    assert "sample" not in p.__dict__


def test_invalid_arguments_stop_the_job_with_the_message(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    try:
        AccDiffusionSettings.from_dict({"patch_prompt_threshold": 2})
    except SettingsError as error:
        facade.fail_job(p, error, webui=webui)
    facade.before_batch(p)
    with pytest.raises(AccDiffusionError, match="patch_prompt_threshold"):
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=p.seeds, subseeds=p.seeds,
                 subseed_strength=0, prompts=p.prompts)
    assert "sample" not in p.__dict__


def test_unsupported_hires_sampler_falls_back_to_stock_hires(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    webui.sampler_kind = lambda name: None  # e.g. LCM
    out = process_images(p, ON, facade)
    assert any("is not supported" in c for c in p.comments)
    assert out.images[0].shape == (3, 128, 128)
    assert p.extra_generation_params == {
        "Denoising strength": p.denoising_strength,
        "AccDiffusion stepped aside": "the hires sampler 'Euler' is not supported (k-diffusion samplers and DDIM, "
                                      "DDIM CFG++, PLMS, UniPC are); the WebUI's own hires fix ran"}
    assert_clean(p, sd1_model, webui)


def test_unsupported_model_gets_a_message_and_nothing_attached(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    sd1_model.is_sd3 = True
    try:
        assert facade.start_job(p, ON, webui=webui) is None
    finally:
        sd1_model.is_sd3 = False
    assert any("SD3" in c for c in p.comments)
    assert not hasattr(p, facade.JOB_ATTR)


def test_and_prompt_keeps_the_full_prompt(sd1_model):
    p, webui, out = job(sd1_model, prompts=["a cat AND a dog"])
    assert any("AND" in c for c in p.comments)
    assert webui.encoded == []  # no tile prompts: every tile takes the WebUI's own conditioning


def test_hires_prompt_that_differs(sd1_model):
    p, webui, out = job(sd1_model, prompts=[PROMPT], hr_prompts=[PROMPT + ", golden light"])
    words = set(" ".join(webui.encoded).replace(",", " ").split())
    assert {"golden", "light"} <= words  # new words have no map: kept in every tile


def test_tile_prompt_map_is_added(sd1_model):
    p, webui, out = job(sd1_model, settings=ON.replace(tile_prompt_map=True), prompts=[PROMPT])
    assert len(out.images) == 2 and len(out.infotexts) == 2
    from PIL import Image

    assert isinstance(out.images[1], Image.Image) and webui.saved == [out.images[1]]
    assert out.images[1].size == (p.hr_upscale_to_x, p.hr_upscale_to_y)  # the last stage, in pixels


# the Upscale button (p.firstpass_image): tests/test_img2img.py::test_upscale_button_takes_its_maps_from_the_probe


def test_refiner_is_declined_with_a_message(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    p.refiner_checkpoint = "sdxl_refiner.safetensors"
    assert facade.start_job(p, ON, webui=webui) is None
    assert any("refiner" in c for c in p.comments)


def test_tile_prompt_maps_of_every_batch_are_kept(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT, "a cat"])
    facade.start_job(p, ON.replace(tile_prompt_map=True), webui=webui)
    for _ in range(2):  # batch count 2: the job lives across both batches
        p.rng = ImageRNGStandIn((4, 8, 8), p.seeds)  # processing.py:948, per batch
        facade.before_batch(p)
        with torch.no_grad():
            p.sample(conditioning=p.conds(p.prompts), unconditional_conditioning=p.conds(["", ""], True),
                     seeds=p.seeds, subseeds=p.seeds, subseed_strength=0, prompts=p.prompts)
        p.hr_c = None
    processed = SimpleNamespace(images=[], infotexts=["info"])
    facade.finish_job(p, processed)
    assert len(processed.images) == 4 and len(webui.saved) == 4


def test_sdxl_tile_crop_conditioning_replaces_only_the_crop_segment():
    from accdiffusion.method.tiles import Window

    def embed(top, left):  # stands in for sgm's ConcatTimestepEmbedderND on (top, left)
        return torch.cat([torch.sin(torch.arange(4) * 0.1 + top), torch.cos(torch.arange(4) * 0.1 + left)])

    embed.default = (0, 0)
    pooled, size = torch.randn(6), embed(1024, 1024)
    vector = torch.cat([pooled, size, embed(0, 0), size])
    out = a1111._with_crop(vector, embed, Window(4, 12, 8, 8), {})
    assert torch.equal(out[:6], pooled) and torch.equal(out[6:14], size) and torch.equal(out[22:], size)
    assert torch.equal(out[14:22], embed(32, 96))  # the tile's pixel offset
    unknown = torch.randn(30)  # no default crop inside: left as it is
    assert torch.equal(a1111._with_crop(unknown, embed, Window(0, 0, 8, 8), {}), unknown)


class OtherExtension:
    """Another extension that wraps ``p.sample`` and ``p.sample_hr_pass`` on the instance before
    our job hooks them (as ControlNet wraps ``p.sample`` to mark cond/uncond rows)."""

    def __init__(self, p):
        self.calls = []
        inner_sample, inner_hr_pass = p.sample, p.sample_hr_pass

        def sample(*args, **kwargs):
            self.calls.append("sample")
            return inner_sample(*args, **kwargs)

        def sample_hr_pass(*args, **kwargs):
            self.calls.append("sample_hr_pass")
            return inner_hr_pass(*args, **kwargs)

        p.sample, p.sample_hr_pass = self.sample, self.sample_hr_pass = sample, sample_hr_pass

    def assert_back_in_place(self, p):
        assert p.__dict__["sample"] is self.sample and p.__dict__["sample_hr_pass"] is self.sample_hr_pass


@pytest.mark.parametrize("kdiffusion", [True, False])
def test_hooks_chain_to_another_extensions_wrappers(sd1_model, kdiffusion):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    webui.sampler_kind = lambda name: "k-diffusion" if kdiffusion else None
    other = OtherExtension(p)
    out = process_images(p, ON, facade)
    assert out.images[0].shape == (3, 128, 128)
    if kdiffusion:  # the tiled pass replaces the hires pass the other wrapper is around
        assert other.calls == ["sample"] and webui.encoded
    else:  # fallback: the stock hires pass, through the other extension's wrapper
        assert other.calls == ["sample", "sample_hr_pass"] and webui.encoded == []
        assert any("is not supported" in c for c in p.comments)
    other.assert_back_in_place(p)
    assert not hasattr(p, facade.JOB_ATTR) and p.is_hr_pass is False

    other.calls.clear()  # the next job chains again, to the same wrappers
    p.rng = ImageRNGStandIn((4, p.height // 8, p.width // 8), p.seeds)  # the WebUI starts a job with a fresh rng
    process_images(p, ON, facade)
    assert other.calls[0] == "sample" and len(other.calls) == (1 if kdiffusion else 2)
    other.assert_back_in_place(p)


def test_failed_job_leaves_another_extensions_wrappers_in_place(sd1_model):
    webui = WebUIStandIn()
    p = Txt2ImgStandIn(sd1_model, webui, prompts=[PROMPT])
    other = OtherExtension(p)
    facade.fail_job(p, SettingsError("window_size must be a multiple of 8"), webui=webui)
    facade.before_batch(p)
    with pytest.raises(AccDiffusionError, match="window_size"):
        p.sample(conditioning=None, unconditional_conditioning=None, seeds=p.seeds, subseeds=p.seeds,
                 subseed_strength=0.0, prompts=p.prompts)
    assert other.calls == []
    other.assert_back_in_place(p)
