import torch

from accdiffusion.method.hires import plan_stages, stage_windows
from planted_maps import plant
from accdiffusion.method.prompts import (ImagePromptPlan, WordMasks, build_word_masks, open_masks,
                                         threshold_masks, tile_keep)
from accdiffusion.method.tiles import Window
from accdiffusion.method.settings import AccDiffusionSettings
from accdiffusion.method.words import align_words, compose_prompt, match_words, split_words


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


def tile_words(host, prompt, base, target, regions, grid, threshold=0.3):
    words, positions, maps = plant(host, prompt, regions, grid)
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
    words, positions, maps = plant(sd1_host, prompt, regions)
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


def only(prompt, *kept):
    words = split_words(prompt)
    return compose_prompt(prompt, words, [w.text in kept for w in words])


def test_dropped_words_leave_no_stray_break():
    # a leading, trailing or doubled BREAK would add a chunk of padding only
    assert only("a castle BREAK a dragon", "dragon") == "dragon"
    assert only("a castle BREAK a dragon", "castle") == "castle"
    assert only("cat BREAK sky BREAK dog", "cat", "dog") == "cat BREAK dog"
    assert only("cat BREAK sky BREAK dog", "sky") == "sky"
    assert only("cat, BREAK sky, dog", "cat", "dog") == "cat BREAK dog"
    assert only("cat BREAK sky BREAK dog", "cat", "sky", "dog") == "cat BREAK sky BREAK dog"
    # a BREAK inside a group: the group's brackets stay balanced
    assert only("(cat BREAK dog:1.2), sun", "dog", "sun") == "(dog:1.2), sun"


def test_dropped_words_leave_no_empty_group_or_comma_run():
    assert only("a (dragon:1.2), castle", "castle") == "castle"
    assert only("a (red, blue) car", "car") == "car"
    assert only("castle, [(dragon:1.2)], ((wings)), sky", "castle", "sky") == "castle, sky"
    assert only("a [red:blue:0.5] car, ( sky : 1.3 )", "car") == "car"
    assert only("cat, sky, sun, moon, dog", "cat", "dog") == "cat, dog"
    assert only("(red, blue, green:1.2) car", "red", "green", "car") == "(red, green:1.2) car"
    assert only("(red, blue:1.2) car", "blue", "car") == "(blue:1.2) car"
    assert only("(cat, dog,) sun", "cat", "sun") == "(cat) sun"
    # a number on its own is a word, not an empty group
    assert only("[3] cats and dogs", "3", "dogs") == "[3] dogs"


def test_repeated_word_takes_its_own_occurrences_tokens(sd1_host):
    tokenize = sd1_host.tokenize
    for prompt, second_red in (("a red car and a red house", 6), ("a red car BREAK a red house", 77 + 2)):
        words = split_words(prompt)
        ids = sd1_host.context_ids(prompt)
        positions = align_words(words, ids, sd1_host.special_ids, tokenize)
        assert [w.text for w in words].count("red") == 2
        first, second = [positions[i] for i, w in enumerate(words) if w.text == "red"]
        assert first == [2] and second == [second_red]
        assert [ids[p] for p in second] == tokenize("red")
        # and the word after each takes the position after it
        assert positions[2] == [3] and positions[-1] == [second_red + 1]


def test_repeated_word_gets_its_own_occurrences_map(sd1_host):
    # the first "red" attends left, the second right: each tile keeps the red that is there
    prompt = "a red car and a red house"
    words = split_words(prompt)
    positions = align_words(words, sd1_host.context_ids(prompt), sd1_host.special_ids, sd1_host.tokenize)
    maps = torch.ones(77, 16, 16)
    for i, region in ((1, slice(0, 8)), (2, slice(0, 8)), (5, slice(8, 16)), (6, slice(8, 16))):
        for p in positions[i]:  # red₁, car on the left; red₂, house on the right
            maps[p] = 0.1
            maps[p, :, region] = 5.0
    plan = ImagePromptPlan.build(words, positions, maps, prompt, words)
    left, right = Window(0, 0, 16, 8), Window(0, 8, 16, 8)
    keep = tile_keep(plan.masks, (16, 16), [left, right], 0.3)
    assert [w.text for w, k in zip(words, keep[0]) if k] == ["red", "car"]
    assert [i for i, k in enumerate(keep[0]) if k] == [1, 2]
    assert [i for i, k in enumerate(keep[1]) if k] == [5, 6]


def test_word_masks_are_opened_before_the_share_test():
    # a 16-row map: the opening runs once and removes a one-pixel speck of the word's mask
    maps = torch.full((2, 16, 16), 0.1)
    maps[0, :, :8] = 5.0  # a region on the left
    maps[0, 12, 13] = 5.0  # a speck on the right
    masks = build_word_masks(maps, [[0], [1]])
    assert masks.masks[0, 12, 13].item() is False
    assert bool(masks.masks[0, :, :7].all())
    speck, region = Window(12, 13, 1, 1), Window(0, 0, 8, 8)
    keep = tile_keep(masks, (16, 16), [speck, region], 0.3)
    assert keep[:, 0].tolist() == [False, True]


def test_a_share_of_exactly_c_is_left_out():
    # Eq. 8 is strict: a word covering exactly c of a tile stays out, a pixel more brings it in
    mask = torch.zeros(2, 10, 10, dtype=torch.bool)
    mask[0, :, :3] = True  # 30 of 100 pixels
    mask[1, :, :3] = True
    mask[1, 0, 3] = True  # 31 of 100
    masks = WordMasks(mask, torch.ones(2, dtype=torch.bool))
    keep = tile_keep(masks, (10, 10), [Window(0, 0, 10, 10)], 0.3)
    assert keep.tolist() == [[False, True]]
    keep = tile_keep(masks, (10, 10), [Window(0, 0, 10, 10)], 0.25)
    assert keep.tolist() == [[True, True]]
