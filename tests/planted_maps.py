"""Planted token maps for the prompt and phrase tests: each chosen word attends to its region."""

import torch

from accdiffusion.method.words import align_words, split_words


def plant(host, prompt, regions, grid=(16, 16)):
    """(words, token positions, token maps) where each word in ``regions`` attends to its (rows,
    cols) region and every other token attends uniformly."""
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
