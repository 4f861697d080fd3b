"""Forge Neo's Ernie-Image (issue 24), through stand-ins of Neo's classes (tests/neo_ernie_standins.py):
maps from its single-stream [image; text] attention with the split-half RoPE, words found by text
past the start token the Ministral-3 engine puts before the line (emphasis syntax is literal text there), each window's prompt
routed to its own rows on the patch-1 grid, and the job end to end. With ``ACCDIFFUSION_NEO_DIR``
naming a Neo checkout, the word spans are checked on Neo's real Ernie tokenizer."""

import os
from pathlib import Path

import pytest
import torch

import neo_ernie_standins
import neo_standins
from a1111_standins import process_images
from accdiffusion.entry import facade
from accdiffusion.flows import job as job_module
from accdiffusion.flows.job import word_positions
from accdiffusion.method.attention import AttentionRecorder
from accdiffusion.method.jointattention import (JointAttentionCapture, apply_rope_split_half, joint_family,
                                                recorded_blocks)
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.words import split_words
from neo_ernie_standins import ErnieEngineStandIn, MinistralEngineStandIn, mistral_like_tokenizer

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def ernie():
    return ErnieEngineStandIn()


def run(model, settings=ON, **kw):
    model.transformer.calls.clear()
    webui = neo_standins.KleinWebUIStandIn()  # FLUX.2's VAE: 16 px per latent pixel, 128 channels
    p = neo_standins.KleinTxt2ImgStandIn(model, webui, kw.pop("prompts", [PROMPT]), **kw)
    return p, webui, process_images(p, settings, facade)


def _spelled(engine, line, positions):
    ids = [int(t) for c in engine.tokenize_line(line) for t in c.tokens]
    return [engine.tokenizer.tokenizer.decode([ids[i] for i in found]).strip() for found in positions]


# --- words: no template, a start token before the line ------------------------------------------------
def test_words_are_found_by_text_and_the_start_token_never_counts():
    """The line starts with <s>: the word "s" must not take it; "(red:1.3)" is literal text to this
    engine, and "red" is found inside it."""
    engine = MinistralEngineStandIn(mistral_like_tokenizer())
    prompt = "s a (red:1.3) cat on a sofa, (Kätzchen:1.1) zebrafish of a café"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    assert _spelled(engine, prompt, positions) == [w.text for w in words]
    ids = [int(t) for t in engine.tokenize_line(prompt)[0].tokens]
    assert ids[0] == 1 and ids.count(1) == 1  # the engine's own start token, not the prompt's
    assert words[0].text == "s" and positions[0] and 0 not in positions[0]
    assert any(len(found) > 1 for found in positions)  # a word of several byte-level pieces


def test_ernie_is_served_and_an_engine_we_cannot_read_steps_aside(ernie):
    p = neo_standins.KleinTxt2ImgStandIn(ernie, neo_standins.KleinWebUIStandIn(), [PROMPT])
    assert joint_family(ernie.transformer) == "ernie"
    backend = facade.backend_for(p)
    assert backend.unsupported_reason(p) is None
    engine = ernie.text_processing_engine_ministral
    engine.id_end = 2  # now it looks like a CLIP / T5 engine, whose words are matched by ids: not this model's
    try:
        reason = backend.unsupported_reason(p)
    finally:
        del engine.id_end
    assert reason and "ErnieEngineStandIn models are not supported yet" in reason and "Ernie-Image" in reason


NEO_DIR = os.environ.get("ACCDIFFUSION_NEO_DIR")


@pytest.mark.skipif(not NEO_DIR, reason="ACCDIFFUSION_NEO_DIR (a Forge Neo checkout) is not set")
def test_words_on_neos_real_ernie_tokenizer():
    from transformers import AutoTokenizer

    path = Path(NEO_DIR) / "backend" / "huggingface" / "baidu" / "ERNIE-Image" / "tokenizer"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{path} has no tokenizer.json (Neo writes it at its first start)")
    engine = MinistralEngineStandIn(AutoTokenizer.from_pretrained(str(path)))
    prompt = "s, a user at a (red-haired:1.2) desk, Übergrößen Kätzchen 猫 on a café sofa"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    assert _spelled(engine, prompt, positions) == [w.text for w in words]
    assert [int(t) for t in engine.tokenize_line(prompt)[0].tokens].count(1) == 1  # <s> before the line


# --- maps from the [image; text] attention --------------------------------------------------------------
def test_split_half_rope_is_the_rotation_the_model_applies():
    x = torch.randn(2, 5, 2, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.rand(2, 5, 3) * 7
    pe = neo_ernie_standins.ernie_rotary(ids, 16, (4, 6, 6))
    assert torch.allclose(apply_rope_split_half(x, pe), neo_ernie_standins.rotate_split_half(x, pe), atol=1e-6)


def _attention_spy(monkeypatch, image_len):
    seen = []
    original = neo_ernie_standins.ernie_attention

    def spy(q, k, v):
        qh, kh = q.movedim(1, 2), k.movedim(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, -1)
        seen.append(probs[:, :, :image_len, image_len:].mean(1))  # image queries, text keys
        return original(q, k, v)

    monkeypatch.setattr(neo_ernie_standins, "ernie_attention", spy)
    return seen


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
def test_ernie_maps_are_the_text_share_the_layers_compute(monkeypatch, ernie, grid):
    transformer = ernie.transformer
    context = ernie.encode(PROMPT)[None].repeat(2, 1, 1)
    x = torch.randn(2, 128, *grid, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.6, 0.6])
    plain = transformer(x, t, context=context)
    image = grid[0] * grid[1]
    seen = _attention_spy(monkeypatch, image)
    recorder = AttentionRecorder(grid, 2, downsample=1)  # patch 1: a token per latent pixel
    with JointAttentionCapture(transformer, recorder, [None, 1]):
        recorded = transformer(x, t, context=context)
    assert torch.equal(plain, recorded)
    assert recorded_blocks(transformer) == [transformer.layers[-1]]  # the last quarter of 4 layers
    expected = seen[-1][1].T.reshape(-1, *grid)
    assert recorder.maps(0) is None
    assert recorder.maps(1).shape == (context.shape[1], *grid)
    assert torch.allclose(recorder.maps(1), expected, atol=1e-5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in transformer.modules())


def test_a_call_of_another_size_is_not_recorded(ernie):
    context = ernie.encode(PROMPT)[None]
    recorder = AttentionRecorder((4, 4), 1, downsample=1)
    with JointAttentionCapture(ernie.transformer, recorder, [0]):
        ernie.transformer(torch.randn(1, 128, 4, 6), torch.tensor([0.5]), context=context)  # a window, say
    assert recorder.maps(0) is None


# --- the job on Ernie-Image ------------------------------------------------------------------------------
def test_ernie_hires_routes_each_windows_tile_prompt_on_the_patch_1_grid(ernie, stage_prompts, monkeypatch):
    starts = []
    original = job_module.StageDenoiser

    def made(*args, **kwargs):
        starts.append(len(ernie.transformer.calls))
        return original(*args, **kwargs)

    monkeypatch.setattr(job_module, "StageDenoiser", made)
    p, _, out = run(ernie, settings=AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=16),
                    width=64, height=64, hr_scale=2.0)
    assert [im.shape for im in out.images] == [(3, 128, 128)]
    assert "no attention maps" not in " ".join(p.comments)
    (stage, windows, prompts), = stage_prompts
    assert stage.size == (8, 8)  # 128 px / 16
    assert ernie.transformer.calls[0]["shape"][-2:] == (4, 4)
    assert any(prompt != PROMPT for prompt in prompts[0])  # the maps reached the tile prompts
    calls = ernie.transformer.calls[starts[0]:]
    rows = [(c["shape"][-2:], c["context"][r]) for c in calls for r in range(c["context"].shape[0])]
    encoded = [ernie.encode(prompt) for prompt in prompts[0]]
    lengths = list(dict.fromkeys(e.shape[0] for e in encoded))
    order = sorted(range(len(windows)), key=lambda i: lengths.index(encoded[i].shape[0]))
    for (shape, context), i in zip(rows[:len(windows)], order):
        assert shape == (windows[i].height, windows[i].width)
        assert torch.equal(context, encoded[i]), (i, prompts[0][i])
    assert ernie.forge_objects.unet.model_options.get("model_function_wrapper") is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ernie.transformer.modules())


def test_ernie_first_pass_bit_identical_and_disabled_is_not_installed(ernie):
    p, _, _ = run(ernie, width=64, height=64)
    q, _, plain = run(ernie, settings=None, width=64, height=64)
    assert torch.equal(p.first_pass_latent, q.first_pass_latent)
    _, _, off = run(ernie, settings=AccDiffusionSettings(enabled=False), width=64, height=64)
    assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))


def test_stage_outputs_take_the_first_pass_statistics_per_channel_on_128_channels(ernie, stage_output_stats):
    """FLUX.2's packed latents (Ernie-Image, Flux.2 Klein) have 128 channels: every stage output gets
    the first pass's mean and std of each of them (as on Flux's 16), not one per image."""
    seen, per_channel_of = stage_output_stats
    run(ernie, width=64, height=64, hr_scale=3.0)
    assert len(seen) == 2 and len(per_channel_of) == 1  # two stages (2x, 3x), one first pass
    first = per_channel_of[0]
    assert first.shape[:2] == (1, 128)
    for mean, std, out in seen:
        assert mean.shape == std.shape == (1, 128, 1, 1)
        assert torch.allclose(out.float().mean((2, 3)), first.mean((2, 3)), atol=1e-4)
        assert torch.allclose(out.float().std((2, 3)), first.std((2, 3)), rtol=1e-3)
