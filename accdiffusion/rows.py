"""Rows of a CFG model call, host-neutral: split and stack the denoiser's cond dict, find which
image a row's text conditioning belongs to, and give an image's positive rows their tile prompts.

Rows are recognised by content: a row whose text conditioning equals an image's positive hires
conditioning gets that image's tile prompts, every other row (negative prompt, AND sub-prompts,
any batch layout, either host's cond/uncond order) keeps its own conditioning in every tile.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .tiles import Window

TEXT_KEYS = ("c_crossattn", "crossattn")  # SD1/SD2 and SDXL names of the text conditioning


def split_cond(cond: dict) -> list[dict]:
    """The CFG denoiser's cond dict ({key: tensor or [tensor]}) as one dict per row."""
    first = next(iter(cond.values()))
    rows = (first[0] if isinstance(first, list) else first).shape[0]
    out = []
    for r in range(rows):
        out.append({k: (v[0] if isinstance(v, list) else v)[r] for k, v in cond.items()})
    return out


def stack_cond(rows: Sequence[dict], like: dict) -> dict:
    """Inverse of :func:`split_cond`; text conditionings of different token counts are padded by
    repeating their last token, as the WebUI's ``stack_conds`` does."""
    out = {}
    for key, template in like.items():
        values = [row[key] for row in rows]
        if key in TEXT_KEYS:
            tokens = max(v.shape[0] for v in values)
            values = [v if v.shape[0] == tokens else torch.cat([v, v[-1:].expand(tokens - v.shape[0], -1)])
                      for v in values]
        stacked = torch.stack(values)
        out[key] = [stacked] if isinstance(template, list) else stacked
    return out


def text_of(row: dict) -> torch.Tensor:
    return next(row[k] for k in TEXT_KEYS if k in row)


def schedule_entry(schedule: Sequence[Any], step: int) -> Any:
    """The WebUI's rule (prompt_parser.reconstruct_cond_batch): the first entry whose end step is
    not yet passed."""
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry.cond
    return schedule[-1].cond


def positive_texts(multicond: Any) -> list[list[torch.Tensor]]:
    """Per image, every text conditioning its positive prompt can take (one per schedule entry);
    empty for an image whose prompt uses AND."""
    out = []
    for subprompts in multicond.batch:
        if len(subprompts) != 1:
            out.append([])
            continue
        out.append([text_of(e.cond) if isinstance(e.cond, dict) else e.cond for e in subprompts[0].schedules])
    return out


def row_image(text: torch.Tensor, positives: Sequence[Sequence[torch.Tensor]]) -> int | None:
    for image, candidates in enumerate(positives):
        for cand in candidates:
            n = min(cand.shape[0], text.shape[0])
            if cand.shape[-1] == text.shape[-1] and torch.equal(text[:n], cand[:n].to(text)):
                return image
    return None


def tile_conditions(rows: Sequence[dict], positives: list[list[torch.Tensor]],
                    tile_schedules: list[list | None], windows: list[Window],
                    tile_row: Callable[[dict, list, Window], dict]) -> list[list[dict] | None]:
    """Per row of a model call: one conditioning per window when the row carries an image's
    positive prompt, else None (the row keeps its own conditioning in every window)."""
    out: list[list[dict] | None] = []
    for row in rows:
        image = row_image(text_of(row), positives)
        schedule = tile_schedules[image] if image is not None else None
        out.append([tile_row(row, schedule[w], win) for w, win in enumerate(windows)] if schedule else None)
    return out
