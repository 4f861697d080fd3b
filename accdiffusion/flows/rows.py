"""Rows of a CFG model call, host-neutral: split and stack the denoiser's cond dict, find which
image each row belongs to, and give an image's positive rows their tile prompts.

Rows are recognised by position first: the host backend knows its CFG layout (A1111: the cond rows
of each image, then the uncond rows, in one call or in slices; Forge: chunks in ``cond_or_uncond``
order) and passes one *place* per row: the image whose positive row it is, None (a negative row,
an AND sub-prompt), or :data:`UNPLACED` (the backend cannot tell). A placed row is confirmed by
content (its text must be one of that image's positive conditionings, else someone changed it and
it keeps its own). Only unplaced rows are matched by content, among the images no placed row took:
the longest matching conditioning wins (a prompt that extends another past its first 75-token
chunk is not taken for the shorter one), and equal prompts go to the images in batch order (one
row per image and call). Rows that belong to no image keep their own conditioning in every tile.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..method.tileprompts import WindowConditioning
from ..method.tiles import Window

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


UNPLACED = -1  # a row whose place in the host's layout is not known: recognised by content only


def match_length(text: torch.Tensor, candidate: torch.Tensor) -> int:
    """How many leading tokens of ``candidate`` the row's ``text`` carries (0: not this one). Rows
    may be longer than their prompt (padded to the longest row of a call), never shorter."""
    n = min(candidate.shape[0], text.shape[0])
    if n == 0 or candidate.shape[-1] != text.shape[-1] or not torch.equal(text[:n], candidate[:n].to(text)):
        return 0
    return n


def _best_match(text: torch.Tensor, candidates: Sequence[torch.Tensor]) -> int:
    return max((match_length(text, c) for c in candidates), default=0)


def row_images(texts: Sequence[torch.Tensor], positives: Sequence[Sequence[torch.Tensor]],
               places: Sequence[int | None] | None = None) -> list[int | None]:
    """Per row of one model call: the image whose positive prompt it carries, or None.
    ``places``: the host's layout (see the module doc); None = every row unplaced."""
    places = list(places) if places is not None else [UNPLACED] * len(texts)
    out: list[int | None] = [None] * len(texts)
    taken: set[int] = set()
    for r, (text, place) in enumerate(zip(texts, places)):
        if place is not None and place != UNPLACED and 0 <= place < len(positives) \
                and _best_match(text, positives[place]) > 0:
            out[r] = place
            taken.add(place)
    for r, (text, place) in enumerate(zip(texts, places)):
        if place != UNPLACED:
            continue
        scores = [(_best_match(text, cands), -image) for image, cands in enumerate(positives) if image not in taken]
        best = max(scores, default=(0, 0))
        if best[0] > 0:
            out[r] = -best[1]
            taken.add(out[r])
    return out


def row_image(text: torch.Tensor, positives: Sequence[Sequence[torch.Tensor]]) -> int | None:
    """The image of one row recognised by content alone (its best match; the first on a tie)."""
    return row_images([text], positives)[0]


def tile_conditions(rows: Sequence[dict], positives: list[list[torch.Tensor]],
                    tile_schedules: Sequence[Sequence[Any] | WindowConditioning | None], windows: list[Window],
                    tile_row: Callable[[dict, Any, Window], dict],
                    places: Sequence[int | None] | None = None) -> list[list[dict] | WindowConditioning | None]:
    """Per row of a model call, when the row is an image's positive row (:func:`row_images` with
    the host's ``places``): one conditioning per window of ``windows`` (the image's tile schedules
    are a list, one per window), or a lookup ``window -> conditioning`` (the image's tile schedules
    are a :class:`~accdiffusion.method.tileprompts.WindowConditioning`: windows that move every step).
    Else None: the row keeps its own conditioning in every window. ``tile_row(row, schedule,
    window)`` makes the row's conditioning from a tile prompt's schedule."""
    out: list[list[dict] | WindowConditioning | None] = []
    for row, image in zip(rows, row_images([text_of(row) for row in rows], positives, places)):
        schedule = tile_schedules[image] if image is not None else None
        if isinstance(schedule, WindowConditioning):
            out.append(schedule.for_row(lambda cond, win, _row=row: tile_row(_row, cond, win)))
        else:
            out.append([tile_row(row, schedule[w], win) for w, win in enumerate(windows)] if schedule else None)
    return out
