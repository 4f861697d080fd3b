import torch

from accdiffusion.hires import plan_stages, stage_windows
from accdiffusion.prompts import (ImagePromptPlan, open_masks, threshold_masks)
from accdiffusion.settings import AccDiffusionSettings
from accdiffusion.words import align_words, compose_prompt, match_words, split_words


def texts(prompt):
    return [w.text for w in split_words(prompt)]


def test_split_words_skips_prompt_syntax():
    assert texts("a (red:1.3) car, [blue|green] sky BREAK a ((cat)) AND <lora:x:0.8> dog") == [
        "a", "red", "car", "blue", "green", "sky", "a", "cat", "dog"]
    assert texts("[winter:summer:0.4] forest") == ["winter", "summer", "forest"]
    assert texts("red-haired woman's hat") == ["red-haired", "woman's", "hat"]


def test_compose_keeps_order_and_syntax_and_tidies():
    prompt = "a photo of a (red:1.3) car, [blue] sky, masterpiece"
    words = split_words(prompt)
    keep = lambda *kept: [w.text in kept for w in words]
    assert compose_prompt(prompt, words, keep("red", "car", "sky")) == "(red:1.3) car, sky"
    assert compose_prompt(prompt, words, keep("car", "blue")) == "car, [blue]"
    assert compose_prompt(prompt, words, [True] * len(words)) == prompt
    assert compose_prompt(prompt, words, [False] * len(words)) == ""
    p2 = "a cat BREAK a dog"
    assert compose_prompt(p2, split_words(p2), [False, True, False, True]) == "cat BREAK dog"


def test_align_words_merges_sub_word_tokens(sd1_host):
    prompt = "a red-haired astronaut riding a horse"
    words = split_words(prompt)
    positions = align_words(words, sd1_host.context_ids(prompt), sd1_host.special_ids, sd1_host.tokenize)
    assert positions[0] == [1]
    assert positions[1] == [2, 3, 4]  # red, -, haired
    assert positions[2] == [5]
    assert positions[-1] == [8]


def test_align_words_across_chunks_of_a_long_prompt(sd1_host):
    words_text = [f"word{i}" for i in range(40)]  # each 'wordN' is 2+ tokens: > 75 tokens total
    prompt = " ".join(words_text)
    ids = sd1_host.context_ids(prompt)
    assert len(ids) >= 154
    positions = align_words(split_words(prompt), ids, sd1_host.special_ids, sd1_host.tokenize)
    assert all(positions)
    flat = [p for ps in positions for p in ps]
    assert flat == sorted(flat) and 76 not in flat and 77 not in flat  # EOS/BOS skipped
    assert max(flat) > 77


def test_opening_removes_specks_and_keeps_regions():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 4:20, 4:20] = True  # a region
    mask[0, 28, 28] = True  # a speck
    mask[0, 25:27, 2:4] = True  # a 2x2 speck
    opened = open_masks(mask)
    assert not opened[0, 28, 28] and not opened[0, 25:27, 2:4].any()
    assert torch.equal(opened[0, 4:20, 4:20], mask[0, 4:20, 4:20])
    assert int(opened.sum()) == 16 * 16


def test_threshold_is_strictly_above_the_mean():
    maps = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])
    assert threshold_masks(maps).tolist() == [[[False, False], [False, True]]]
    assert not threshold_masks(torch.ones(1, 4, 4)).any()


def plant(host, prompt, grid, regions):
    """Token maps where each word in ``regions`` attends to its (rows, cols) region and every
    other token attends uniformly."""
    ids = host.context_ids(prompt)
    words = split_words(prompt)
    positions = align_words(words, ids, host.special_ids, host.tokenize)
    maps = torch.ones(len(ids), *grid)
    for word, pos in zip(words, positions):
        if word.text in regions:
            rows, cols = regions[word.text]
            for p in pos:
                maps[p] = 0.1
                maps[p, rows, cols] = 5.0
    return words, positions, maps


def tile_words(host, prompt, base, target, regions, grid, threshold=0.3):
    words, positions, maps = plant(host, prompt, grid, regions)
    plan = ImagePromptPlan.build(words, positions, maps, prompt, words)
    stage = plan_stages(base, target)[-1]
    windows = stage_windows(stage, base, AccDiffusionSettings())
    return windows, plan.tile_prompts(stage.size, windows, threshold)


def test_planted_maps_square_2x(sd1_host):
    prompt = "a cat and a dog on grass"
    regions = {"cat": (slice(0, 16), slice(0, 8)),  # left half
               "dog": (slice(0, 16), slice(8, 16)),  # right half
               "grass": (slice(0, 16), slice(0, 16))}  # everywhere: never above its mean
    windows, prompts = tile_words(sd1_host, prompt, (64, 64), (128, 128), regions, (16, 16))
    assert len(windows) == 9
    by_col = {w.left: p for w, p in zip(windows, prompts)}
    assert by_col[0] == "cat"  # cat fills the left window's first half
    assert by_col[32] == "cat dog"  # middle window, cols 32..96: half cat, half dog
    assert by_col[64] == "dog"


def test_planted_maps_non_square_3x_with_multi_token_words(sd1_host):
    prompt = "a red-haired astronaut beside a wooden lighthouse"
    regions = {"red-haired": (slice(0, 5), slice(0, 16)),  # top half
               "lighthouse": (slice(5, 10), slice(0, 16))}  # bottom half
    base, grid = (40, 64), (10, 16)
    windows, prompts = tile_words(sd1_host, prompt, base, (120, 192), regions, grid)
    assert len(windows) == 25  # (2·3 − 1)² at the 3× stage
    for w, p in zip(windows, prompts):
        if w.top + w.height <= 60:
            assert p == "red-haired", (w, p)
        elif w.top >= 60:
            assert p == "lighthouse", (w, p)
        else:
            assert p == "red-haired lighthouse", (w, p)


def test_planted_maps_150_token_prompt(sd1_host):
    filler = " ".join(f"thing{i}" for i in range(45))
    prompt = f"{filler} castle {filler} dragon"
    ids = sd1_host.context_ids(prompt)
    assert len(ids) >= 3 * 77  # three chunks
    regions = {"castle": (slice(0, 8), slice(0, 8)), "dragon": (slice(8, 16), slice(8, 16))}
    windows, prompts = tile_words(sd1_host, prompt, (64, 64), (128, 128), regions, (16, 16))
    top_left = prompts[[i for i, w in enumerate(windows) if (w.top, w.left) == (0, 0)][0]]
    bottom_right = prompts[[i for i, w in enumerate(windows) if (w.top, w.left) == (64, 64)][0]]
    assert top_left == "castle" and bottom_right == "dragon"


def test_emphasis_survives_and_unmapped_words_stay_everywhere(sd1_host):
    prompt = "a (cat:1.3) and a dog"
    regions = {"cat": (slice(0, 16), slice(0, 6)), "dog": (slice(0, 16), slice(10, 16))}
    words, positions, maps = plant(sd1_host, prompt, (16, 16), regions)
    hires_prompt = "a (cat:1.3) and a dog, detailed"
    plan = ImagePromptPlan.build(words, positions, maps, hires_prompt, split_words(hires_prompt))
    stage = plan_stages((64, 64), (128, 128))[0]
    windows = stage_windows(stage, (64, 64), AccDiffusionSettings())
    prompts = plan.tile_prompts(stage.size, windows, 0.3)
    assert prompts[0] == "(cat:1.3), detailed"
    assert prompts[2] == "dog, detailed"


def test_match_words_case_insensitive_in_order():
    a, b = split_words("A cat, a Dog"), split_words("a dog and a cat")
    assert match_words(b, a) == [0, 3, None, 2, 1]


def test_threshold_changes_the_tile_words(sd1_host):
    prompt = "a cat"
    regions = {"cat": (slice(0, 16), slice(0, 5))}  # ~31% of the map's width
    _, loose = tile_words(sd1_host, prompt, (64, 64), (128, 128), regions, (16, 16), threshold=0.1)
    _, strict = tile_words(sd1_host, prompt, (64, 64), (128, 128), regions, (16, 16), threshold=0.7)
    assert loose.count("cat") > strict.count("cat")


def test_small_maps_are_not_opened():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 2, 2] = True
    assert torch.equal(open_masks(mask), mask)
