"""The flow-llm toy (single-stream, chat-template causal text encoder; docs/toy-flow.md "Single-stream
with an LLM template"): words are found inside the template by the product's LLM path and the
template's tokens never stand for a word, the model's output does not depend on the captions it
is batched with, and the model runs through the toy's evaluation path. CPU, one thread, the
committed weights."""

from __future__ import annotations

import math

import pytest
import torch

from accdiffusion.method.words import split_words

torch.set_num_threads(1)

# "user" and "assistant" are template words too; "a" is inside "<|im_start|>"'s text ("start")
TRICKY = "a user and an assistant, a (red:1.2) disk"


@pytest.fixture(scope="module")
def llm_host():
    from accdiffusion.lab.toy.llm import load_llm_host

    return load_llm_host()


def caption_span(host, prompt: str) -> range:
    """Context positions of the caption: after the template's prefix, before its suffix."""
    from accdiffusion.lab.toy.llm import TEMPLATE

    before, after = (len(host.tokenizer.encode(part)) for part in TEMPLATE.split("{}"))
    return range(before, len(host.context_ids(prompt)) - after)


@pytest.mark.parametrize("prompt", ["a red disk, a blue square and a green triangle", TRICKY, "square"])
def test_words_are_found_inside_the_template_and_only_there(llm_host, prompt):
    words = split_words(prompt)
    positions = llm_host.word_positions(words, prompt)
    ids = llm_host.context_ids(prompt)
    span = caption_span(llm_host, prompt)
    assert all(positions), positions  # every word found
    for word, found in zip(words, positions):
        assert all(p in span for p in found), (word.text, found, span)
        spelled = "".join(llm_host.tokenizer.convert_ids_to_tokens([ids[p] for p in found]))
        assert spelled.lstrip("\u0120") == word.text, (word.text, spelled)


def test_template_tokens_never_reach_the_word_maps(llm_host):
    """The first pass's recorded maps with every template row (and the padding rows) set to NaN:
    the word maps, the Eq. 5 masks and the tile-prompt plan of the hires pass stay finite, so they
    read caption rows only."""
    from accdiffusion.lab.toy.evaluate import raw_word_maps, word_masks
    from accdiffusion.lab.toy.sample import flow_first_pass
    from accdiffusion.method.prompts import ImagePromptPlan

    prompts = [TRICKY, "a green triangle"]
    _, recorder = flow_first_pass(llm_host, prompts, seed=0, steps=2)
    for i, prompt in enumerate(prompts):
        maps = recorder.maps(i).clone()
        assert maps.shape[0] == llm_host.text_tokens
        span = caption_span(llm_host, prompt)
        outside = [t for t in range(maps.shape[0]) if t not in span]
        assert maps[list(span)].sum() > 0  # the caption's rows were recorded
        maps[outside] = math.nan
        for word_map in sum(raw_word_maps(llm_host, prompt, maps).values(), []):
            assert torch.isfinite(word_map).all()
        assert all(m.dtype == torch.bool for m in sum(word_masks(llm_host, prompt, maps).values(), []))
        words = split_words(prompt)
        positions = llm_host.word_positions(words, prompt)
        plan = ImagePromptPlan.build(words, positions, maps, prompt, words)
        clean = ImagePromptPlan.build(words, positions, recorder.maps(i), prompt, words)
        assert torch.equal(plan.masks.masks, clean.masks.masks)


def test_recorder_gives_pad_keys_no_probability(llm_host):
    """Captions of different lengths in one batch: the shorter one's pad columns stay 0 and its
    map equals the map recorded with that caption alone (the pad keys are masked, not attended)."""
    from accdiffusion.lab.toy.sample import flow_first_pass

    short, long = "a red disk", "a red disk, a blue square and a green triangle"
    _, both = flow_first_pass(llm_host, [short, long], seed=1, steps=2)
    _, alone = flow_first_pass(llm_host, [short], seed=1, steps=2)
    n = len(llm_host.context_ids(short))
    assert both.maps(0)[n:].abs().max() == 0
    # not bit-equal: the batch's second row changes the shapes of the matrix products
    assert torch.allclose(both.maps(0), alone.maps(0), atol=1e-4)


def test_velocity_of_a_row_does_not_depend_on_the_captions_beside_it(llm_host):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    one = llm_host.encode(["a red disk"])
    two = llm_host.encode(["a red disk", "a yellow square, a blue disk and a green triangle"])
    alone = llm_host.velocity(x, sigma, one)
    batched = llm_host.velocity(torch.cat([x, x]), sigma, two)[:1]
    assert torch.allclose(alone, batched, atol=1e-4)


def test_flow_llm_round_trips_through_the_eval_path(llm_host, tmp_path):
    """Two scenes, first pass, plain tiling and the defaults at 2×: the report and its table."""
    from accdiffusion.lab.toy.evaluate import FLOW_CONFIGS, duplicates_table, kind_of, run_eval

    report = run_eval(scenes=2, out=tmp_path / "eval.json", host=llm_host, kind=kind_of("flow-llm"),
                      configs=FLOW_CONFIGS, scales=(2,), details=True, verbose=False)
    assert report["model"] == "flow-llm"
    for name in FLOW_CONFIGS:
        row = report["configs"][name]["2x"]
        assert row["duplicates_per_scene"] >= 0 and row["lost_per_scene"] >= 0
    # the defaults' tile prompts are built from the recorded maps: never longer than the caption
    assert (report["configs"]["AccDiffusion defaults"]["2x"]["words_per_tile_prompt"]
            <= report["configs"]["plain tiling"]["2x"]["words_per_tile_prompt"])
    assert "extra objects per scene" in duplicates_table(report)
    assert (tmp_path / "eval.pt").exists()
