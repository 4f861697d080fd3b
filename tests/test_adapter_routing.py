"""What the adapter routes where, on the A1111 and Forge stand-ins: every image of a batch gets its
own maps and its own tile prompts (the same prompt twice, prompts that differ only after their
first 75-token chunk, every CFG layout A1111 and Forge use), and every method setting reaches the
model or the sampler through the adapter.

The tiny UNet barely reacts to a prompt, so these tests spy: on the rows of every model call
(``Host._eps``, where both hosts end up), on the sampler's state, on the decoder. Tile prompts are
made unmistakable by giving each image's plan labelled prompts ("tile 2 of picture b")."""

from __future__ import annotations

import re
import zlib

import pytest
import torch

from accdiffusion.entry import facade
from accdiffusion.flows import txt2img as txt2img_flow
from accdiffusion.method.hires import cover_resize, latent_stats, restandardise
from accdiffusion.lab.reference import RowCond
from accdiffusion.flows.rows import match_length
from accdiffusion.method.settings import AccDiffusionSettings

from a1111_standins import (ScheduledPromptConditioning, StandInModel, Txt2ImgStandIn, WebUIStandIn,
                            process_images)
from forge_standins import ForgeModelStandIn, ForgeTxt2ImgStandIn, ForgeWebUIStandIn

PROMPT = "a red-haired astronaut riding a horse on the moon"
NEGATIVE = "blurry photo"
# exactly one 75-token chunk: a prompt that goes on after it shares its whole first chunk
CHUNK = " ".join(["castle"] * 75)
ROUTING = AccDiffusionSettings(enabled=True, window_mode="overlap", dilated_sampling=False, tile_batch_size=1)


pytestmark = pytest.mark.usefixtures("forge_backend")


class PromptVectorMixin:
    """SDXL stand-in whose pooled vector depends on the prompt (the plain one is constant)."""

    def encode(self, prompt, is_negative=False):
        out = super().encode(prompt, is_negative)
        if isinstance(out, dict):
            out = {**out, "vector": torch.tensor([zlib.crc32(prompt.encode()) % 100003 / 100003.0])}
        return out


class A1111VectorModel(PromptVectorMixin, StandInModel):
    pass


class ForgeVectorModel(PromptVectorMixin, ForgeModelStandIn):
    pass


@pytest.fixture(scope="module")
def models(sd1_host, sdxl_host):
    return {("a1111", "sd1"): StandInModel(sd1_host, sdxl=False),
            ("forge", "sd1"): ForgeModelStandIn(sd1_host, sdxl=False),
            ("a1111", "sdxl"): A1111VectorModel(sdxl_host, sdxl=True),
            ("forge", "sdxl"): ForgeVectorModel(sdxl_host, sdxl=True)}


def make_job(host, model, cfg=None, **kw):
    """A p of the host's stand-ins; ``cfg`` sets attributes of every CFG denoiser created
    (batch_cond_uncond, s_min_uncond_all: A1111's options)."""
    if host == "a1111":
        webui = WebUIStandIn()
        p = Txt2ImgStandIn(model, webui, negative=NEGATIVE, **kw)
    else:
        webui = ForgeWebUIStandIn()
        p = ForgeTxt2ImgStandIn(model, webui, adapter=facade, negative=NEGATIVE, **kw)
    create = webui.create_sampler

    def configured(name, m):
        sampler = create(name, m)
        for key, value in (cfg or {}).items():
            setattr(sampler.model_wrap_cfg, key, value)
        return sampler

    webui.create_sampler = configured
    return p, webui


def tile_label(image: int, window: int) -> str:
    return f"tile {window} of picture {'abcd'[image]}"


class LabelledPlan:
    def __init__(self, image: int, template: str = "{}"):
        self.image, self.template = image, template

    def tile_prompts(self, latent_size, windows, threshold):
        return [self.template.format(tile_label(self.image, w)) for w in range(len(windows))]


@pytest.fixture
def spy(monkeypatch):
    """Labelled tile prompts for every image that has a plan; the maps each image's plan was built
    from; the rows of every hires model call as labels."""
    seen = {"maps": None, "calls": [], "template": "{}"}
    real_plans = txt2img_flow.image_plans

    def image_plans(p, job, maps):
        seen["maps"] = maps
        seen["counts"] = None if job.recorder is None else job.recorder.counts.clone()
        plans = real_plans(p, job, maps)
        return [None if plan is None else LabelledPlan(i, seen["template"]) for i, plan in enumerate(plans)]

    monkeypatch.setattr(txt2img_flow, "image_plans", image_plans)

    originals = {}

    def watch(p, model, labels):
        """Log the rows (as labels) and the latent size of every hires model call of ``p``."""
        encoded = {label: model.encode(label) for label in labels}
        real_eps = originals.setdefault(id(model.host), model.host._eps)
        seen["calls"], seen["shapes"] = [], []

        def label_of(row: RowCond) -> str:
            best, best_n = None, 0
            for label, enc in encoded.items():
                text = enc["crossattn"] if isinstance(enc, dict) else enc
                n = match_length(row.context, text)
                vector_ok = not isinstance(enc, dict) or torch.equal(enc["vector"].to(row.vector), row.vector)
                if n == text.shape[0] and vector_ok and n > best_n:
                    best, best_n = label, n
            return best

        def eps(x, t, conds):
            if p.is_hr_pass:
                seen["calls"].append([label_of(c) for c in conds])
                seen["shapes"].append(tuple(x.shape[-2:]))
            return real_eps(x, t, conds)

        monkeypatch.setattr(model.host, "_eps", eps)

    seen["watch"] = watch
    return seen


def expected_calls(layout, windows, own):
    """Per CFG inner call (its rows' places), per window (tile_batch_size 1): each image's row its
    own tile prompt, every other row its own label."""
    return [[tile_label(place, w) if place is not None else own[r] for r, place in enumerate(call)]
            for call in layout for w in range(windows)]


CASES = {
    # host, prompts, CFG options, rows of each inner call of a step (image or None = negative)
    "a1111-same": ("a1111", [PROMPT, PROMPT], {}, [[0, 1, None, None]]),
    "a1111-same-batch_cond_uncond_off": ("a1111", [PROMPT, PROMPT], {"batch_cond_uncond": False},
                                         [[0, 1], [None, None]]),
    "a1111-same-skip_uncond": ("a1111", [PROMPT, PROMPT], {"s_min_uncond_all": True}, [[0, 1]]),
    "a1111-after75": ("a1111", [CHUNK, CHUNK + " a tower"], {}, [[0, 1], [None, None]]),
    "a1111-after75-batch_cond_uncond_off": ("a1111", [CHUNK, CHUNK + " a tower"], {"batch_cond_uncond": False},
                                            [[0, 1], [None, None]]),
    "forge-same": ("forge", [PROMPT, PROMPT], {}, [[None, None, 0, 1]]),
    "forge-after75": ("forge", [CHUNK, CHUNK + " a tower"], {}, [[None, None, 0, 1]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_images_tile_prompts_reach_its_own_rows(models, spy, case):
    host, prompts, cfg, layout = CASES[case]
    model = models[(host, "sd1")]
    p, webui = make_job(host, model, cfg=cfg, prompts=prompts, hr_scale=1.5)
    if "s_min_uncond_all" in cfg:
        p.s_min_uncond = 1e9  # every step below it: the uncond rows are dropped
    windows = 4  # 12×12 latent, 8×8 windows, stride 4
    labels = [tile_label(i, w) for i in range(2) for w in range(windows)] + [NEGATIVE] + prompts
    spy["watch"](p, model, labels)
    process_images(p, ROUTING, facade)
    steps = webui.samplers[-1].model_wrap_cfg.step
    assert steps == p.hr_second_pass_steps
    own = {"a1111": [NEGATIVE] * 4, "forge": [NEGATIVE, NEGATIVE, None, None]}[host]
    assert spy["calls"] == expected_calls(layout, windows, own) * steps


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_sdxl_tiles_get_their_own_pooled_vector(models, spy, host):
    model = models[(host, "sdxl")]
    p, webui = make_job(host, model, prompts=[PROMPT, PROMPT], hr_scale=1.5)
    labels = [tile_label(i, w) for i in range(2) for w in range(4)] + [NEGATIVE, PROMPT]
    spy["watch"](p, model, labels)
    process_images(p, ROUTING, facade)
    layout = {"a1111": [[0, 1, None, None]], "forge": [[None, None, 0, 1]]}[host]
    assert spy["calls"] == expected_calls(layout, 4, [NEGATIVE] * 4) * p.hr_second_pass_steps


def parse_editing(prompt: str, steps: int) -> list[ScheduledPromptConditioning]:
    """prompt_parser's [from:to:when] with an integer step, for one edit."""
    m = re.search(r"\[([^:\]]*):([^:\]]*):(\d+)\]", prompt)
    if not m:
        return [(steps, prompt)]
    before, after = prompt[:m.start()], prompt[m.end():]
    return [(int(m.group(3)), before + m.group(1) + after), (steps, before + m.group(2) + after)]


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_prompt_editing_switches_inside_the_tiles_at_its_step(models, spy, host):
    model = models[(host, "sd1")]
    p, webui = make_job(host, model, prompts=[PROMPT], hr_scale=1.5, hr_steps=3)
    spy["template"] = "[{0}:late {0}:1]"  # steps 0 and 1 take the first text, step 2 the second

    def learned_conditioning(p_, prompts, width, height):
        out = []
        for prompt in prompts:
            parts = parse_editing(prompt, p_.steps)
            out.append([ScheduledPromptConditioning(end, model.encode(text)) for end, text in parts])
        return out

    webui.learned_conditioning = learned_conditioning
    labels = [tile_label(0, w) for w in range(4)] + [f"late {tile_label(0, w)}" for w in range(4)] + [NEGATIVE]
    spy["watch"](p, model, labels)
    process_images(p, ROUTING, facade)
    cond_row = 0 if host == "a1111" else 1
    per_step = [[call[cond_row] for call in spy["calls"][s * 4:(s + 1) * 4]] for s in range(3)]
    assert per_step[0] == per_step[1] == [tile_label(0, w) for w in range(4)]
    assert per_step[2] == [f"late {tile_label(0, w)}" for w in range(4)]


# --- first pass: each image's maps from its own row ----------------------------------------------------
FIRST_PASS = {"a1111": {}, "a1111-batch_cond_uncond_off": {"batch_cond_uncond": False},
              "a1111-skip_uncond": {"s_min_uncond_all": True}, "forge": {}}


def recorded_maps(models, spy, host, cfg, prompts, seed):
    p, _ = make_job(host.split("-")[0], models[(host.split("-")[0], "sd1")], cfg=cfg, prompts=prompts, seed=seed)
    if "s_min_uncond_all" in cfg:
        p.s_min_uncond = 1e9
    process_images(p, ROUTING, facade)
    return spy["maps"], spy["counts"]


@pytest.mark.parametrize("host", list(FIRST_PASS))
def test_first_pass_records_each_image_into_its_own_maps(models, spy, host):
    """A batch of one prompt, seeds 1 and 2: each image's maps are those of a job of that image
    alone, recorded through A1111's attn2 wrappers (the reference for Forge too: Forge must read
    its cond chunk, which comes after the uncond chunk)."""
    cfg = FIRST_PASS[host]
    batch, counts = recorded_maps(models, spy, host, cfg, [PROMPT, PROMPT], seed=1)
    reference = (host, cfg) if host.startswith("a1111") else ("a1111", {})  # skip-uncond changes the sampling
    alone = [recorded_maps(models, spy, *reference, [PROMPT], seed=s)[0][0] for s in (1, 2)]
    alone_counts = spy["counts"]
    # each row once per recorded layer and step (Forge calls its hook twice per pass: no double patch)
    assert counts[0] == counts[1] == alone_counts[0] > 0
    for image in range(2):
        assert batch[image] is not None and torch.allclose(batch[image], alone[image], atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-5)  # the seeds' maps differ: a real check


def test_first_pass_prompts_differing_after_the_first_chunk(models, spy):
    batch, _ = recorded_maps(models, spy, "a1111", {}, [CHUNK, CHUNK + " a tower"], seed=1)
    alone = recorded_maps(models, spy, "a1111", {}, [CHUNK + " a tower"], seed=2)[0][0]
    assert batch[0] is not None and batch[1] is not None
    assert torch.allclose(batch[1], alone, atol=1e-5)


# --- method settings through the adapter -----------------------------------------------------------------
def sampler_trace(webui):
    """Per hires sampler: the (x, denoised, sigma) of every step, from the sampler's callback."""
    traces = []
    create = webui.create_sampler

    def traced(name, model):
        sampler = create(name, model)
        trace, callback = [], sampler.callback_state

        def record(d):
            trace.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})
            callback(d)

        sampler.callback_state = record
        traces.append(trace)
        return sampler

    webui.create_sampler = traced
    return traces


@pytest.fixture
def img2img_inputs(monkeypatch):
    """x, noise and result of every sample_img2img (A1111 and Forge stand-ins share it)."""
    from a1111_standins import KDiffusionSamplerStandIn

    calls = []
    real = KDiffusionSamplerStandIn.sample_img2img

    def spy(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        out = real(self, p, x, noise, c, uc, steps=steps, image_conditioning=image_conditioning)
        calls.append({"x": x.clone(), "noise": noise.clone(), "out": out.clone()})
        return out

    monkeypatch.setattr(KDiffusionSamplerStandIn, "sample_img2img", spy)
    return calls


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("skip_residual", [True, False])
def test_skip_residual_changes_the_state_the_sampler_continues_from(models, denoisers, img2img_inputs, host,
                                                                     skip_residual):
    model = models[(host, "sd1")]
    p, webui = make_job(host, model, prompts=[PROMPT], hr_steps=3)
    traces = sampler_trace(webui)
    # cosine_scale_1 = 1: a large c1 makes the mix plain at this noise level
    process_images(p, ROUTING.replace(skip_residual=skip_residual, cosine_scale_1=1.0), facade)
    trace, stage, inputs = traces[-1], denoisers[-1], img2img_inputs[-1]
    first, second = trace[0], trace[1]
    # what Euler makes of step 0 alone; the skip residual then mixes in the re-noised reference
    euler = first["x"] + (first["x"] - first["denoised"]) / first["sigma"] * (second["sigma"] - first["sigma"])
    c1 = stage.factors(second["sigma"]).c1
    mixed = (1 - c1) * euler + c1 * (inputs["x"] + inputs["noise"] * second["sigma"])
    if skip_residual:
        assert c1 > 0.05 and not torch.allclose(euler, mixed, atol=1e-4)
        assert torch.allclose(second["x"], mixed, atol=1e-5)
    else:
        assert torch.allclose(second["x"], euler, atol=1e-5)


def hires_run(models, host, settings, **kw):
    model = models[(host, "sd1")]
    p, webui = make_job(host, model, prompts=[PROMPT], **kw)
    traces = sampler_trace(webui)
    process_images(p, settings, facade)
    return traces, webui


METHOD = AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=4)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_patch_prompts_and_dilated_sampling_reach_the_model(models, spy, host):
    model = models[(host, "sd1")]
    seen = {}
    for name, settings in {"on": METHOD, "no_patch": METHOD.replace(patch_prompts=False),
                           "no_dilated": METHOD.replace(dilated_sampling=False)}.items():
        p, webui = make_job(host, model, prompts=[PROMPT], hr_scale=2.0)
        spy["watch"](p, model, [tile_label(0, w) for w in range(9)] + [PROMPT, NEGATIVE])
        process_images(p, settings, facade)
        seen[name] = (set(spy["shapes"]), {label for call in spy["calls"] for label in call})
    # 16×16 latent: 8×8 windows; s = 2: 8×8 sub-latents, which carry the full prompt (global branch)
    assert seen["on"][0] == {(8, 8)}
    assert {tile_label(0, w) for w in range(9)} <= seen["on"][1] and PROMPT in seen["on"][1]
    assert not any(label.startswith("tile") for label in seen["no_patch"][1])  # full prompt everywhere
    assert PROMPT not in seen["no_dilated"][1]  # no dilated calls: only the tiles' own prompts
    assert seen["no_dilated"][1] == {tile_label(0, w) for w in range(9)} | {NEGATIVE}


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_window_interaction_shuffles_what_the_dilated_branch_sees(models, monkeypatch, host):
    """The same first pass and step 0: the local windows reach the model unchanged, the dilated
    sub-latents shuffled (and un-shuffled after: the denoised step differs)."""
    model = models[(host, "sd1")]
    runs = {}
    for interaction in (True, False):
        p, webui = make_job(host, model, prompts=[PROMPT], hr_scale=2.0)
        traces = sampler_trace(webui)
        inputs = []
        real = model.host._eps

        def eps(x, t, conds, _p=p, _inputs=inputs):
            if _p.is_hr_pass:
                _inputs.append(x.clone())
            return real(x, t, conds)

        monkeypatch.setattr(model.host, "_eps", eps)
        process_images(p, METHOD.replace(window_interaction=interaction), facade)
        monkeypatch.undo()
        runs[interaction] = (inputs, traces[-1][0]["denoised"])
    (on, den_on), (off, den_off) = runs[True], runs[False]
    local_calls = 9 // METHOD.tile_batch_size + 1  # 9 windows in chunks of 4
    assert all(torch.equal(a, b) for a, b in zip(on[:local_calls], off[:local_calls]))
    assert not torch.allclose(on[local_calls], off[local_calls])
    assert torch.equal(torch.sort(on[local_calls].flatten())[0], torch.sort(off[local_calls].flatten())[0])
    assert not torch.allclose(den_on, den_off, atol=1e-6)


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_progressive_and_each_stage_starts_from_the_previous_one(models, img2img_inputs, host):
    """3×: progressive runs 2× then 3×; the second stage starts from the first stage's result
    (upscaled bicubic, re-standardised to the first pass), not from the first pass."""
    traces, webui = hires_run(models, host, METHOD, hr_scale=3.0, hr_steps=2)
    assert [tuple(c["x"].shape[-2:]) for c in img2img_inputs] == [(16, 16), (24, 24)]
    stage1, stage2 = img2img_inputs
    mean, std = latent_stats(stage1["x"].float())  # the first stage was standardised to the first pass
    expected = restandardise(cover_resize(stage1["out"], (24, 24), "bicubic").float(), mean, std)
    assert torch.allclose(stage2["x"], expected, atol=1e-5)
    img2img_inputs.clear()
    hires_run(models, host, METHOD.replace(progressive=False), hr_scale=3.0, hr_steps=2)
    assert [tuple(c["x"].shape[-2:]) for c in img2img_inputs] == [(24, 24)]


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("mode", ["on", "off"])
def test_tiled_decode_setting_is_honoured(models, host, mode):
    model = models[(host, "sd1")]
    p, webui = make_job(host, model, prompts=[PROMPT, PROMPT], hr_scale=2.0)
    calls = []
    decode, decode_batch = webui.decode, webui.decode_batch
    webui.decode = lambda m, z: calls.append(("decode", tuple(z.shape))) or decode(m, z)
    webui.decode_batch = lambda m, z: calls.append(("batch", tuple(z.shape))) or decode_batch(m, z)
    out = process_images(p, METHOD.replace(tiled_decode=mode), facade)
    hires = [c for c in calls if c[1][-1] == 16]
    if mode == "on":  # one latent at a time through the tiler, never the batch decode
        assert hires and all(kind == "decode" and shape[0] == 1 for kind, shape in hires)
        assert not any(kind == "batch" for kind, shape in hires)
    else:
        assert [kind for kind, _ in hires if kind == "batch"] == ["batch"]
    assert len(out.images) == 2


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_batch_of_one_prompt_gets_one_tile_prompt_map_per_image(models, spy, monkeypatch, host):
    from accdiffusion.method import tilemap

    drawn = []
    draw = tilemap.draw_tile_prompt_map
    monkeypatch.setattr(tilemap, "draw_tile_prompt_map",
                        lambda source, windows, prompts, size, **kw: drawn.append(list(prompts))
                        or draw(source, windows, prompts, size, **kw))  # pixels_per_latent= since ebd80fe
    p, webui = make_job(host, models[(host, "sd1")], prompts=[PROMPT, PROMPT], hr_scale=1.5)
    out = process_images(p, ROUTING.replace(tile_prompt_map=True), facade)
    assert len(out.images) == 4 and len(webui.saved) == 2
    assert drawn == [[tile_label(i, w) for w in range(4)] for i in range(2)]
    assert not any("first seed" in c for c in p.comments)  # overlap windows, no dilated shuffle: nothing seeded



def test_batch_seed_note_only_where_a_seeded_choice_is_shared():
    from accdiffusion.flows.job import batch_seed_note

    on = AccDiffusionSettings(enabled=True)
    assert batch_seed_note([5], on) is None and batch_seed_note([5, 5], on) is None
    assert "(5)" in batch_seed_note([5, 6], on)
    overlap = on.replace(window_mode="overlap")
    assert batch_seed_note([5, 6], overlap) is not None  # the dilated shuffle is still shared
    assert batch_seed_note([5, 6], overlap.replace(window_interaction=False)) is None
    assert batch_seed_note([5, 6], overlap.replace(dilated_sampling=False)) is None


# --- rows: places first, content for the rest ----------------------------------------------------------
def test_row_images_places_then_content():
    from accdiffusion.flows.rows import UNPLACED, row_images

    g = torch.Generator().manual_seed(0)
    a, b, neg = (torch.randn(77, 8, generator=g) for _ in range(3))
    ab = torch.cat([a, b])  # a prompt that goes on after a's whole first chunk
    pad = lambda t, n: torch.cat([t, t[-1:].expand(n - t.shape[0], -1)])
    same = [[a], [a]]
    # equal prompts, no layout: told apart by their order
    assert row_images([a, a, neg, neg], same) == [0, 1, None, None]
    # Forge's [uncond, cond] chunks, placed; a placed row whose text is not its image's is left alone
    assert row_images([neg, neg, a, a], same, [None, None, 0, 1]) == [None, None, 0, 1]
    assert row_images([neg, b], same, [None, 1]) == [None, None]
    # the longest match wins over a prefix; a padded shorter prompt is still itself
    assert row_images([pad(a, 154), ab], [[a], [ab]]) == [0, 1]
    assert row_images([ab, pad(a, 154)], [[a], [ab]]) == [1, 0]
    # unplaced rows go to the images no placed row took
    assert row_images([a, a], same, [1, UNPLACED]) == [1, 0]


def test_a1111_cfg_rows_follow_the_denoisers_layout():
    from types import SimpleNamespace

    from accdiffusion.backends.a1111 import CfgRows
    from accdiffusion.flows.rows import UNPLACED

    layout = CfgRows()
    assert layout.take(2) == [UNPLACED] * 2  # no step started: unplaced (content decides)
    # image 0: "a AND b" (two cond rows, no tile prompts), image 1 plain; then the uncond rows
    layout.start_step(SimpleNamespace(batch=[[1, 2], [3]]))
    assert layout.take(2) == [None, None] and layout.take(2) == [1, None] and layout.take(1) == [None]
    assert layout.take(1) == [UNPLACED]  # more rows than the layout has: someone changed x_in
    layout.start_step(SimpleNamespace(batch=[[1], [2]]))
    assert layout.take(2) == [0, 1]  # skip-uncond: the step ends here; the next one starts afresh
    layout.start_step(SimpleNamespace(batch=[[1], [2]]))
    assert layout.take(4) == [0, 1, None, None]


# --- prompt units: the setting reaches the plans, and the tiles keep whole phrases ------------------------
TAGS = "1girl, red hair, blue eyes, night sky, city street"


@pytest.mark.parametrize("host", ["a1111", "forge"])
@pytest.mark.parametrize("window_mode", ["overlap", "shifted"])
@pytest.mark.parametrize("units", ["phrases", "words"])
def test_prompt_units_reach_the_plans_and_the_tile_prompts(models, monkeypatch, caplog, host, window_mode, units):
    import ast
    import logging

    from accdiffusion.method.words import PromptUnits, phrase_units, split_words

    plans = []
    real_plans = txt2img_flow.image_plans

    def image_plans(p, job, maps):
        plans.extend(real_plans(p, job, maps))
        return plans

    monkeypatch.setattr(txt2img_flow, "image_plans", image_plans)
    p, _ = make_job(host, models[(host, "sd1")], prompts=[TAGS], hr_scale=1.5)
    settings = ROUTING.replace(prompt_units=units, window_mode=window_mode, patch_prompt_threshold=0.6)
    with caplog.at_level(logging.DEBUG, logger="accdiffusion"):
        process_images(p, settings, facade)
    words = split_words(TAGS)
    expected = phrase_units(TAGS, words) if units == "phrases" else PromptUnits.each_word(len(words))
    assert len(plans) == 1 and plans[0].units == expected
    logged = [ast.literal_eval(r.getMessage().split("tile prompts: ", 1)[1]) for r in caplog.records
              if "tile prompts: " in r.getMessage()]
    tiles = [t for stage in logged for t in stage]
    assert tiles and any(t != TAGS for t in tiles)  # the maps dropped something somewhere
    phrase_texts = [[words[i].text for i in m] for m in phrase_units(TAGS, words).members]
    split = 0
    for tile in tiles:
        kept = {w.text for w in split_words(tile)}
        split += sum(0 < len(kept & set(ph)) < len(ph) for ph in phrase_texts)
    if units == "phrases":
        assert split == 0, tiles
    else:  # one mask per word, and these maps do split phrases: the check above can fail
        assert plans[0].masks.masks.shape[0] == len(words) and split > 0
