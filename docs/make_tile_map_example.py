"""Draws docs/tile-prompt-map.png: the tile-prompt map of a 2x pass for planted attention maps
(a cat on the left, a dog on the right, grass below), so docs/settings.md can show what the map says
without shipping model weights. Run: .venv/bin/python docs/make_tile_map_example.py"""

import sys
from pathlib import Path

# run as a script from docs/, Python puts docs/ on the path, not the repository with the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from accdiffusion.method.hires import plan_stages, stage_windows  # noqa: E402
from accdiffusion.method.prompts import ImagePromptPlan  # noqa: E402
from accdiffusion.method.settings import AccDiffusionSettings  # noqa: E402
from accdiffusion.method.tilemap import draw_tile_prompt_map  # noqa: E402
from accdiffusion.method.words import split_words  # noqa: E402

PROMPT = "a photo of a (cat:1.2) and a dog on the grass, sunny"
BASE = (64, 64)  # 512x512 first pass
GRID = (16, 16)


def main() -> None:
    words = split_words(PROMPT)
    positions = [[i + 1] for i in range(len(words))]  # one token per word here
    maps = torch.full((77, *GRID), 1.0)
    regions = {"cat": (slice(4, 11), slice(1, 7)), "dog": (slice(4, 11), slice(9, 15)),
               "grass": (slice(10, 16), slice(0, 16))}
    for word, pos in zip(words, positions):
        if word.text in regions:
            maps[pos[0]] = 0.2
            maps[pos[0]][regions[word.text]] = 4.0
    plan = ImagePromptPlan.build(words, positions, maps, PROMPT, words)
    stage = plan_stages(BASE, (128, 128))[0]
    windows = stage_windows(stage, BASE, AccDiffusionSettings())
    prompts = plan.tile_prompts(stage.size, windows, 0.3)

    image = Image.new("RGB", (512, 512), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 320, 512, 512), fill=(90, 160, 70))
    draw.ellipse((40, 140, 200, 330), fill=(200, 140, 60))  # "cat"
    draw.ellipse((300, 140, 470, 330), fill=(110, 80, 50))  # "dog"
    out = draw_tile_prompt_map(image, windows, prompts, stage.size).convert("RGB")
    out = out.resize((out.width // 2, out.height // 2), Image.LANCZOS)
    target = Path(__file__).with_name("tile-prompt-map.png")
    out.quantize(64).save(target, optimize=True)
    print(target, out.size, prompts)


if __name__ == "__main__":
    main()
