"""The Forge backend driven on CPU through stand-ins of Forge 2's patcher and sampling function
(tests/forge_standins.py) with the real ldm UNet and k-diffusion samplers; the same job flow as
the A1111 tests (tests/a1111_standins.process_images)."""

import pytest
import torch

from accdiffusion.entry import facade
from accdiffusion.backends import forge
from accdiffusion.method.batching import CPU_TILE_BATCH
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import assert_hooks_removed as assert_clean
from a1111_standins import process_images
from forge_standins import ForgeTxt2ImgStandIn, ForgeWebUIStandIn

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"


pytestmark = pytest.mark.usefixtures("forge_backend")


def run(model, settings=ON, **kw):
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(model, webui, adapter=facade, **kw)
    return p, webui, process_images(p, settings, facade)


def test_positions_rows_and_options_helpers(sd1_host):
    positions = forge.attn2_positions(sd1_host.unet)
    assert positions and all(block in ("input", "output") for block, _, _ in positions)
    assert ("input", 1, 0) in positions
    assert forge.cond_rows_to_images([1, 0], 4) == [None, None, 0, 1]
    opts = forge.transformer_options_for({"patches": 1}, [1, 0], 3, torch.ones(12))
    assert opts["cond_or_uncond"] == [1, 0] * 3 and opts["patches"] == 1
    assert opts["cond_indices"] == [2, 3, 6, 7, 10, 11] and opts["cond_mark"].tolist() == [1, 1, 0, 0] * 3


@pytest.mark.parametrize("model_name", ["forge_sd1", "forge_sdxl"])
@pytest.mark.parametrize("size,scale,stages", [((64, 64), 2.0, 1), ((64, 128), 1.5, 1), ((64, 64), 3.0, 2)])
def test_hires_pass_through_forge_patching(request, model_name, size, scale, stages):
    model = request.getfixturevalue(model_name)
    p, webui, out = run(model, prompts=[PROMPT, "a green dragon"], width=size[1], height=size[0], hr_scale=scale)
    assert [im.shape for im in out.images] == [(3, p.hr_upscale_to_y, p.hr_upscale_to_x)] * 2
    assert all(bool(torch.isfinite(im).all()) for im in out.images)
    assert len(webui.samplers) == 1 + stages
    assert webui.encoded  # tile prompts were built from maps recorded through the attn2 patches
    # Forge calls the first-pass hook twice (stand-in): the recording must count each row once
    # per layer and step, as A1111's does (test_adapter_routing: first pass [forge])
    # Forge's memory estimate was asked with window-sized shapes, not the full latent
    last = model.kmodel.memory_calls[-1]
    assert last[2] * last[3] < (p.hr_upscale_to_y // 8) * (p.hr_upscale_to_x // 8)
    # tile_batch_size 0 (automatic) on a CPU resolves to CPU_TILE_BATCH windows per call, never 0
    assert ON.tile_batch_size == 0
    assert last[0] == CPU_TILE_BATCH * 2 * 2  # windows per call × (cond + uncond) × images
    assert_clean(p, model, webui)


def test_recording_patch_leaves_the_first_pass_identical(forge_sd1):
    p, webui, _ = run(forge_sd1, prompts=[PROMPT])
    first_with = p.first_pass_latent
    q, _, _ = run(forge_sd1, settings=None, prompts=[PROMPT])
    assert torch.equal(first_with, q.first_pass_latent)


def test_disabled_is_identical_and_attaches_nothing(forge_sd1):
    _, _, plain = run(forge_sd1, settings=None, prompts=[PROMPT])
    p, webui, off = run(forge_sd1, settings=AccDiffusionSettings(enabled=False), prompts=[PROMPT])
    assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))
    assert_clean(p, forge_sd1, webui)


def test_same_seed_same_image_and_differs_from_stock(forge_sd1):
    _, _, a = run(forge_sd1, prompts=[PROMPT], sampler_name="Euler a")
    _, _, b = run(forge_sd1, prompts=[PROMPT], sampler_name="Euler a")
    _, _, stock = run(forge_sd1, settings=None, prompts=[PROMPT], sampler_name="Euler a")
    assert torch.equal(a.images[0], b.images[0])
    assert not torch.allclose(a.images[0], stock.images[0])


def test_other_models_are_declined(forge_sd1):
    webui = ForgeWebUIStandIn()
    p = ForgeTxt2ImgStandIn(forge_sd1, webui, adapter=facade, prompts=[PROMPT])
    forge_sd1.is_sd1 = False
    try:
        assert facade.start_job(p, ON, webui=webui) is None
    finally:
        forge_sd1.is_sd1 = True
    assert any("Flux" in c for c in p.comments)
