"""Which attention layers the first-pass recorder reads on each host, and at which resolution: the
cross-attention (attn2) of the up and down blocks at 1/4 of the latent (the reference's 32×32 level
for a 1024² SDXL image, H/32 × W/32 in pixels), never the middle block, every transformer block of
those levels, every step, the positive rows only. Pinned by name for the SD1 and SDXL block layouts
(the tiny UNets keep the real layouts: SD1 attention at 1, 2, 4; SDXL at 2, 4 with the middle block
at 4 — the same resolution as the recorded level, so only the name keeps it out), on A1111 (instance
wrappers on the ldm/sgm modules) and Forge (attn2 replace patches keyed (block, number, index))."""

from __future__ import annotations

import pytest

from accdiffusion.backends import forge as forge_backend
from accdiffusion.entry import facade
from accdiffusion.method.attention import AttentionRecorder
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import StandInModel, Txt2ImgStandIn, WebUIStandIn, process_images
from forge_standins import ForgeModelStandIn, ForgeTxt2ImgStandIn, ForgeWebUIStandIn

PROMPT = "a red-haired astronaut riding a horse on the moon"
ON = AccDiffusionSettings(enabled=True)

# (name of the ldm module, Forge's patch key); the reference configs (accdiffusion/lab/reference.py
# UNET_CONFIGS) with one res block per level: SD1 input_blocks 1/3/5 hold attention at 1, 2, 4,
# output_blocks 2–7 at 4, 2, 1; SDXL input_blocks 3/5 at 2, 4 (depth 2), output_blocks 0–3 at 4, 2
RECORDED = {
    "sd1": {("input_blocks.5.1.transformer_blocks.0.attn2", ("input", 5, 0)),
            ("output_blocks.2.1.transformer_blocks.0.attn2", ("output", 2, 0)),
            ("output_blocks.3.1.transformer_blocks.0.attn2", ("output", 3, 0))},
    "sdxl": {(f"{block}_blocks.{n}.1.transformer_blocks.{i}.attn2", (block, n, i))
             for block, n in (("input", 5), ("output", 0), ("output", 1)) for i in (0, 1)},
}

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture
def recorded(monkeypatch):
    """Per recorded layer call: (layer, query length, grid); on A1111 the module's name (observe),
    on Forge the patch key the call came through (add_qk, called from the patch)."""
    seen: list[tuple[object, int, tuple[int, int]]] = []
    names: dict[int, str] = {}
    current: dict[str, object] = {}

    observe = AttentionRecorder.observe

    def observing(self, module, x, context, rows=None, q=None, k=None):
        seen.append((names.get(id(module)), x.shape[1], self.grid))
        return observe(self, module, x, context, rows, q, k)

    add_qk = AttentionRecorder.add_qk

    def adding(self, q, k, heads, images):
        if "key" in current:
            seen.append((current.pop("key"), q.shape[1], self.grid))
        return add_qk(self, q, k, heads, images)

    recording_unet = forge_backend._recording_unet

    def keyed(unet_patcher, recorder, attention):
        unet = recording_unet(unet_patcher, recorder, attention)
        patches = unet.model_options["transformer_options"]["patches_replace"]["attn2"]
        for key, patch in list(patches.items()):
            def with_key(q, k, v, extra, _patch=patch, _key=key):
                current["key"] = _key
                try:
                    return _patch(q, k, v, extra)
                finally:
                    current.pop("key", None)
            with_key.accdiffusion_replaced = patch.accdiffusion_replaced
            patches[key] = with_key
        return unet

    monkeypatch.setattr(AttentionRecorder, "observe", observing)
    monkeypatch.setattr(AttentionRecorder, "add_qk", adding)
    monkeypatch.setattr(forge_backend, "_recording_unet", keyed)

    def name_modules(unet):
        names.update({id(m): n for n, m in unet.named_modules()})

    return seen, name_modules


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_recorder_reads_the_quarter_resolution_up_and_down_layers(request, recorded, layout, host):
    seen, name_modules = recorded
    base_host = request.getfixturevalue(f"{layout}_host")
    name_modules(base_host.unet)
    model = (StandInModel if host == "a1111" else ForgeModelStandIn)(base_host, sdxl=layout == "sdxl")
    webui = WebUIStandIn() if host == "a1111" else ForgeWebUIStandIn()
    kw = dict(prompts=[PROMPT], width=192, height=128, steps=2, hr_steps=1, hr_scale=1.5)  # 16×24 latent: a 4×6 grid
    p = (Txt2ImgStandIn(model, webui, **kw) if host == "a1111" else
         ForgeTxt2ImgStandIn(model, webui, adapter=facade, **kw))
    process_images(p, ON, facade)
    expected = {name if host == "a1111" else key for name, key in RECORDED[layout]}
    layers = [layer for layer, _, _ in seen]
    assert set(layers) == expected
    assert {(length, grid) for _, length, grid in seen} == {(4 * 6, (4, 6))}  # 1/4 of 16×24, rows × columns
    # every recorded layer in every UNet call of the first pass (Euler: one call per step), none twice
    calls = p.steps
    assert len(layers) == len(expected) * calls and all(layers.count(layer) == calls for layer in expected)
