"""Measure AccDiffusion on the trained toy model: duplicates after 2× and 3× upscaling with plain
tiling vs. the method's defaults, how well the recorded word masks cover their objects, and how
often the first pass draws what the caption asks. Also the demo picture."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...method.attention import AttentionRecorder, find_cross_attention
from ...method.hires import latent_stats, restandardise
from ...method.prompts import PHRASE_MASKS, PhraseRules, build_word_masks
from ...method.settings import AccDiffusionSettings
from ...method.words import CONNECTIVES, split_words
from .model import ToyHost, load_host
from .sample import RECORD_DOWNSAMPLE, first_pass, flow_first_pass, upscale, upscale_progressive
from .scenes import COLOURS, LATENT, PATCH, SHAPES, Scene, counts, latent_rgb, make_scene, \
    matches_caption, segment

EVAL_SEED_OFFSET = 0  # scenes 0..N-1 give the captions; training uses seeds from 1 000 000
# Measured with word units (the paper's, and the default when these tables were made); phrase
# units against words: ``eval --units`` (docs/phrases.md). And with overlap windows, the default
# then: the configs pin it so the tables replay; window modes are compared by ``eval --shifted``.
CONFIGS: dict[str, AccDiffusionSettings] = {
    # (a) plain tiling: one prompt for all windows, no dilated branch, no skip residual
    "plain tiling": AccDiffusionSettings(enabled=True, patch_prompts=False, dilated_sampling=False,
                                         window_interaction=False, skip_residual=False,
                                         tile_batch_size=64, prompt_units="words", window_mode="overlap"),
    # (a') the method with only its patch prompts off
    "AccDiffusion, patch prompts off": AccDiffusionSettings(enabled=True, patch_prompts=False,
                                                            tile_batch_size=64, prompt_units="words",
                                                            window_mode="overlap"),
    # (b) the defaults, with word units
    "AccDiffusion defaults": AccDiffusionSettings(enabled=True, tile_batch_size=64, prompt_units="words",
                                                  window_mode="overlap"),
}
# ``eval --shifted``: the defaults with both window modes, stored apart from the table above.
# The UNet toy's window (8 latent px) equals its size multiple, so shifted windows on that grain
# (window_grain 0, how they shipped first) can only draw offset 0 there: a fixed non-overlapping
# grid. Grain 1 lets offsets and cuts fall on any latent pixel (windows padded for the model and
# cropped back) — the toy's stand-in for SD's 16 offset positions per 128-px window. On the flow
# toy grain 0 is its 2-px patch grid (8 offsets per 16-px window) against 16 at grain 1.
SHIFTED_CONFIGS: dict[str, AccDiffusionSettings] = {
    "AccDiffusion defaults": CONFIGS["AccDiffusion defaults"],
    "AccDiffusion defaults, shifted windows": replace(CONFIGS["AccDiffusion defaults"], window_mode="shifted",
                                                      window_grain=0),
    "AccDiffusion defaults, shifted windows, 1-px offsets":
        replace(CONFIGS["AccDiffusion defaults"], window_mode="shifted", window_grain=1),
}
SCALES = (2, 3)
# the flow toy's table: the two configs the UNet toy's table compares head to head
FLOW_CONFIGS: dict[str, AccDiffusionSettings] = {name: CONFIGS[name] for name in ("plain tiling", "AccDiffusion defaults")}


def pooled_view(latent: torch.Tensor) -> torch.Tensor:
    """The flow toy's 4-px latent seen on 8-px patches (2×2 mean: exactly the UNet toy's colour
    code), so objects are counted on the same grid with the same thresholds as the UNet toy."""
    return torch.nn.functional.avg_pool2d(latent, 2)


@dataclass(frozen=True)
class ToyKind:
    """What differs between the two toys in the evaluation."""
    name: str
    load: Any  # () -> host
    first_pass: Any  # (host, prompts, seed) -> (latent, recorder)
    probe_maps: Any  # (host, scene, seed) -> [tokens, 8, 8]
    view: Any  # latent → the 8-px-patch view the counting reads
    configs: dict[str, AccDiffusionSettings]
    denoise: float = 0.6  # the hires pass's


def kind_of(model: str) -> "ToyKind":
    if model == "flow-llm":  # the single-stream toy with the chat-template text encoder (docs/toy-flow.md)
        from .llm import load_llm_host
        from .sample import FLOW_DENOISE

        return ToyKind("flow-llm", load_llm_host, flow_first_pass, flow_probe_maps, pooled_view, FLOW_CONFIGS,
                       FLOW_DENOISE)
    if model == "flow":
        from .flow import load_flow_host

        from .sample import FLOW_DENOISE

        return ToyKind("flow", load_flow_host, flow_first_pass, flow_probe_maps, pooled_view, FLOW_CONFIGS,
                       FLOW_DENOISE)
    return ToyKind("unet", load_host, first_pass, probe_maps, lambda x: x, CONFIGS)


# --- duplicates ------------------------------------------------------------------------------
def duplicates(first: torch.Tensor, upscaled: torch.Tensor) -> tuple[int, int]:
    """(extra objects, lost objects) of an upscaled latent against its first pass, per colour.
    Extra: objects of ≥ 3 latent px (the smallest object the model draws) beyond every blob of
    that colour the first pass had, specks included (a speck that grows is not a duplicate).
    Lost: first-pass objects (≥ 2 px) missing from the upscaled image (≥ 2 px)."""
    up_objects, up_any = counts(upscaled, min_area=3), counts(upscaled)
    first_any, first_objects = counts(first, min_area=1), counts(first)
    extra = sum(max(0, up_objects[c] - first_any[c]) for c in COLOURS)
    lost = sum(max(0, first_objects[c] - up_any[c]) for c in COLOURS)
    return extra, lost


# --- seams and window layouts ---------------------------------------------------------------
def seam_ratio(latent: torch.Tensor, windows: Sequence) -> float:
    """Mean |step| between neighbouring latent pixels across the windows' inner edges, over the
    same mean across all other neighbour pairs: about 1 without seams, above 1 where the windows
    left an edge of their own. ``latent``: [C, H, W]."""
    height, width = latent.shape[-2:]
    rows = {w.top for w in windows} | {w.top + w.height for w in windows}
    cols = {w.left for w in windows} | {w.left + w.width for w in windows}
    dy = (latent[:, 1:] - latent[:, :-1]).abs().mean(0)  # step between row i-1 and i at [i-1]
    dx = (latent[:, :, 1:] - latent[:, :, :-1]).abs().mean(0)
    edge_y = torch.tensor([i + 1 in rows for i in range(height - 1)])
    edge_x = torch.tensor([j + 1 in cols for j in range(width - 1)])
    on = torch.cat([dy[edge_y].flatten(), dx[:, edge_x].flatten()])
    off = torch.cat([dy[~edge_y].flatten(), dx[:, ~edge_x].flatten()])
    return float(on.mean() / off.mean()) if len(on) and len(off) else float("nan")


@contextlib.contextmanager
def window_capture():
    """Record the local windows of each stage's last step ({stage index: windows}). Swapped back
    in ``finally``."""
    from ...method import hires

    last: dict[int, list] = {}
    original = hires.StageDenoiser.windows_at

    def windows_at(self, step: int):
        windows = original(self, step)
        last[self.stage.index] = windows
        return windows

    hires.StageDenoiser.windows_at = windows_at  # type: ignore[method-assign]
    try:
        yield last
    finally:
        hires.StageDenoiser.windows_at = original  # type: ignore[method-assign]


def word_masks(host: ToyHost, caption: str, token_maps: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Opened word masks (8×8 bool) of a caption, by word text (a word may occur twice)."""
    words = split_words(caption)
    positions = host.word_positions(words, caption)
    masks = build_word_masks(token_maps, positions).masks
    out: dict[str, list[torch.Tensor]] = {}
    for word, mask in zip(words, masks):
        out.setdefault(word.text, []).append(mask)
    return out


def iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


@dataclass
class WordIoU:
    colour: list[float]
    shape: list[float]
    other_object: list[float]  # colour word vs. another object of the scene: the chance level
    shape_other_object: list[float] = field(default_factory=list)
    colour_points: list[float] = field(default_factory=list)  # 1 when the map's peak is on the object
    shape_points: list[float] = field(default_factory=list)
    # threshold-free: P(map at a random object cell > at a random cell outside it), 0.5 = chance
    shape_auc: list[float] = field(default_factory=list)
    shape_auc_other_object: list[float] = field(default_factory=list)

    def add(self, other: "WordIoU") -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))


def map_auc(word_map: torch.Tensor, mask: np.ndarray) -> float | None:
    """How well a raw word map ranks the cells of ``mask`` above the others (ROC AUC, ties
    halved); None when the mask is empty or full."""
    values = np.asarray(word_map, float).ravel()
    inside = np.asarray(mask, bool).ravel()
    if inside.all() or not inside.any():
        return None
    diff = values[inside][:, None] - values[~inside][None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def caption_ious(host: ToyHost, caption: str, token_maps: torch.Tensor,
                 truth: dict[str, np.ndarray]) -> WordIoU:
    """IoU of each object's colour word and shape word with that object's mask (``truth``: colour
    → 8×8 mask of the object of that colour; the caption's colours are distinct)."""
    masks = word_masks(host, caption, token_maps)
    maps = raw_word_maps(host, caption, token_maps)
    out = WordIoU([], [], [])
    objects = _caption_objects(caption)
    shape_counts = {shape: sum(s == shape for _, s in objects) for _, shape in objects}
    for colour, shape in objects:
        if colour not in truth:
            continue
        out.colour.append(iou(masks[colour][0], truth[colour]))
        out.colour_points.append(float(truth[colour].flat[int(maps[colour][0].argmax())]))
        unique_shape = shape_counts[shape] == 1  # a shape named twice cannot be told apart
        if unique_shape:
            out.shape.append(iou(masks[shape][0], truth[colour]))
            out.shape_points.append(float(truth[colour].flat[int(maps[shape][0].argmax())]))
            auc = map_auc(maps[shape][0], truth[colour])
            if auc is not None:
                out.shape_auc.append(auc)
        for other, _ in objects:
            if other != colour and other in truth:
                out.other_object.append(iou(masks[colour][0], truth[other]))
                if unique_shape:
                    out.shape_other_object.append(iou(masks[shape][0], truth[other]))
                    auc = map_auc(maps[shape][0], truth[other])
                    if auc is not None:
                        out.shape_auc_other_object.append(auc)
    return out


def raw_word_maps(host: ToyHost, caption: str, token_maps: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    from ...method.prompts import word_maps as merge_tokens

    words = split_words(caption)
    positions = host.word_positions(words, caption)
    out: dict[str, list[torch.Tensor]] = {}
    for word, m in zip(words, merge_tokens(token_maps, positions)):
        out.setdefault(word.text, []).append(m)
    return out


def _caption_objects(caption: str) -> list[tuple[str, str]]:
    words = caption.replace(",", " ").split()
    return [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in COLOURS and words[i + 1] in SHAPES]


def generated_truth(latent: torch.Tensor) -> dict[str, np.ndarray]:
    """Colour → the largest segment of that colour in a generated latent (8×8 bool)."""
    seg = segment(latent_rgb(latent[None])[0], min_area=1)
    return {c: max(parts, key=lambda m: m.sum()) for c, parts in seg.items() if parts}


def scene_truth(scene: Scene) -> dict[str, np.ndarray]:
    """Colour → true object mask on the latent grid (a latent pixel is in when half covered)."""
    out = {}
    for obj, mask in zip(scene.objects, scene.masks):
        cover = mask.reshape(LATENT, PATCH, LATENT, PATCH).mean((1, 3))
        out[obj.colour] = cover >= 0.5
    return out


def probe_maps(host: ToyHost, scene: Scene, timesteps: Sequence[int] = (200, 400, 600, 800),
               seed: int = 0) -> torch.Tensor:
    """[tokens, 8, 8] attention maps of a real scene: its latent noised to a few timesteps, one
    UNet call each, recorded as in the first pass."""
    from ..reference import sd_alphas_cumprod
    from .scenes import scene_latent

    generator = torch.Generator().manual_seed(seed)
    x0 = scene_latent(scene)[None]
    alphas = sd_alphas_cumprod()
    recorder = AttentionRecorder((LATENT, LATENT), 1, downsample=RECORD_DOWNSAMPLE)
    recorder.row_images = [0]
    cond = host.encode([scene.caption])
    try:
        recorder.attach(find_cross_attention(host.unet, include_middle=False))
        with torch.no_grad():
            for t in timesteps:
                a = alphas[t]
                xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
                host._eps(xt, torch.tensor([float(t)]), cond)
    finally:
        recorder.detach()
    maps = recorder.maps(0)
    assert maps is not None
    return maps


def flow_probe_maps(host, scene: Scene, sigmas: Sequence[float] = (0.2, 0.4, 0.6, 0.8), seed: int = 0,
                    recorder=None) -> torch.Tensor:
    """The flow toy's [tokens, 8, 8] maps of a real scene: its latent at x_σ = (1 − σ)·x₀ + σ·ε for a
    few σ, one model call each with the recorder on (pass ``recorder`` to read other blocks or
    normalisations afterwards)."""
    from .flow import GRID, SCENE_PATCH, FlowAttentionRecorder, flow_noised
    from .scenes import scene_latent

    generator = torch.Generator().manual_seed(seed)
    x0 = scene_latent(scene, SCENE_PATCH)[None]
    from .sample import FLOW_RECORD_MODE, last_block

    recorder = recorder or FlowAttentionRecorder((GRID, GRID), 1, host.model.config.blocks, host.text_tokens,
                                                 mode=FLOW_RECORD_MODE, use_blocks=last_block(host))
    recorder.row_images = [0]
    cond = host.encode([scene.caption])
    try:
        recorder.attach(host.model)
        with torch.no_grad():
            for sigma in sigmas:
                xt = flow_noised(x0, torch.randn(x0.shape, generator=generator), sigma)
                host.row_model(xt, torch.tensor([sigma]), cond)
    finally:
        recorder.detach(host.model)
    maps = recorder.maps(0)
    assert maps is not None
    return maps


def map_study(host, scene_list: Sequence[Scene], firsts: Sequence[torch.Tensor], recorders: Sequence, chunk: int,
              view) -> dict:
    """The flow toy's maps by normalisation and block: shape and colour word IoU and peak hits on
    generated first passes and probed real scenes, for each mode alone on every block and for
    every mode on all blocks together."""
    from .flow import RECORD_MODES, GRID, FlowAttentionRecorder

    blocks = host.model.config.blocks
    choices = [(mode, (b,)) for mode in RECORD_MODES for b in range(blocks)]
    choices += [(mode, tuple(range(blocks))) for mode in RECORD_MODES]
    choices += [("text", tuple(range(host.model.config.double_blocks)))]
    gen = {c: WordIoU([], [], []) for c in choices}
    real = {c: WordIoU([], [], []) for c in choices}
    first = torch.cat(list(firsts))
    for i, scene in enumerate(scene_list):
        rec = recorders[i // chunk]
        probe = FlowAttentionRecorder((GRID, GRID), 1, blocks)
        flow_probe_maps(host, scene, seed=i, recorder=probe)
        for mode, bl in choices:
            gen[(mode, bl)].add(caption_ious(host, scene.caption, rec.maps(i % chunk, mode, bl),
                                             generated_truth(view(first[i]))))
            real[(mode, bl)].add(caption_ious(host, scene.caption, probe.maps(0, mode, bl), scene_truth(scene)))
    mean = lambda v: round(float(np.mean(v)), 3) if v else None
    out = {}
    for mode, bl in choices:
        key = f"{mode} / blocks {','.join(map(str, bl))}"
        out[key] = {src: {"shape IoU": mean(w.shape), "shape chance": mean(w.shape_other_object),
                          "shape peak": mean(w.shape_points), "colour IoU": mean(w.colour),
                          "colour chance": mean(w.other_object), "colour peak": mean(w.colour_points)}
                    for src, w in (("generated", gen[(mode, bl)]), ("real", real[(mode, bl)]))}
    return out


# the product's map choices for joint-attention models, by what they mean on any depth: the flow
# toy has 3 double-stream blocks (0-2) and 2 single-stream ones (3-4)
FLOW_MAP_CHOICES: dict[str, tuple[str, tuple[int, ...]]] = {
    "text-only softmax, double-stream blocks (shipped before)": ("text", (0, 1, 2)),
    "text-only softmax, every block": ("text", (0, 1, 2, 3, 4)),
    "text-only softmax, last block": ("text", (4,)),
    "joint share, double-stream blocks": ("joint", (0, 1, 2)),
    "joint share, last double-stream block": ("joint", (2,)),
    "joint share, single-stream blocks": ("joint", (3, 4)),
    "joint share, last block": ("joint", (4,)),
    "joint share, every block": ("joint", (0, 1, 2, 3, 4)),
}


def _mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, float)
    return round(float(a.mean()), 3), round(float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0, 3)


def flow_map_choices(scenes: int = 200, chunk: int = 25, host=None, out: Path | None = None,
                     choices: dict[str, tuple[str, tuple[int, ...]]] | None = None, verbose: bool = True) -> dict:
    """Which normalisation and blocks give the best-localised word maps on the flow toy: for each
    choice, the shape and colour words' mask IoU with their object (and with the scene's other
    objects: chance) and how often the map's peak is on the object, on generated first passes
    (truth: their own colour segments) and on real scenes probed at σ = 0.2-0.8 (truth: the scene's
    masks); mean and standard error over objects, and each choice's paired difference in shape IoU
    lift (IoU - chance, per scene) against the first choice."""
    from .flow import GRID, FlowAttentionRecorder

    kind = kind_of("flow")
    host = host or kind.load()
    choices = choices or FLOW_MAP_CHOICES
    start = time.time()
    scene_list = [make_scene(EVAL_SEED_OFFSET + i) for i in range(scenes)]
    blocks = host.model.config.blocks
    per: dict[str, dict[str, WordIoU]] = {name: {"generated": WordIoU([], [], []), "real": WordIoU([], [], [])}
                                          for name in choices}
    lift: dict[str, dict[str, list[float]]] = {name: {"generated": [], "real": []} for name in choices}
    for c0 in range(0, scenes, chunk):
        part = scene_list[c0:c0 + chunk]
        latent, rec = flow_first_pass(host, [s.caption for s in part], seed=c0, blocks=tuple(range(blocks)))
        for j, scene in enumerate(part):
            probe = FlowAttentionRecorder((GRID, GRID), 1, blocks)
            flow_probe_maps(host, scene, seed=c0 + j, recorder=probe)
            truths = {"generated": generated_truth(kind.view(latent[j])), "real": scene_truth(scene)}
            for name, (mode, bl) in choices.items():
                for src, maps in (("generated", rec.maps(j, mode, bl)), ("real", probe.maps(0, mode, bl))):
                    w = caption_ious(host, scene.caption, maps, truths[src])
                    per[name][src].add(w)
                    if w.shape and w.shape_other_object:
                        lift[name][src].append(float(np.mean(w.shape) - np.mean(w.shape_other_object)))
        if verbose:
            print(f"{min(c0 + chunk, scenes)}/{scenes} scenes, {time.time() - start:.0f} s", flush=True)
    first = next(iter(choices))
    report: dict = {"scenes": scenes, "baseline": first, "choices": {}}
    for name, (mode, bl) in choices.items():
        entry: dict = {"mode": mode, "blocks": list(bl)}
        for src in ("generated", "real"):
            w = per[name][src]
            diff = np.asarray(lift[name][src]) - np.asarray(lift[first][src])
            entry[src] = {"shape IoU": _mean_se(w.shape), "shape chance": _mean_se(w.shape_other_object),
                          "shape peak": _mean_se(w.shape_points), "shape AUC": _mean_se(w.shape_auc),
                          "shape AUC, other objects": _mean_se(w.shape_auc_other_object),
                          "colour IoU": _mean_se(w.colour),
                          "colour chance": _mean_se(w.other_object), "colour peak": _mean_se(w.colour_points),
                          "shape objects": len(w.shape),
                          "shape lift vs baseline (paired)": _mean_se(list(diff))}
        report["choices"][name] = entry
    report["seconds"] = round(time.time() - start)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    if verbose:
        print(flow_map_table(report))
    return report


def flow_map_table(report: dict) -> str:
    """The study as a markdown table (mean ± s.e.)."""
    def cell(pair) -> str:
        return "–" if pair[0] is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = ["| maps | gen.: shape AUC (other objects) | peak on object | IoU − chance | real: shape AUC "
             "(other objects) | peak on object | IoU − chance |", "|---|---|---|---|---|---|---|"]
    for name, e in report["choices"].items():
        g, r = e["generated"], e["real"]
        lift = lambda src: f"{src['shape IoU'][0] - src['shape chance'][0]:+.3f}"
        auc = lambda src: f"{cell(src['shape AUC'])} ({src['shape AUC, other objects'][0]:.2f})"
        lines.append(f"| {name} | {auc(g)} | {cell(g['shape peak'])} | {lift(g)} "
                     f"| {auc(r)} | {cell(r['shape peak'])} | {lift(r)} |")
    return "\n".join(lines)


def flow_stage_statistics(scenes: int = 30, chunk: int = 25, host=None, out: Path | None = None,
                          denoise: float | None = None, verbose: bool = True) -> dict:
    """Does a flow model's hires stage keep the first pass's per-channel statistics, and does the
    per-image re-standardisation (one mean and std over all channels) keep them? The flow toy's
    latent channels have unequal scales (std 1.03 / 1.03 / 1.01 / 0.48), as Flux's 16 have. For
    every stage of a progressive 3× job with the AccDiffusion defaults: per image and channel, the
    raw stage output (read where the hires pass calls ``restandardise_stage_output``) — its std
    over the first pass's and its mean shift in first-pass stds — and the same re-standardised per
    image and per channel; and each variant pooled back to the first pass's grid against the first
    pass (squared error over the first pass's variance): how faithful it stays."""
    from .. import reference

    kind = kind_of("flow")
    host = host or kind.load()
    denoise = kind.denoise if denoise is None else denoise
    settings = FLOW_CONFIGS["AccDiffusion defaults"]
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = reference.restandardise_stage_output

    def spy(latent: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        captured.append(latent.clone())
        return original(latent, mean, std)

    variants = ("raw", "per image", "per channel")
    rows: dict[str, list[np.ndarray]] = {f"{v} {m}": [] for v in variants for m in ("std ratio", "mean shift")}
    fidelity: dict[str, list[float]] = {v: [] for v in variants}
    start = time.time()
    reference.restandardise_stage_output = spy  # type: ignore[assignment]
    try:
        for c0 in range(0, scenes, chunk):
            caps = [make_scene(EVAL_SEED_OFFSET + i).caption for i in range(c0, min(scenes, c0 + chunk))]
            first, rec = kind.first_pass(host, caps, seed=c0)
            captured.clear()
            upscale_progressive(host, first, caps, rec, settings, 3, seed=c0, denoise=denoise)
            dims = (2, 3)
            f_mean, f_std = first.mean(dims), first.std(dims)  # [B, C]
            for raw in captured:
                per_image = restandardise(raw, *latent_stats(first))
                per_channel = restandardise(raw, *latent_stats(first, per_channel=True))
                for name, x in zip(variants, (raw, per_image, per_channel)):
                    rows[f"{name} std ratio"].append((x.std(dims) / f_std).numpy())
                    rows[f"{name} mean shift"].append(((x.mean(dims) - f_mean) / f_std).numpy())
                    # fidelity: the output pooled back to the first pass's grid against the first pass
                    pooled = torch.nn.functional.adaptive_avg_pool2d(x, first.shape[-2:])
                    err = ((pooled - first) ** 2).sum((1, 2, 3)) / ((first - first.mean(dims, keepdim=True)) ** 2).sum((1, 2, 3))
                    fidelity[name].extend(err.tolist())
    finally:
        reference.restandardise_stage_output = original  # type: ignore[assignment]
    report: dict = {"scenes": scenes, "hires_denoise": denoise, "channels": {}}
    for name, values in rows.items():
        a = np.concatenate(values)  # [image-stages, C]
        report["channels"][name] = {"mean": [round(float(v), 4) for v in a.mean(0)],
                                    "max |deviation|": [round(float(v), 4) for v in
                                                        np.abs(a - (1.0 if "ratio" in name else 0.0)).max(0)]}
    report["pooled error relative to the first pass's variance"] = {name: _mean_se(v) for name, v in fidelity.items()}
    report["pooled error, paired difference per channel minus per image"] = _mean_se(
        list(np.asarray(fidelity["per channel"]) - np.asarray(fidelity["per image"])))
    report["image_stages"] = int(np.concatenate(rows["raw std ratio"]).shape[0])
    report["seconds"] = round(time.time() - start)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    if verbose:
        print(json.dumps(report, indent=1))
    return report


# --- the evaluation ----------------------------------------------------------------------------
def paired_differences(per_scene: dict[str, dict[int, dict]]) -> dict:
    """Each config's per-scene difference from the first config (same scenes, same first passes):
    mean and standard error of extra objects, lost objects and seam ratio, per scale."""
    first, *others = per_scene
    out: dict = {}
    for name in others:
        out[name] = {f"{scale}x": {measure: _mean_se(list(np.asarray(r[key], float)
                                                          - np.asarray(per_scene[first][scale][key], float)))
                                   for measure, key in (("extra", "extra"), ("lost", "lost"), ("seam", "seam"))}
                     for scale, r in per_scene[name].items()}
    return out


def pool_reports(reports: Sequence[dict]) -> dict:
    """One ``eval --shifted`` report from several runs on disjoint seeds (their per-scene values
    pooled): means, standard errors and paired differences over all their scenes; window
    evaluations per scene are the same in every run."""
    first = reports[0]
    names = list(first["per_scene"])
    scales = list(first["per_scene"][names[0]])
    per_scene = {name: {int(scale[:-1]): {key: sum((r["per_scene"][name][scale][key] for r in reports), [])
                                          for key in ("extra", "lost", "seam")} for scale in scales}
                 for name in names}
    configs = {}
    for name in names:
        configs[name] = {}
        for scale in scales:
            v = per_scene[name][int(scale[:-1])]
            row = dict(first["configs"][name][scale])
            for measure, key in (("duplicates_per_scene", "extra"), ("lost_per_scene", "lost"),
                                 ("seam_ratio_last_step_windows", "seam")):
                row[measure], row[f"{measure}_se"] = _mean_se(v[key])
            row["scenes_with_duplicates"] = round(float(np.mean(np.asarray(v["extra"]) > 0)), 3)
            for key in ("words_per_tile_prompt", "unet_calls"):
                row.pop(key, None)
            configs[name][scale] = row
    return {"scenes": sum(r["scenes"] for r in reports), "seed_offsets": [r.get("seed_offset", 0) for r in reports],
            "model": first.get("model", "unet"), "configs": configs,
            "paired_vs_first_config": paired_differences(per_scene),
            "seconds": sum(r.get("seconds", 0) for r in reports)}


def shifted_table(report: dict) -> str:
    """``eval --shifted`` as a markdown table: mean ± s.e. per config, then each config's paired
    difference from the first."""
    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.2f} ± {row[key + '_se']:.2f}"

    lines = ["| config | extra 2× | extra 3× | lost 2× | lost 3× | seam 2× | seam 3× | evaluations 2× / 3× |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per in report["configs"].items():
        a, b = per["2x"], per["3x"]
        lines.append(f"| {name} | {cell(a, 'duplicates_per_scene')} | {cell(b, 'duplicates_per_scene')} "
                     f"| {cell(a, 'lost_per_scene')} | {cell(b, 'lost_per_scene')} "
                     f"| {cell(a, 'seam_ratio_last_step_windows')} | {cell(b, 'seam_ratio_last_step_windows')} "
                     f"| {a['window_evals_per_scene']:g} / {b['window_evals_per_scene']:g} |")
    for name, per in report.get("paired_vs_first_config", {}).items():
        d = lambda scale, m: f"{per[scale][m][0]:+.2f} ± {per[scale][m][1]:.2f}"
        lines.append(f"| {name} − first (paired) | {d('2x', 'extra')} | {d('3x', 'extra')} | {d('2x', 'lost')} "
                     f"| {d('3x', 'lost')} | {d('2x', 'seam')} | {d('3x', 'seam')} | |")
    return "\n".join(lines)


def duplicates_table(report: dict) -> str:
    """The duplicates table of docs/toy-flow.md from a ``run_eval(details=True)`` report: per config
    extra objects, scenes with an extra object, lost objects and words per tile prompt at each
    scale (mean ± s.e. over scenes), then each config's paired difference from the first."""
    names = list(report["configs"])
    cell = lambda row, key: f"{row[key]:.2f} ± {row[key + '_se']:.2f}"
    rows = [("extra objects per scene", lambda r: cell(r, "duplicates_per_scene")),
            ("scenes with an extra object", lambda r: f"{100 * r['scenes_with_duplicates']:.0f} %"),
            ("lost objects per scene", lambda r: cell(r, "lost_per_scene")),
            ("words per tile prompt", lambda r: f"{r['words_per_tile_prompt']:.1f}")]
    lines = ["| upscale | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for scale in report["configs"][names[0]]:
        for label, fmt in rows:
            lines.append(f"| {scale.replace('x', '×')} {label} | "
                         + " | ".join(fmt(report["configs"][n][scale]) for n in names) + " |")
    paired = report.get("paired_vs_first_config", {})
    for scale in report["configs"][names[0]]:
        cells = ["–"] + [f"{paired[n][scale]['extra'][0]:+.2f} ± {paired[n][scale]['extra'][1]:.2f} / "
                         f"{paired[n][scale]['lost'][0]:+.2f} ± {paired[n][scale]['lost'][1]:.2f}"
                         if n in paired else "" for n in names[1:]]
        lines.append(f"| {scale.replace('x', '×')} extra / lost, paired difference from {names[0]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(scenes: int = 50, out: Path | None = Path("toy-eval.json"), host: ToyHost | None = None,
             configs: dict[str, AccDiffusionSettings] | None = None, scales: Sequence[int] = SCALES,
             chunk: int = 25, verbose: bool = True, details: bool = False, kind: ToyKind | None = None,
             study: bool = False, denoise: float | None = None, seed_offset: int = EVAL_SEED_OFFSET) -> dict:
    """``details``: also the UNet window evaluations per scene and stage, the seam ratio of each
    config, the standard errors and each config's paired difference from the first
    (``eval --shifted``); off, the report keeps the layout of docs/toy-eval.json.
    ``kind``: which toy (default the UNet toy); ``study``: also the flow toy's maps by block and
    normalisation (:func:`map_study`). ``seed_offset``: scenes, first-pass and hires seeds start
    there (held-out scenes: not the docs' 0…N−1, not training's from 1 000 000)."""
    kind = kind or kind_of("unet")
    host = host or kind.load()
    configs = configs or kind.configs
    view = kind.view
    denoise = kind.denoise if denoise is None else denoise
    start = time.time()
    scene_list = [make_scene(seed_offset + i) for i in range(scenes)]
    captions = [s.caption for s in scene_list]
    report: dict = {"scenes": scenes, "configs": {}, "first_pass": {}, "iou": {}}
    if seed_offset != EVAL_SEED_OFFSET:
        report["seed_offset"] = seed_offset
    if kind.name != "unet":
        report["model"], report["hires_denoise"] = kind.name, denoise
    firsts, recorders = [], []
    for c0 in range(0, scenes, chunk):
        latent, recorder = kind.first_pass(host, captions[c0:c0 + chunk], seed=seed_offset + c0)
        firsts.append(latent)
        recorders.append(recorder)
    first = torch.cat(firsts)
    first_counts = [counts(view(l)) for l in first]
    saved: dict[str, list[torch.Tensor]] = {"first": [first]}
    matched = [matches_caption(view(l), c) for l, c in zip(first, captions)]
    report["first_pass"] = {"caption_match_share": sum(matched) / scenes,
                            "objects_per_scene": sum(sum(c.values()) for c in first_counts) / scenes,
                            "captioned_objects_per_scene": sum(len(s.objects) for s in scene_list) / scenes}

    gen = WordIoU([], [], [])
    real = WordIoU([], [], [])
    for i, (scene, latent) in enumerate(zip(scene_list, first)):
        rec = recorders[i // chunk]
        maps = rec.maps(i % chunk)
        gen.add(caption_ious(host, scene.caption, maps, generated_truth(view(latent))))
        real.add(caption_ious(host, scene.caption, kind.probe_maps(host, scene, seed=seed_offset + i),
                              scene_truth(scene)))
    mean = lambda v: round(float(np.mean(v)), 3) if v else None
    report["iou"] = {name: {"colour word IoU": mean(w.colour), "shape word IoU": mean(w.shape),
                            "colour word IoU with another object (chance)": mean(w.other_object),
                            "shape word IoU with another object (chance)": mean(w.shape_other_object),
                            "colour word peak on its object": mean(w.colour_points),
                            "shape word peak on its object": mean(w.shape_points),
                            "objects": len(w.colour)}
                     for name, w in (("generated first pass", gen), ("real scenes, probed", real))}
    if study:
        report["maps_by_mode_and_block"] = map_study(host, scene_list, firsts, recorders, chunk, view)
    if verbose:
        print(json.dumps(report, indent=1), f"{time.time() - start:.0f} s", flush=True)

    per_scene: dict[str, dict[int, dict]] = {}
    for name, settings in configs.items():
        rows = {scale: {"extra": [], "lost": [], "words": [], "seam": [], "evals": 0, "local": 0, "calls": 0}
                for scale in scales}
        for c0, (latent, rec) in enumerate(zip(firsts, recorders)):
            caps = captions[c0 * chunk:(c0 + 1) * chunk]
            with window_capture() as last_windows:
                result, stage_latents = upscale_progressive(host, latent, caps, rec, settings, max(scales),
                                                            seed=seed_offset + c0, denoise=denoise)
            for stage, up, stats in zip(result.stages, stage_latents, result.stage_stats):
                scale = round(stage.scale)
                if scale not in rows:
                    continue
                saved.setdefault(f"{name}/{scale}x", []).append(up)  # type: ignore[arg-type]
                for j, one in enumerate(up):
                    e, l = duplicates(view(first[c0 * chunk + j]), view(one))
                    rows[scale]["extra"].append(e)
                    rows[scale]["lost"].append(l)
                    tiles = result.tile_prompts[stage.index - 1][j] or [caps[j]]
                    rows[scale]["words"].append(np.mean([len(split_words(t)) for t in tiles]))
                    rows[scale]["seam"].append(seam_ratio(one, last_windows[stage.index]))
                rows[scale]["evals"] += stats.window_evals
                rows[scale]["local"] += stats.local_evals
                rows[scale]["calls"] += stats.unet_calls
        per_scale = {}
        for scale, r in rows.items():
            per_scale[f"{scale}x"] = {
                "duplicates_per_scene": round(float(np.mean(r["extra"])), 3),
                "scenes_with_duplicates": round(float(np.mean(np.asarray(r["extra"]) > 0)), 3),
                "lost_per_scene": round(float(np.mean(r["lost"])), 3),
                "words_per_tile_prompt": round(float(np.mean(r["words"])), 2)}
            if details:  # evaluations of this stage alone (a 3× job also ran the 2× stage)
                per_scale[f"{scale}x"].update({
                    "seam_ratio_last_step_windows": round(float(np.mean(r["seam"])), 3),
                    "window_evals_per_scene": round(r["evals"] / scenes, 1),
                    "local_window_evals_per_scene": round(r["local"] / scenes, 1),
                    "unet_calls": r["calls"],
                    **{f"{measure}_se": _mean_se(r[key])[1]
                       for measure, key in (("duplicates_per_scene", "extra"), ("lost_per_scene", "lost"),
                                            ("seam_ratio_last_step_windows", "seam"))}})
                per_scene.setdefault(name, {})[scale] = r
        if verbose:
            print(name, per_scale, f"{time.time() - start:.0f} s", flush=True)
        report["configs"][name] = per_scale
    if details and len(per_scene) > 1:
        report["paired_vs_first_config"] = paired_differences(per_scene)
    if details:  # per scene, so runs on other seeds can be pooled (:func:`pool_reports`)
        report["per_scene"] = {name: {f"{scale}x": {key: [float(v) for v in r[key]] for key in ("extra", "lost", "seam")}
                                      for scale, r in per.items()} for name, per in per_scene.items()}
    report["seconds"] = round(time.time() - start)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
        # every latent, so the counting can be re-run without sampling again
        torch.save({k: torch.cat(v) for k, v in saved.items()}, Path(out).with_suffix(".pt"))
    return report


# --- the demo picture ----------------------------------------------------------------------------
def _to_image(latent: torch.Tensor, side: int):
    from PIL import Image

    from .scenes import decode

    pixels = (decode(latent[None])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(pixels).resize((side, side), Image.NEAREST)


def demo_command(model: str, seed: int, scale: int) -> str:
    """The command the picture's caption names. The module path comes from the package itself: the
    first picture named ``accdiffusion.toy`` long after the toy moved to ``accdiffusion.lab.toy``."""
    flow = f" --model {model}" if model != "unet" else ""
    return f'python -m {__package__} demo{flow} --caption "..." --seed {seed} --scale {scale}'


def demo(caption: str = "a red disk and a blue square", seed: int = 3, scale: int = 3,
         out: Path | str = "toy-demo.png", host: ToyHost | None = None, kind: ToyKind | None = None) -> Path:
    """First pass | plain tiling | AccDiffusion defaults | the last stage's tile-prompt map."""
    from PIL import Image, ImageDraw

    from ...method.hires import stage_windows
    from ...method.tilemap import draw_tile_prompt_map
    from ...method.tiles import Window

    kind = kind or kind_of("unet")
    host = host or kind.load()
    latent, recorder = kind.first_pass(host, [caption], seed=seed)
    plain = upscale(host, latent, [caption], recorder, CONFIGS["plain tiling"], scale, seed, denoise=kind.denoise)
    acc = upscale(host, latent, [caption], recorder, CONFIGS["AccDiffusion defaults"], scale, seed,
                  denoise=kind.denoise)
    side = 384
    stage = acc.stages[-1]
    k = side // (8 * stage.size[0])  # draw the map at the panel size: windows scaled by k
    windows = [Window(w.top * k, w.left * k, w.height * k, w.width * k)
               for w in stage_windows(stage, tuple(latent.shape[-2:]), CONFIGS["AccDiffusion defaults"])]
    tile_map = draw_tile_prompt_map(_to_image(latent[0], side), windows, acc.tile_prompts[-1][0],
                                    (stage.size[0] * k, stage.size[1] * k)).resize((side, side))
    first_n, plain_n, acc_n = (counts(kind.view(x)) for x in (latent[0], plain.latent[0], acc.latent[0]))
    fmt = lambda c: ", ".join(f"{v} {k}" for k, v in c.items() if v) or "nothing"
    panels = [(f"first pass 64 px: {fmt(first_n)}", _to_image(latent[0], side)),
              (f"(a) plain tiling {scale}x: {fmt(plain_n)}", _to_image(plain.latent[0], side)),
              (f"(b) AccDiffusion {scale}x: {fmt(acc_n)}", _to_image(acc.latent[0], side)),
              ("tile prompts of (b), last stage", tile_map)]
    head = 40
    sheet = Image.new("RGB", (side * len(panels) + 10 * (len(panels) - 1), side + head + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, img) in enumerate(panels):
        x = i * (side + 10)
        sheet.paste(img, (x, head))
        draw.text((x + 4, 6), label, fill="black")
    draw.text((4, side + head + 6), f'caption "{caption}", seed {seed}; {kind.name} toy model, '
              f'{demo_command(kind.name, seed, scale)}', fill="black")
    out = Path(out)
    sheet.save(out)
    return out


# --- prompt units: words against phrases (eval --units) --------------------------------------------
def tag_caption(scene: Scene) -> str:
    """The scene as a WebUI-style tag list: "red disk, blue square" (the model was trained on
    sentences: "a red disk and a blue square")."""
    return ", ".join(f"{o.colour} {o.shape}" for o in scene.objects)


CAPTION_STYLES = {"as trained": lambda scene: scene.caption, "tag list": tag_caption}


def unit_configs(style: str) -> dict[str, tuple[str, PhraseRules]]:
    """name → (prompt_units, phrase rules). Connective words only change sentence captions, so
    the tag lists run each phrase mask once."""
    configs: dict[str, tuple[str, PhraseRules]] = {"words": ("words", PhraseRules())}
    for mask in PHRASE_MASKS:
        configs[f"phrases, {mask} mask"] = ("phrases", PhraseRules(mask=mask, connectives=CONNECTIVES))
        if style == "as trained":
            configs[f"phrases, {mask} mask, punctuation only"] = ("phrases", PhraseRules(mask=mask, connectives=()))
    return configs


def object_words(caption: str) -> list[tuple[int, int, str]]:
    """(colour word index, shape word index, colour) of each captioned object."""
    words = [w.text.strip(".,;") for w in split_words(caption)]
    return [(i, i + 1, w) for i, w in enumerate(words[:-1]) if w in COLOURS and words[i + 1] in SHAPES]


def colour_masks(latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """Colour → where the first pass drew that colour (8×8 bool, every blob)."""
    seg = segment(latent_rgb(latent[None])[0], min_area=1)
    out = {}
    for colour, parts in seg.items():
        mask = np.zeros((LATENT, LATENT), bool)
        for part in parts:
            mask |= part
        out[colour] = torch.from_numpy(mask)
    return out


@dataclass
class PlacementCounts:
    """(window, object word) pairs of one config: kept pairs whose object is not under the
    window (misplaced), and pairs whose object is under the window but whose word was dropped."""
    kept: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})
    misplaced: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})
    under: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})
    under_kept: dict[str, int] = field(default_factory=lambda: {"colour": 0, "shape": 0})
    kept_drawn: int = 0  # the same for objects the first pass drew somewhere
    misplaced_drawn: int = 0

    def add(self, keep: torch.Tensor, caption: str, first: torch.Tensor, size: tuple[int, int],
            windows: Sequence) -> None:
        """``keep``: [windows, words] of the caption's words, as the stage's tile prompts kept them."""
        from ...method.prompts import resize_masks, window_shares

        truth = colour_masks(first)
        objects = object_words(caption)
        if not objects:
            return
        masks = torch.stack([truth[c] for _, _, c in objects])
        under = window_shares(resize_masks(masks, size), windows) > 0  # [windows, objects]
        drawn = masks.flatten(1).any(1)[None, :]
        for kind, column in (("colour", 0), ("shape", 1)):
            index = [o[column] for o in objects]
            kept = keep[:, index]
            self.kept_drawn += int((kept & drawn).sum())
            self.misplaced_drawn += int((kept & drawn & ~under).sum())
            self.kept[kind] += int(kept.sum())
            self.misplaced[kind] += int((kept & ~under).sum())
            self.under[kind] += int(under.sum())
            self.under_kept[kind] += int((kept & under).sum())

    def report(self) -> dict[str, float | None]:
        share = lambda a, b: round(a / b, 3) if b else None
        total = lambda d: sum(d.values())
        return {"misplaced_share": share(total(self.misplaced), total(self.kept)),
                "misplaced_share_colour_words": share(self.misplaced["colour"], self.kept["colour"]),
                "misplaced_share_shape_words": share(self.misplaced["shape"], self.kept["shape"]),
                "misplaced_share_drawn_objects": share(self.misplaced_drawn, self.kept_drawn),
                "recall": share(total(self.under_kept), total(self.under))}


def run_units_eval(scenes: int = 50, out: Path | None = Path("toy-eval-units.json"),
                   host: ToyHost | None = None, scales: Sequence[int] = SCALES, chunk: int = 25,
                   styles: Sequence[str] = tuple(CAPTION_STYLES), verbose: bool = True) -> dict:
    """Per caption style (as trained, tag list) and prompt-unit config: extra and lost objects per
    scene at 2× and 3× (AccDiffusion defaults otherwise), and where the tile prompts put the
    object words (misplaced share: kept (window, object word) pairs whose object the first pass
    did not draw under that window; recall: pairs whose object is under the window and whose word
    was kept). The same first passes serve every config of a style."""
    from ...method.hires import stage_windows

    host = host or load_host()
    base_settings = CONFIGS["AccDiffusion defaults"]
    start = time.time()
    scene_list = [make_scene(EVAL_SEED_OFFSET + i) for i in range(scenes)]
    report: dict = {"scenes": scenes, "threshold": base_settings.patch_prompt_threshold, "styles": {}}
    for style in styles:
        captions = [CAPTION_STYLES[style](s) for s in scene_list]
        firsts, recorders = [], []
        for c0 in range(0, scenes, chunk):
            latent, recorder = first_pass(host, captions[c0:c0 + chunk], seed=c0)
            firsts.append(latent)
            recorders.append(recorder)
        first = torch.cat(firsts)
        style_report: dict = {"example": captions[0],
                              "first_pass_caption_match_share":
                                  round(sum(matches_caption(l, c) for l, c in zip(first, captions)) / scenes, 3),
                              "configs": {}}
        per_scene_extra: dict[str, dict[int, list[int]]] = {}
        for name, (units, rules) in unit_configs(style).items():
            settings = replace(base_settings, prompt_units=units)
            rows = {scale: {"extra": [], "lost": [], "words": [], "place": PlacementCounts()} for scale in scales}
            for c0, (latent, rec) in enumerate(zip(firsts, recorders)):
                caps = captions[c0 * chunk:(c0 + 1) * chunk]
                result, stage_latents = upscale_progressive(host, latent, caps, rec, settings, max(scales), seed=c0,
                                                            phrase_rules=rules)
                for stage, up in zip(result.stages, stage_latents):
                    scale = round(stage.scale)
                    if scale not in rows:
                        continue
                    windows = stage_windows(stage, (LATENT, LATENT), settings)
                    for j, one in enumerate(up):
                        index = c0 * chunk + j
                        e, l = duplicates(first[index], one)
                        rows[scale]["extra"].append(e)
                        rows[scale]["lost"].append(l)
                        tiles = result.tile_prompts[stage.index - 1][j] or [caps[j]]
                        rows[scale]["words"].append(np.mean([len(split_words(t)) for t in tiles]))
                        plan = result.plans[j]
                        if plan is not None:
                            keep = plan.keep(stage.size, windows, settings.patch_prompt_threshold)
                            rows[scale]["place"].add(keep, caps[j], first[index], stage.size, windows)
            per_scale = {}
            for scale, r in rows.items():
                extra = np.asarray(r["extra"], float)
                per_scene_extra.setdefault(name, {})[scale] = r["extra"]
                entry = {"extra_per_scene": round(float(extra.mean()), 3),
                         "scenes_with_extra": round(float((extra > 0).mean()), 3),
                         "lost_per_scene": round(float(np.mean(r["lost"])), 3),
                         "words_per_tile_prompt": round(float(np.mean(r["words"])), 2)}
                entry.update({k: v for k, v in r["place"].report().items() if v is not None})
                baseline = per_scene_extra.get("words", {}).get(scale)
                if name != "words" and baseline is not None:  # paired over the same scenes
                    diff = extra - np.asarray(baseline, float)
                    entry["extra_minus_words"] = round(float(diff.mean()), 3)
                    entry["extra_minus_words_se"] = round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 3)
                per_scale[f"{scale}x"] = entry
            style_report["configs"][name] = per_scale
            if verbose:
                print(style, "|", name, json.dumps(per_scale), f"{time.time() - start:.0f} s", flush=True)
        report["styles"][style] = style_report
    report["seconds"] = round(time.time() - start)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def units_table(report: dict) -> str:
    """The markdown table of docs/phrases.md from a ``run_units_eval`` report."""
    pct = lambda v: "–" if v is None else f"{100 * v:.0f} %"

    def delta(entry: dict) -> str:
        if "extra_minus_words" not in entry:
            return ""
        return f" ({entry['extra_minus_words']:+.2f} ± {entry['extra_minus_words_se']:.2f})"

    lines = ["| captions | prompt units | extra objects 2× / 3× (paired difference to words ± s.e.) "
             "| scenes with extra 2× / 3× | lost 2× / 3× | misplaced object words 2× / 3× "
             "| … of drawn objects 2× / 3× | recall 2× / 3× | words per tile prompt 2× / 3× |",
             "|---|---|---|---|---|---|---|---|---|"]
    for style, entry in report["styles"].items():
        for name, scales in entry["configs"].items():
            a, b = scales["2x"], scales["3x"]
            lines.append(
                f"| {style} | {name} | {a['extra_per_scene']:.2f}{delta(a)} / {b['extra_per_scene']:.2f}{delta(b)} "
                f"| {pct(a['scenes_with_extra'])} / {pct(b['scenes_with_extra'])} "
                f"| {a['lost_per_scene']:.2f} / {b['lost_per_scene']:.2f} "
                f"| {pct(a.get('misplaced_share'))} / {pct(b.get('misplaced_share'))} "
                f"| {pct(a.get('misplaced_share_drawn_objects'))} / {pct(b.get('misplaced_share_drawn_objects'))} "
                f"| {pct(a.get('recall'))} / {pct(b.get('recall'))} "
                f"| {a['words_per_tile_prompt']:.1f} / {b['words_per_tile_prompt']:.1f} |")
    return "\n".join(lines)
