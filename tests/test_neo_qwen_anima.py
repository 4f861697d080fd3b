"""Forge Neo's Qwen-Image and Anima (issue 24), through stand-ins of Neo's classes
(tests/neo_qwen_anima_standins.py): maps from Qwen-Image's double-stream joint softmax and from
Anima's cross-attention, words found inside Qwen's system template and cut as its strip_template
cuts the conditioning, Anima's words among the LLM adapter's T5 tokens, and the job end to end on
latents with a time axis [B, C, 1, H, W]."""

import pytest
import torch

import neo_qwen_anima_standins as standins
from a1111_standins import picture, process_images, process_img2img
from accdiffusion.backends import forge
from accdiffusion.entry import facade
from accdiffusion.flows import job as job_module
from accdiffusion.flows.job import kept_positions, word_positions
from accdiffusion.method.attention import AttentionRecorder
from accdiffusion.method.jointattention import JointAttentionCapture, joint_family, recorded_blocks
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.words import split_words
from dit_standins import DiTImg2ImgStandIn
from neo_qwen_anima_standins import (AnimaEngineStandIn, AnimaTextEngineStandIn, QwenImageEngineStandIn,
                                     QwenTextEngineStandIn, VideoLatentTxt2ImgStandIn, VideoVAEWebUIStandIn)

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def qwen():
    return QwenImageEngineStandIn()


@pytest.fixture(scope="module")
def anima():
    return AnimaEngineStandIn()


@pytest.fixture(params=["qwen", "anima"])
def family(request, qwen, anima):
    return {"qwen": qwen, "anima": anima}[request.param]


def run(model, settings=ON, **kw):
    model.transformer.calls.clear()
    webui = VideoVAEWebUIStandIn()
    kw.setdefault("cfg_scale", 1.0)
    p = VideoLatentTxt2ImgStandIn(model, webui, kw.pop("prompts", [PROMPT]), **kw)
    return p, webui, process_images(p, settings, facade)


# --- Qwen-Image: words inside the system template, positions in the stripped conditioning -------------
def _user_spans(engine, ids):
    """[start, end) of every piece's user text: after "<|im_start|>user\\n", up to its <|im_end|>."""
    end_id = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    spans = []
    for i in range(len(ids) - 2):
        if ids[i] == engine.id_template and ids[i + 1] == engine.id_user and ids[i + 2] == engine.id_newline:
            spans.append((i + 3, ids.index(end_id, i + 3)))
    return spans


def _stripped_ids(engine, line):
    """The token ids in the order of the conditioning's rows: the line's tokens as the engine's own
    strip_template cuts them (on an [L, width] tensor as wide as its encoder's output)."""
    ids = engine.tokenize_line(line)[0].tokens
    width = engine.text_encoder.get_input_embeddings().weight.shape[1]
    rows = engine.strip_template(torch.tensor(ids)[:, None].expand(len(ids), width), ids)
    return ids, rows[:, 0].tolist()


@pytest.mark.parametrize("prompt", ["a red cube on the image, its color blue",
                                    "a (red:1.3) cube on the image, (its color:0.8) blue"])
def test_qwen_words_are_the_prompts_in_the_stripped_conditioning(prompt):
    """The system prompt says "image" and "color" too: only the prompt's count. Positions are rows of
    the conditioning the model gets (strip_template cut the system part and "<|im_start|>user\\n");
    with emphasis every piece has its own template, and only the first one is cut (Neo's rule)."""
    engine = QwenTextEngineStandIn()
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    ids, kept_ids = _stripped_ids(engine, prompt)
    conditioning = engine([prompt])[0]
    assert conditioning.shape[0] == len(kept_ids) < len(ids)
    offset = len(ids) - len(kept_ids)
    assert ids[offset - 3:offset] == [engine.id_template, engine.id_user, engine.id_newline]  # cut past "user\n"
    spelled = [engine.tokenizer.decode([kept_ids[i] for i in found]).strip() for found in positions]
    assert spelled == [w.text for w in words]
    spans = _user_spans(engine, ids)
    assert all(any(a <= i + offset < b for a, b in spans) for found in positions for i in found)
    # the conditioning's row of a word is the encoder's state of the prompt's token, not the system's
    system_image = ids.index(engine.tokenizer.convert_tokens_to_ids("Ġimage"))
    assert system_image < spans[0][0]
    image = [w.text for w in words].index("image")
    assert all(i + offset != system_image for i in positions[image])
    embeds = engine.text_encoder.get_input_embeddings()(torch.tensor([ids]))
    embeds = embeds * torch.tensor(engine.tokenize_line(prompt)[0].multipliers)[None, :, None]
    full = engine.text_encoder(embeds)[0]
    for found in positions:
        assert torch.equal(conditioning[found], full[[i + offset for i in found]])
    if "(" in prompt:  # later pieces keep their templates: the system's "image" is in the conditioning
        assert kept_ids.count(engine.tokenizer.convert_tokens_to_ids("Ġimage")) > 1


def test_qwen_strip_rule_reads_the_encoders_width():
    """Neo compares the output's width with the template's end (qwen_engine.py:122): an encoder
    narrower than that keeps "<|im_start|>user\\n" in the conditioning, and the positions follow."""
    prompt = "a red cube on the image"
    wide, narrow = QwenTextEngineStandIn(), QwenTextEngineStandIn(width=64)
    words = split_words(prompt)
    ids, kept_wide = _stripped_ids(wide, prompt)
    _, kept_narrow = _stripped_ids(narrow, prompt)
    assert len(kept_narrow) == len(kept_wide) + 3 and narrow([prompt])[0].shape[0] == len(kept_narrow)
    at_wide, at_narrow = word_positions(wide, words, prompt), word_positions(narrow, words, prompt)
    assert at_narrow == [[i + 3 for i in found] for found in at_wide]
    assert kept_positions(narrow, ids)[len(ids) - len(kept_narrow)] == 0


# --- Anima: words among the T5 tokens ---------------------------------------------------------------------
def test_anima_words_are_found_among_the_t5_tokens():
    """The model attends to the adapter's output, one row per T5 token (then padding to 512): the
    positions index the T5 ids, whatever the Qwen ids are; emphasis weights those rows."""
    engine = AnimaTextEngineStandIn()
    prompt = "a (red-haired:1.3) astronaut riding a horse on the image of the moon"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    chunk, = engine.tokenize_line(prompt)
    assert len(chunk.qwen_tokens) != len(chunk.t5_tokens)  # Qwen positions would point elsewhere
    spelled = [engine.t5_tokenizer.decode([chunk.t5_tokens[i] for i in found]).strip() for found in positions]
    assert spelled == [w.text for w in words]
    assert max(i for found in positions for i in found) < len(chunk.t5_tokens) - 1  # never the EOS or padding
    red = [w.text for w in words].index("red-haired")
    assert len(positions[red]) > 1 and all(chunk.t5_multipliers[i] == 1.3 for i in positions[red])
    conditioning = engine([prompt])[0]
    assert conditioning.shape == (1, 512, 32)
    assert not conditioning[0, len(chunk.t5_tokens):].any()


# --- maps from the blocks' attention -------------------------------------------------------------------
def _spy(monkeypatch, family, text):
    """The attention the blocks compute, as a map source would read it: Qwen-Image's joint softmax
    over [text; image] (its text columns), Anima's cross-attention softmax (keys: the 512 rows)."""
    seen = []
    if family == "qwen":
        original = standins.attention_function

        def spy(q, k, v, heads):
            b, n, inner = q.shape
            split = lambda t: t.view(b, n, heads, inner // heads).transpose(1, 2)
            probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) * (inner // heads) ** -0.5, -1)
            seen.append(probs[:, :, text:, :text].mean(1))
            return original(q, k, v, heads)

        monkeypatch.setattr(standins, "attention_function", spy)
    else:
        original = standins.attention_op

        def spy(q, k, v):
            if k.shape[2] == text:  # the cross-attention
                seen.append(torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1).mean(1))
            return original(q, k, v)

        monkeypatch.setattr(standins, "attention_op", spy)
    return seen


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
def test_maps_are_the_attention_the_blocks_compute(monkeypatch, family, grid):
    transformer = family.transformer
    kind = family.family
    assert joint_family(transformer) == kind
    cond = family.encode(PROMPT)
    context = cond[None].repeat(2, *[1] * cond.ndim)  # Qwen [2, L, D]; Anima [2, 1, 512, D]
    text = context.shape[1] if kind == "qwen" else context.shape[2]
    x = torch.randn(2, 16, 1, grid[0] * 2, grid[1] * 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([600.0, 600.0])
    plain = transformer(x, t, context=context)
    seen = _spy(monkeypatch, kind, text)
    recorder = AttentionRecorder((grid[0] * 2, grid[1] * 2), 2, downsample=2)
    blocks = recorded_blocks(transformer)
    with JointAttentionCapture(transformer, recorder, [None, 1]):
        recorded = transformer(x, t, context=context)
    assert torch.equal(plain, recorded)
    assert blocks == [(transformer.transformer_blocks if kind == "qwen" else transformer.blocks)[-1]]
    expected = seen[-1][1].T.reshape(-1, *grid)  # the last block's, image 1's row
    assert recorder.maps(0) is None
    assert recorder.maps(1).shape == (text, *grid)
    assert torch.allclose(recorder.maps(1), expected, atol=1e-5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in transformer.modules())


# --- the job ---------------------------------------------------------------------------------------------
def test_qwen_and_anima_are_served(family):
    p = VideoLatentTxt2ImgStandIn(family, VideoVAEWebUIStandIn(), [PROMPT])
    assert facade.backend_for(p).unsupported_reason(p) is None


def test_hires_routes_each_windows_tile_prompt_on_5d_latents(family, stage_prompts, monkeypatch):
    starts = []
    original = job_module.StageDenoiser

    def made(*args, **kwargs):
        starts.append(len(family.transformer.calls))
        return original(*args, **kwargs)

    monkeypatch.setattr(job_module, "StageDenoiser", made)
    p, _, out = run(family, settings=AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=16),
                    hr_scale=2.0)
    assert p.first_pass_latent.shape == (1, 16, 1, 8, 8)
    # decode_latent_batch of a video VAE: one [frames, 3, H, W] per image
    assert [tuple(im.shape) for im in out.images] == [(1, 3, 128, 128)]
    calls = family.transformer.calls
    assert calls and all(len(c["shape"]) == 5 and c["shape"][2] == 1 for c in calls)
    (stage, windows, prompts), = stage_prompts
    assert any(prompt != PROMPT for prompt in prompts[0])  # the maps reached the tile prompts
    tiled = calls[starts[0]:]
    rows = [(c["shape"][-2:], c["context"][r]) for c in tiled for r in range(c["context"].shape[0])]
    # cfg 1: one row per window; Qwen's prompts of different token counts run as separate calls, in
    # order of first appearance (Anima's are all 512 long: one group), each call in window order
    encoded = [family.encode(prompt) for prompt in prompts[0]]
    lengths = list(dict.fromkeys(e.shape[0] for e in encoded))
    order = sorted(range(len(windows)), key=lambda i: lengths.index(encoded[i].shape[0]))
    if family.family == "qwen":
        assert len(lengths) > 1  # the stripped conditioning has the prompt's own length
    assert len(set(prompts[0])) > 1
    for (shape, context), i in zip(rows[:len(windows)], order):
        assert shape == (windows[i].height, windows[i].width)
        assert torch.equal(context, encoded[i]), (i, prompts[0][i])
    assert family.forge_objects.unet.model_options.get("model_function_wrapper") is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in family.transformer.modules())


def test_first_pass_bit_identical_and_disabled_is_not_installed(family):
    p, _, _ = run(family)
    q, _, plain = run(family, settings=None)
    assert p.first_pass_latent.ndim == 5
    assert torch.equal(p.first_pass_latent, q.first_pass_latent)
    _, _, off = run(family, settings=AccDiffusionSettings(enabled=False))
    assert len(plain.images) == len(off.images) == 1
    assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))


def test_img2img_probe_and_tiled_pass_on_5d_latents(family, stage_prompts, monkeypatch):
    """img2img: Neo's init latent has the time axis (its VAE encodes one frame); the probe pass's
    call and every tiled call give the model [B, C, 1, h, w], and the probe's maps reach the tiles."""
    probes = []
    original = forge.ForgeBackend._joint_probe_call

    def spy(p, unet, recorder, conds, loaded, prepare, *more):
        call = original(p, unet, recorder, conds, loaded, prepare, *more)
        return lambda x, sigma: probes.append(tuple(x.shape)) or call(x, sigma)

    monkeypatch.setattr(forge.ForgeBackend, "_joint_probe_call", staticmethod(spy))
    family.transformer.calls.clear()
    webui = VideoVAEWebUIStandIn()
    webui.native = 64
    p = DiTImg2ImgStandIn(family, webui, [PROMPT], [picture(64, 64)], width=128, height=128, adapter=facade,
                          cfg_scale=1.0)
    out = process_img2img(p, ON, facade)
    assert p.init_latent.ndim == 5
    assert probes and all(len(shape) == 4 for shape in probes)  # the job's frame; the model gets the axis back
    calls = family.transformer.calls
    assert calls and all(len(c["shape"]) == 5 and c["shape"][2] == 1 for c in calls)
    assert any(c["shape"][-2:] == (8, 8) for c in calls)  # the probe, at the native size
    assert [tuple(im.shape) for im in out.images] == [(1, 3, 128, 128)]  # one frame per image
    assert all(bool(torch.isfinite(im).all()) for im in out.images)
    assert p.comments == {}
    assert any(prompt != PROMPT for _, _, prompts in stage_prompts for prompt in prompts[0])
