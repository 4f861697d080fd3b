"""Phrases as the unit of a tile prompt (``prompt_units``): where a prompt splits into phrases, that
a phrase's words are kept or dropped together by one mask (its last located word's), and that
emphasis, BREAK, prompt editing, extra-network tags and long prompts come through intact.

Maps are planted by hand (a word attends to its region, every other token uniformly), so the
routing is exact: the tiny random models could not show it."""

import pytest
import torch

from accdiffusion.method.hires import plan_stages, stage_windows
from planted_maps import plant
from accdiffusion.method.prompts import PHRASE_MASK, ImagePromptPlan, PhraseRules, build_word_masks, unit_masks
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.tileprompts import StageTilePrompts
from accdiffusion.method.tiles import Window
from accdiffusion.method.words import CONNECTIVES, PromptUnits, phrase_units, prompt_units, split_words

ALL = slice(0, 16)


def phrases(prompt, connectives=CONNECTIVES):
    words = split_words(prompt)
    units = phrase_units(prompt, words, connectives)
    return ([[words[i].text for i in members] for members in units.members],
            [(words[w].text, u) for w, u in units.joiners])


def plan_of(host, prompt, regions, units, hires_prompt=None, rules=PhraseRules(), grid=(16, 16)):
    words, positions, maps = plant(host, prompt, regions, grid)
    hires_prompt = hires_prompt or prompt
    return ImagePromptPlan.build(words, positions, maps, hires_prompt, split_words(hires_prompt),
                                 units=units, rules=rules)


STAGE = plan_stages((64, 64), (128, 128))[-1]
WINDOWS = stage_windows(STAGE, (64, 64), AccDiffusionSettings())  # 3×3, 64 px, stride 32


def by_column(plan):
    """Tile prompts of the 2× stage's top row of windows, left to right (the planted regions are
    columns, so every row is the same)."""
    prompts = dict(zip(WINDOWS, plan.tile_prompts(STAGE.size, WINDOWS, 0.3)))
    rows = {(w.top, w.left): p for w, p in prompts.items()}
    assert all(rows[(top, left)] == rows[(0, left)] for top, left in rows)
    return [rows[(0, left)] for left in (0, 32, 64)]


# "red" spread out over three quarters of the image (an adjective's map), "hair" on the left,
# "blue" over the right three quarters, "eyes" on the right: a tag-list prompt
TAGS = "1girl, red hair, blue eyes, night sky"
TAG_REGIONS = {"red": (ALL, slice(0, 12)), "hair": (ALL, slice(0, 4)),
               "blue": (ALL, slice(4, 16)), "eyes": (ALL, slice(12, 16))}


# --- where phrases split ----------------------------------------------------------------------------
def test_phrases_split_at_the_chosen_separators():
    assert phrases(TAGS) == ([["1girl"], ["red", "hair"], ["blue", "eyes"], ["night", "sky"]], [])
    assert phrases("red hair; blue eyes. night sky\nsmile BREAK cat AND dog")[0] == [
        ["red", "hair;"], ["blue", "eyes."], ["night", "sky"], ["smile"], ["cat"], ["dog"]]
    # sentence prompts: "and" / "with" end a phrase and join the phrases around them
    assert phrases("a green disk, a blue disk and a red triangle") == (
        [["a", "green", "disk"], ["a", "blue", "disk"], ["a", "red", "triangle"]], [("and", 2)])
    assert phrases("a girl with red hair") == ([["a", "girl"], ["red", "hair"]], [("with", 1)])
    assert phrases("a cat AND a dog") == ([["a", "cat"], ["a", "dog"]], [])  # AND: syntax, not a word
    assert phrases("a Cat And a dog")[1] == [("And", 1)]  # connectives in any case
    # no split at spaces, weights, steps, alternation or numbers
    assert phrases("(red hair:1.2) [blue|green] eyes")[0] == [["red", "hair", "blue", "green", "eyes"]]
    assert phrases("[a red cat:a blue dog:0.5] on a sofa")[0] == [
        ["a", "red", "cat", "a", "blue", "dog", "on", "a", "sofa"]]
    assert phrases("(cat:1.2). dog")[0] == [["cat"], ["dog"]]
    # a connective with no phrase on one side belongs to the other: nothing is lost when all is kept
    assert phrases("with red hair") == ([["with", "red", "hair"]], [])
    assert phrases("cat and") == ([["cat", "and"]], [])
    # separators as chosen: without connectives a sentence is one phrase up to its commas
    assert phrases("a green disk, a blue disk and a red triangle", connectives=())[0] == [
        ["a", "green", "disk"], ["a", "blue", "disk", "and", "a", "red", "triangle"]]


def test_word_units_are_the_papers():
    words = split_words(TAGS)
    assert prompt_units(TAGS, words, "words") == PromptUnits.each_word(len(words))
    assert prompt_units(TAGS, words, "phrases") == phrase_units(TAGS, words)
    with pytest.raises(ValueError, match="phrases"):
        prompt_units(TAGS, words, "sentences")


# --- kept or dropped together -----------------------------------------------------------------------
def test_phrase_words_are_kept_or_dropped_together(sd1_host):
    # per word, "red" (spread out) goes into tiles without hair and "blue" into tiles without eyes;
    # per phrase each stays with its noun
    assert by_column(plan_of(sd1_host, TAGS, TAG_REGIONS, "words")) == [
        "red hair, blue", "red, blue", "red, blue eyes"]
    plan = plan_of(sd1_host, TAGS, TAG_REGIONS, "phrases")
    assert by_column(plan) == ["red hair", "", "blue eyes"]
    keep = plan.keep(STAGE.size, WINDOWS, 0.3)
    for members in plan.units.members:
        column = keep[:, list(members)]
        assert bool((column.all(1) | ~column.any(1)).all()), members  # all or none, every window


def test_a_connective_is_kept_only_between_kept_phrases(sd1_host):
    regions = {"girl": (ALL, slice(0, 8)), "hair": (ALL, slice(8, 16))}
    plan = plan_of(sd1_host, "a girl with red hair", regions, "phrases")
    assert by_column(plan) == ["a girl", "a girl with red hair", "red hair"]
    three = "a cat and a dog and a bird"
    units = phrase_units(three, split_words(three))
    keep = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    texts = [[w.text for w, k in zip(split_words(three), row) if k] for row in units.word_keep(keep)]
    assert texts == [["a", "cat", "and", "a", "bird"], ["a", "dog", "and", "a", "bird"],
                     ["a", "cat", "and", "a", "dog"]]


# --- the phrase's mask ----------------------------------------------------------------------------
def test_phrase_mask_is_its_last_located_words_mask(sd1_host):
    assert PHRASE_MASK == "last"
    words, positions, maps = plant(sd1_host, TAGS, TAG_REGIONS)
    word_masks = build_word_masks(maps, positions).masks
    index = {w.text: i for i, w in enumerate(words)}
    plan = ImagePromptPlan.build(words, positions, maps, TAGS, words, units="phrases")
    red_hair = plan.units.members.index((index["red"], index["hair"]))
    assert torch.equal(plan.masks.masks[red_hair], word_masks[index["hair"]])
    assert not torch.equal(plan.masks.masks[red_hair], word_masks[index["red"]] | word_masks[index["hair"]])
    # a word the first prompt did not have ("sparkling") goes with its phrase, whose mask stays the
    # located word's; a phrase with no located word at all ("masterpiece") is kept everywhere
    hires = "1girl, red hair sparkling, blue eyes, night sky, masterpiece"
    plan = ImagePromptPlan.build(words, positions, maps, hires, split_words(hires), units="phrases")
    assert by_column(plan) == ["red hair sparkling, masterpiece", "masterpiece", "blue eyes, masterpiece"]


def test_phrase_masks_of_each_kind():
    maps = torch.full((3, 8, 8), 0.1)
    maps[0, :, :6] = 5.0  # "red": wide
    maps[1, :, :2] = 5.0  # "hair": narrow
    maps[2] = float("nan")  # a word without a map
    units = PromptUnits(((0, 1, 2),), (), 3)
    last, union, mean = (unit_masks(maps, units, how).masks[0] for how in ("last", "union", "mean"))
    assert int(last.sum()) == 16 and bool(last[:, :2].all())  # hair's (the unplaced word is skipped)
    assert int(union.sum()) == 48  # red's ∪ hair's
    both = maps[:2].mean(0)  # the mean of the placed words' maps, then Eq. 5 (8 rows: no opening)
    assert torch.equal(mean, both > both.mean()) and int(mean.sum()) == 16
    with pytest.raises(ValueError, match="phrase mask"):
        unit_masks(maps, units, "max")


# --- syntax intact ----------------------------------------------------------------------------------
def test_emphasis_break_prompt_editing_and_extra_networks_stay_intact(sd1_host):
    prompt = "(red hair:1.3) BREAK [blue:green:0.5] eyes, <lora:detail:0.8> smile"
    regions = {"red": (ALL, slice(0, 12)), "hair": (ALL, slice(0, 4)), "blue": (ALL, slice(4, 16)),
               "green": (ALL, slice(4, 16)), "eyes": (ALL, slice(12, 16)), "smile": (slice(0, 4), ALL)}
    plan = plan_of(sd1_host, prompt, regions, "phrases")
    prompts = {(w.top, w.left): p for w, p in zip(WINDOWS, plan.tile_prompts(STAGE.size, WINDOWS, 0.3))}
    assert prompts[(0, 0)] == "(red hair:1.3) BREAK <lora:detail:0.8> smile"
    assert prompts[(0, 64)] == "[blue:green:0.5] eyes, <lora:detail:0.8> smile"
    assert prompts[(32, 0)] == "(red hair:1.3), <lora:detail:0.8>"
    assert prompts[(32, 64)] == "[blue:green:0.5] eyes, <lora:detail:0.8>"
    assert prompts[(32, 32)] == ""  # no word kept: the empty prompt, as with word units
    for text in prompts.values():
        assert ("red" in text) == ("(red hair:1.3)" in text)  # emphasis whole or absent
        assert ("blue" in text) == ("[blue:green:0.5] eyes" in text)  # the edit and its noun together
        assert not text.startswith("BREAK") and not text.endswith("BREAK") and "BREAK BREAK" not in text


def test_phrases_across_the_chunks_of_a_long_prompt(sd1_host):
    filler = ", ".join(f"thing{i}" for i in range(30))
    prompt = f"{filler}, red castle, {filler}, blue dragon"
    assert len(sd1_host.context_ids(prompt)) >= 2 * 77
    regions = {"red": (ALL, slice(0, 12)), "castle": (slice(0, 8), slice(0, 8)),  # "red" spread out
               "blue": (ALL, slice(4, 16)), "dragon": (slice(8, 16), slice(8, 16))}
    plan = plan_of(sd1_host, prompt, regions, "phrases")
    prompts = {(w.top, w.left): p for w, p in zip(WINDOWS, plan.tile_prompts(STAGE.size, WINDOWS, 0.3))}
    assert prompts[(0, 0)] == "red castle" and prompts[(64, 64)] == "blue dragon"
    assert prompts[(0, 64)] == "" and prompts[(64, 0)] == ""
    words = plan_of(sd1_host, prompt, regions, "words")
    assert "red" in dict(zip(WINDOWS, words.tile_prompts(STAGE.size, WINDOWS, 0.3)))[Window(0, 64, 64, 64)]


def test_moving_windows_get_the_same_phrase_prompts(sd1_host):
    """``window_mode`` shifted looks each window's prompt up per step (StageTilePrompts): the same
    prompts as the overlap path for any window."""
    plan = plan_of(sd1_host, TAGS, TAG_REGIONS, "phrases")
    lookup = StageTilePrompts(plan, STAGE.size, 0.3)
    windows = [Window(t, l, h, w) for t, l, h, w in
               ((0, 0, 64, 40), (0, 40, 64, 88), (10, 3, 50, 61), (0, 100, 128, 28), (0, 0, 128, 128))]
    assert [lookup(w) for w in windows] == plan.tile_prompts(STAGE.size, windows, 0.3)
    assert lookup(Window(0, 0, 64, 40)) == "red hair"
    assert lookup(Window(0, 100, 128, 28)) == "blue eyes"
