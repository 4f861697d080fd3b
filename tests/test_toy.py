"""The toy model trained on synthetic scenes (accdiffusion/toy): scenes, latent code, and what
the committed weights show about the method — word masks on their objects, fewer duplicates."""

import numpy as np
import pytest
import torch

from accdiffusion.toy.scenes import (COLOURS, LATENT, SHAPES, counts, decode, encode, make_scene,
                                     matches_caption, scene_latent)


def test_scene_generator_is_deterministic_and_seeds_differ():
    a, b, c = make_scene(7), make_scene(7), make_scene(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("seed", range(12))
def test_scene_masks_and_caption_describe_the_image(seed):
    scene = make_scene(seed)
    assert 1 <= len(scene.objects) == len(scene.masks) <= 3
    assert scene.masks.sum(0).max() <= 1  # objects do not overlap
    words = scene.caption.replace(",", " ").split()
    named = [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in COLOURS]
    assert named == [(o.colour, o.shape) for o in scene.objects]
    assert all(shape in SHAPES for _, shape in named)
    background = ~scene.masks.any(0)
    for obj, mask in zip(scene.objects, scene.masks):
        assert mask.sum() > 100  # a real object, not a speck
        inside = scene.image[mask].mean(0)
        assert np.abs(inside - np.asarray(COLOURS[obj.colour])).max() < 0.06
    # the background is grey: no channel differs much from the others
    spread = scene.image[background].max(1) - scene.image[background].min(1)
    assert spread.mean() < 0.05
    # the fixed latent code keeps the scene countable: one object per named colour
    assert matches_caption(scene_latent(scene), scene.caption)


def test_latent_code_decodes_to_the_patch_colours():
    image = torch.from_numpy(make_scene(3).image).permute(2, 0, 1)[None]
    latent = encode(image)
    assert latent.shape == (1, 4, LATENT, LATENT)
    pooled = torch.nn.functional.avg_pool2d(image, 8)
    decoded = decode(latent)
    assert decoded.shape == image.shape
    assert torch.allclose(decoded[..., ::8, ::8], pooled.clamp(0, 1), atol=1e-5)


def test_counting_sees_a_duplicate():
    scene = make_scene(5)
    latent = scene_latent(scene)
    wide = torch.cat([latent, latent], -1)  # the scene twice, side by side
    once, twice = counts(latent), counts(wide)
    assert all(twice[c] == 2 * once[c] for c in COLOURS)
