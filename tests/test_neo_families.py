"""Forge Neo's new families (issue 24), through stand-ins of Neo's classes (tests/neo_standins.py):
Z-Image's NextDiT maps from its single-stream joint attention, words found inside the Qwen3 chat
template, each window's prompt routed to its own rows, and the job end to end. With
``ACCDIFFUSION_NEO_DIR`` naming a Neo checkout, the word spans are checked on Neo's real tokenizers."""

import os
from pathlib import Path

import pytest
import torch

import dit_standins
import neo_standins
from a1111_standins import process_images
from accdiffusion.entry import facade
from accdiffusion.flows import job as job_module
from accdiffusion.flows.job import word_positions
from accdiffusion.method.attention import AttentionRecorder
from accdiffusion.method.jointattention import JointAttentionCapture, joint_family, recorded_blocks
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.words import split_words
from dit_standins import DiTTxt2ImgStandIn, DiTWebUIStandIn
from neo_standins import Qwen3EngineStandIn, ZImageEngineStandIn, byte_level_tokenizer

ON = AccDiffusionSettings(enabled=True, window_mode="overlap")
PROMPT = "a red-haired astronaut riding a horse on the moon"

pytestmark = pytest.mark.usefixtures("forge_backend")


@pytest.fixture(scope="module")
def zimage():
    return ZImageEngineStandIn()


def run(model, settings=ON, **kw):
    model.transformer.calls.clear()
    webui = DiTWebUIStandIn()
    kw.setdefault("cfg_scale", 1.0)
    p = DiTTxt2ImgStandIn(model, webui, kw.pop("prompts", [PROMPT]), **kw)
    return p, webui, process_images(p, settings, facade)


# --- words inside the chat template -------------------------------------------------------------------
def _spelled(engine, line, positions):
    ids = [t for c in engine.tokenize_line(line) for t in c.tokens]
    return [engine.tokenizer.decode([ids[i] for i in found]).strip() for found in positions]


def test_words_are_found_inside_the_template_not_in_it():
    """"user" is a word of the template (<|im_start|>user) and of the prompt: only the prompt's
    one counts; a word split into several byte-level pieces keeps them all."""
    engine = Qwen3EngineStandIn(byte_level_tokenizer())
    prompt = "a user at a red-haired desk, photo of a café"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    assert _spelled(engine, prompt, positions) == [w.text for w in words]
    ids = engine.tokenize_line(prompt)[0].tokens
    template_user = engine.tokenizer(["<|im_start|>user"])["input_ids"][0][-1]
    user = positions[1]
    assert ids.index(template_user) not in user and len(positions[5]) >= 1
    assert any(len(p) > 1 for p in positions)  # a word of several pieces


def test_words_across_emphasis_pieces_each_in_its_own_template():
    """Neo's Qwen3 engine wraps every emphasis piece in its own template (qwen3_engine.py:37-57):
    the words keep their order across the pieces."""
    engine = Qwen3EngineStandIn(byte_level_tokenizer())
    prompt = "a (red:1.3) cat on a sofa"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    assert [w.text for w in words] == ["a", "red", "cat", "on", "a", "sofa"]
    assert _spelled(engine, prompt, positions) == [w.text for w in words]
    assert positions[1][0] < positions[2][0]
    ids = engine.tokenize_line(prompt)[0].tokens
    assert ids.count(engine.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 6  # three pieces


NEO_DIR = os.environ.get("ACCDIFFUSION_NEO_DIR")
NEO_TOKENIZERS = {  # the folder Neo's engine loads its tokenizer from, and its template
    "zimage": ("Tongyi-MAI/Z-Image-Turbo/tokenizer", neo_standins.ZIMAGE_TEMPLATE),
    "klein": ("black-forest-labs/FLUX.2-klein-4B/tokenizer",
              "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "lumina": ("neta-art/Neta-Lumina/tokenizer", None),  # Gemma-2, SentencePiece; the system prompt before the line
}


@pytest.mark.skipif(not NEO_DIR, reason="ACCDIFFUSION_NEO_DIR (a Forge Neo checkout) is not set")
@pytest.mark.parametrize("family", sorted(NEO_TOKENIZERS))
def test_words_on_neos_real_tokenizers(family):
    from transformers import AutoTokenizer

    folder, template = NEO_TOKENIZERS[family]
    path = Path(NEO_DIR) / "backend" / "huggingface" / folder
    if not path.exists():
        pytest.skip(f"{path} not in this Neo")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if template is None:
        engine = neo_standins.GemmaEngineStandIn.__new__(neo_standins.GemmaEngineStandIn)
        engine.tokenizer, engine.id_start = tokenizer, 2  # gemma_engine.py:30
    else:
        engine = Qwen3EngineStandIn.__new__(Qwen3EngineStandIn)
        engine.tokenizer, engine.llama_template = tokenizer, template
    prompt = "a user at a (red-haired:1.2) desk, Übergrößen Kätzchen 猫 on a café sofa"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    line = engine.process_template(prompt, False) if template is None else prompt
    assert _spelled(engine, line, positions) == [w.text for w in words]


# --- maps from NextDiT's joint attention ---------------------------------------------------------------
def _attention_spy(monkeypatch, text_len):
    seen = []
    original = dit_standins.joint_attention

    def spy(q, k, v):
        if q.shape[2] > text_len():  # a main layer: [caption; image]
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)[:, :, text_len():, :text_len()]
            seen.append(probs.mean(1))
        return original(q, k, v)

    monkeypatch.setattr(dit_standins, "joint_attention", spy)
    return seen


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])  # the image padded with x_pad_token (15 tokens, multiple 8)
def test_nextdit_maps_are_the_text_share_the_layers_compute(monkeypatch, zimage, grid):
    transformer = zimage.transformer
    assert joint_family(transformer) == "nextdit"
    context = zimage.encode(PROMPT)[None].repeat(2, 1, 1)
    padded = context.shape[1] + (-context.shape[1] % transformer.pad_tokens_multiple)
    assert padded != context.shape[1]  # the caption pad tokens are part of the text share
    x = torch.randn(2, 16, grid[0] * 2, grid[1] * 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.6, 0.6])
    plain = transformer(x, t, context=context)
    seen = _attention_spy(monkeypatch, lambda: padded)
    recorder = AttentionRecorder((grid[0] * 2, grid[1] * 2), 2, downsample=2)  # latent size, patch 2
    blocks = recorded_blocks(transformer)
    with JointAttentionCapture(transformer, recorder, [None, 1]):
        recorded = transformer(x, t, context=context)
    assert torch.equal(plain, recorded)
    assert blocks == [transformer.layers[-1]]  # the last quarter of 4 layers; the refiners never
    image = grid[0] * grid[1]
    expected = seen[-1][1, :image].T.reshape(-1, *grid)
    assert recorder.maps(0) is None
    assert torch.allclose(recorder.maps(1), expected, atol=1e-5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in transformer.modules())


# --- the job on Z-Image --------------------------------------------------------------------------------
def test_zimage_and_lumina_are_served_and_a_nextdit_without_a_known_engine_steps_aside(zimage):
    p = DiTTxt2ImgStandIn(zimage, DiTWebUIStandIn(), [PROMPT])
    backend = facade.backend_for(p)
    assert backend.unsupported_reason(p) is None
    lumina = ZImageEngineStandIn(engine=neo_standins.GemmaEngineStandIn)
    assert backend.unsupported_reason(DiTTxt2ImgStandIn(lumina, DiTWebUIStandIn(), [PROMPT])) is None
    unknown = ZImageEngineStandIn()
    unknown.text_processing_engine_gemma.llama_template = None  # an engine we cannot read words from
    reason = backend.unsupported_reason(DiTTxt2ImgStandIn(unknown, DiTWebUIStandIn(), [PROMPT]))
    assert reason and "ZImageEngineStandIn models are not supported yet" in reason


def test_lumina_words_are_found_after_its_system_prompt():
    """The system prompt (Neo's option, put before the line in the engine's __call__) has words of
    the prompt in it ("images", "alignment", "an"): they never count; a prompt with its own
    <Prompt Start> is the user's whole."""
    engine = neo_standins.GemmaEngineStandIn(byte_level_tokenizer())
    prompt = "an (anime:1.2) girl with images of alignment"
    words = split_words(prompt)
    positions = word_positions(engine, words, prompt)
    line = engine.process_template(prompt, False)
    assert _spelled(engine, line, positions) == [w.text for w in words]
    system_end = len(engine.tokenize_line(engine.system)[0].tokens)
    assert min(min(found) for found in positions) >= system_end - 1
    assert engine([prompt])[0].shape[0] == len(engine.tokenize_line(line)[0].tokens)  # what the model sees
    own = "my own system <Prompt Start> a cat"
    found = word_positions(engine, split_words(own), own)
    assert _spelled(engine, own, found) == [w.text for w in split_words(own)]


def test_lumina_hires_routes_each_windows_tile_prompt(stage_prompts):
    lumina = ZImageEngineStandIn(engine=neo_standins.GemmaEngineStandIn)
    p, _, out = run(lumina, settings=AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=16),
                    hr_scale=2.0)
    assert [im.shape for im in out.images] == [(3, 128, 128)]
    (stage, windows, prompts), = stage_prompts
    assert any(prompt != PROMPT for prompt in prompts[0])  # the maps reached the tile prompts
    # every tile prompt reached the model with the system prompt before it, as the host encodes it
    system_tokens = lumina.text_processing_engine_gemma.tokenize_line(neo_standins.LUMINA_SYSTEM)[0].tokens
    tiled = [c for c in lumina.transformer.calls if c["shape"][-2:] == (windows[0].height, windows[0].width)]
    encoded = {tuple(lumina.encode(prompt).flatten().tolist()) for prompt in prompts[0]}
    seen = {tuple(c["context"][r].flatten().tolist()) for c in tiled for r in range(c["context"].shape[0])}
    assert encoded <= seen and len(system_tokens) > 10


def test_zimage_hires_routes_each_windows_tile_prompt(zimage, stage_prompts, monkeypatch):
    starts = []
    original = job_module.StageDenoiser

    def made(*args, **kwargs):
        starts.append(len(zimage.transformer.calls))
        return original(*args, **kwargs)

    monkeypatch.setattr(job_module, "StageDenoiser", made)
    # one batch of windows, so the calls' order is the grouping's alone
    p, _, out = run(zimage, settings=AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=16),
                    hr_scale=2.0)
    assert [im.shape for im in out.images] == [(3, 128, 128)]
    (stage, windows, prompts), = stage_prompts
    assert any(prompt != PROMPT for prompt in prompts[0])  # the maps reached the tile prompts
    calls = zimage.transformer.calls[starts[0]:]
    rows = [(c["shape"][-2:], c["context"][r]) for c in calls for r in range(c["context"].shape[0])]
    # cfg 1: one row per window, the local branch first; prompts of different token counts run as
    # separate calls (no padding), in order of first appearance, each call in window order
    encoded = [zimage.encode(prompt) for prompt in prompts[0]]
    lengths = list(dict.fromkeys(e.shape[0] for e in encoded))
    order = sorted(range(len(windows)), key=lambda i: lengths.index(encoded[i].shape[0]))
    assert len(lengths) > 1  # the case Neo's Qwen3 conditioning makes: no fixed length
    for (shape, context), i in zip(rows[:len(windows)], order):
        assert shape == (windows[i].height, windows[i].width)
        assert torch.equal(context, encoded[i]), (i, prompts[0][i])
    assert zimage.forge_objects.unet.model_options.get("model_function_wrapper") is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in zimage.transformer.modules())


def test_batch_seeded_by_its_first_image_says_so(zimage):
    p, _, out = run(zimage, settings=AccDiffusionSettings(enabled=True), prompts=[PROMPT, PROMPT], hr_scale=2.0)
    assert len(out.images) == 2
    assert [c for c in p.comments if "first seed" in c] == [
        f"AccDiffusion: the window offsets and shuffles of this batch came from its first seed ({p.seeds[0]}); "
        "to remake a later image, run the whole batch again."]
    p, _, _ = run(zimage, settings=AccDiffusionSettings(enabled=True), hr_scale=2.0)
    assert not any("first seed" in c for c in p.comments)


def test_zimage_first_pass_bit_identical_and_disabled_is_not_installed(zimage):
    p, _, _ = run(zimage)
    q, _, plain = run(zimage, settings=None)
    assert torch.equal(p.first_pass_latent, q.first_pass_latent)
    _, _, off = run(zimage, settings=AccDiffusionSettings(enabled=False))
    assert all(torch.equal(a, b) for a, b in zip(plain.images, off.images))


# --- Flux.2 Klein ---------------------------------------------------------------------------------------
@pytest.fixture
def klein(monkeypatch):
    """Klein with Neo's ``backend.args.dynamic_args`` (the reference latents' holder) in the host."""
    import sys
    import types

    model = neo_standins.KleinEngineStandIn()
    monkeypatch.setitem(sys.modules, "backend.args", types.SimpleNamespace(dynamic_args=model.transformer.references))
    facade.host_backends.cache_clear()
    yield model
    facade.host_backends.cache_clear()


def run_klein(model, settings=ON, **kw):
    model.transformer.calls.clear()
    webui = neo_standins.KleinWebUIStandIn()
    p = neo_standins.KleinTxt2ImgStandIn(model, webui, kw.pop("prompts", [PROMPT]), **kw)
    return p, webui, process_images(p, settings, facade)


def test_klein_is_served_on_its_own_grid_and_never_on_flux1s_assumptions(klein):
    p = neo_standins.KleinTxt2ImgStandIn(klein, neo_standins.KleinWebUIStandIn(), [PROMPT])
    assert facade.backend_for(p).unsupported_reason(p) is None
    # a Flux.2 transformer whose text engine we cannot read words from: stepping aside, not Flux.1's rules
    klein.text_processing_engine_gemma.llama_template = None
    try:
        reason = facade.backend_for(p).unsupported_reason(p)
    finally:
        klein.text_processing_engine_gemma.llama_template = neo_standins.KLEIN_TEMPLATE
    assert reason and "not supported" in reason


def test_klein_words_are_found_inside_its_template(klein):
    engine = klein.text_processing_engine_gemma
    words = split_words(PROMPT)
    positions = word_positions(engine, words, PROMPT)
    assert _spelled(engine, PROMPT, positions) == [w.text for w in words]
    ids = engine.tokenize_line(PROMPT)[0].tokens
    template_end = len(engine.tokenizer([neo_standins.KLEIN_TEMPLATE.split("{}")[0]])["input_ids"][0])
    assert min(i for found in positions for i in found) >= template_end  # no template token is a word's
    assert max(i for found in positions for i in found) < len(ids) - 5


def test_klein_hires_windows_on_the_patch_1_grid_with_16_pixels_per_latent(klein, stage_prompts):
    p, _, out = run_klein(klein, settings=AccDiffusionSettings(enabled=True, window_mode="overlap", tile_batch_size=16),
                          width=64, height=64, hr_scale=2.0)
    assert [im.shape for im in out.images] == [(3, 128, 128)]
    (stage, windows, prompts), = stage_prompts
    assert stage.size == (8, 8)  # 128 px / 16, not / 8
    first = klein.transformer.calls[0]
    assert first["shape"][-2:] == (4, 4) and first["tokens"] == 16  # patch 1: a token per latent pixel
    tiled = [c for c in klein.transformer.calls if c["shape"][-2:] == (windows[0].height, windows[0].width)]
    assert tiled and all(c["tokens"] == c["shape"][-2] * c["shape"][-1] for c in tiled)
    assert any(prompt != PROMPT for prompt in prompts[0])


def test_klein_reference_image_stays_out_of_the_tiled_calls(klein):
    reference = torch.randn(1, 128, 4, 4)
    klein.transformer.references.ref_latents = [reference]
    try:
        p, _, out = run_klein(klein, width=64, height=64, hr_scale=2.0)
        kept = list(klein.transformer.references.ref_latents)
    finally:
        klein.transformer.references.ref_latents = []
    assert kept == [reference]  # the host's own reference is back after the job
    calls = klein.transformer.calls
    first_pass = len(calls) - len([c for c in calls if c["tokens"] != 16 + 16])
    # the first pass is the host's, reference included; every call of ours after it is the window's alone
    assert 0 < first_pass < len(calls) and all(c["tokens"] == 16 + 16 for c in calls[:first_pass])
    assert all(c["tokens"] == c["shape"][-2] * c["shape"][-1] for c in calls[first_pass:])
    assert any("without the model's reference image" in comment for comment in p.comments)
    # the first pass's maps were read past the reference's tokens, so the tiles got their own prompts
    assert "no attention maps" not in " ".join(p.comments)


def test_template_spans_of_bare_and_one_sided_templates_end():
    from accdiffusion.method.words import template_spans

    assert template_spans(b"a cat", "{}") == [(0, 5)]
    assert template_spans(b"a cat<e>a dog<e>", "{}<e>") == [(0, 5), (8, 13)]
    assert template_spans(b"<s>a cat<s>a dog", "<s>{}") == [(3, 8), (11, 16)]
