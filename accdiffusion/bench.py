"""Benchmark of the engine on a random-weight UNet: ``python -m accdiffusion.bench``.

Prints, per target scale: UNet calls and latent pixels per stage against the formula
((2s−1)² + s²)·steps (per CFG row), tile-prompt encodes per stage, time and peak memory; the
first pass's time with and without attention recording and the recorder's size; and the probe
pass (img2img / Upscale button maps): its UNet calls and time against the tiled pass.

``--probe-agreement``: how well the probe's word masks agree (IoU) with the first pass's own
recorded masks on generated images, per set of probe timesteps (how PROBE_TIMESTEPS was chosen).

CPU default: the tiny SD1-like UNet. On a GPU: ``--device cuda --model sdxl-real --base 128`` (needs diffusers)
times a 1024² → 2048² / 4096² pass with SDXL widths (random weights).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .probe import PROBE_TIMESTEPS, mask_iou
from .prompts import build_word_masks
from .reference import Host, build_unet, first_pass, hires_pass, load_tokenizer, probe_pass, word_positions
from .settings import AccDiffusionSettings

PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, high quality"
AGREEMENT_PROMPTS = (PROMPT, "a red fox sitting in tall grass under a blue sky",
                     "two cats on a sofa next to a window, evening light",
                     "a lighthouse on a rocky coast with waves and seagulls")
TIMESTEP_SETS: tuple[tuple[int, ...], ...] = (
    (200,), (300,), (400,), (500,), (600,), (700,), (800,), (900,),
    (300, 500, 700), (400, 550, 700), (500, 650, 800), (300, 400, 500, 600, 700, 800), (100, 300, 500, 700, 900))


def _masks(host: Host, prompt: str, token_maps: torch.Tensor) -> torch.Tensor:
    words, positions = word_positions(host, prompt)
    masks = build_word_masks(token_maps, positions)
    return masks.masks[masks.located]


def probe_agreement(host: Host, size: tuple[int, int], steps: int, seeds: int = 3,
                    sets: tuple[tuple[int, ...], ...] = TIMESTEP_SETS) -> list[tuple[tuple[int, ...], float, float]]:
    """Per timestep set: mean word-mask IoU of the probe on a generated image against that
    image's first-pass masks, and (control) against the masks of another image of the same prompt
    (another seed): a probe that reads the image beats the control."""
    cases = []
    for prompt in AGREEMENT_PROMPTS:
        for seed in range(seeds):
            latent, recorder = first_pass(host, [prompt], "", size, steps, seed=seed)
            cases.append((prompt, seed, latent, _masks(host, prompt, recorder.maps(0))))
    out = []
    for timesteps in sets:
        own, other = [], []
        for i, (prompt, seed, latent, first_masks) in enumerate(cases):
            recorder, _ = probe_pass(host, latent, [prompt], [seed], timesteps)
            probe_masks = _masks(host, prompt, recorder.maps(0))
            own.append(float(mask_iou(probe_masks, first_masks).mean()))
            control = next(c for c in cases if c[0] == prompt and c[1] != seed)
            other.append(float(mask_iou(probe_masks, control[3]).mean()))
        out.append((timesteps, sum(own) / len(own), sum(other) / len(other)))
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Peak CUDA allocation, or on the CPU the peak resident size above the start (polled)."""
    out = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - start
        return
    start, stop = _rss_bytes(), threading.Event()
    peak = [start]

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = peak[0] - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="sd1", choices=["sd1", "sdxl", "sdxl-size", "sdxl-real"])
    parser.add_argument("--base", type=int, default=32, help="first-pass latent side (image px / 8)")
    parser.add_argument("--scales", default="2,3,4")
    parser.add_argument("--steps", type=int, default=4, help="hires steps per stage")
    parser.add_argument("--first-steps", type=int, default=4)
    parser.add_argument("--denoise", type=float, default=0.6)
    parser.add_argument("--tile-batch-size", type=int, default=4)
    parser.add_argument("--fp16", action="store_true", help="autocast to float16 (GPU)")
    parser.add_argument("--probe-agreement", action="store_true",
                        help="only measure probe/first-pass word-mask agreement per timestep set")
    parser.add_argument("--tokenizer", default=os.environ.get(
        "ACCDIFFUSION_TOKENIZER_DIR", str(here.parent / "shared" / "tinymodel" / "clip-text-tiny")))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    host = Host(build_unet(args.model), load_tokenizer(args.tokenizer),
                vector_conditioning=args.model != "sd1").to(device)
    size = (args.base, args.base)
    settings = AccDiffusionSettings(enabled=True, tile_batch_size=args.tile_batch_size)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=args.fp16)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"model {args.model}, UNet params {sum(p.numel() for p in host.unet.parameters()) / 1e6:.1f} M, "
          f"first pass {args.base * 8}x{args.base * 8} px, hires steps {args.steps}, "
          f"denoise {args.denoise}, tile batch {args.tile_batch_size}, fp16 {args.fp16}")

    if args.probe_agreement:
        print(f"probe agreement: word-mask IoU with the first pass's own maps ({len(AGREEMENT_PROMPTS)} prompts x 3 "
              f"seeds, first pass {args.first_steps} steps); control = another seed's first pass")
        with autocast:
            for timesteps, own, other in probe_agreement(host, size, args.first_steps):
                mark = " (PROBE_TIMESTEPS)" if tuple(timesteps) == PROBE_TIMESTEPS else ""
                print(f"  t = {','.join(map(str, timesteps)):<28} own {own:.3f}  control {other:.3f}  "
                      f"margin {own - other:+.3f}{mark}")
        return

    with autocast:
        first_pass(host, [PROMPT], "", size, 1, seed=0)  # warm-up
        timings = {}
        for record in (False, True, False, True):
            _sync(device)
            start = time.perf_counter()
            latent, recorder = first_pass(host, [PROMPT], "", size, args.first_steps, seed=0, record=record)
            _sync(device)
            timings.setdefault(record, []).append(time.perf_counter() - start)
    plain, recorded = min(timings[False]), min(timings[True])
    print(f"first pass: {plain:.3f} s plain, {recorded:.3f} s recording, ratio {recorded / plain:.3f}; "
          f"recorder holds {recorder.nbytes()} bytes (grid {recorder.grid[0]}x{recorder.grid[1]}, "
          f"{recorder.sums.shape[1]} tokens, 1 image)")

    with autocast:
        probe_times = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            _, probe_stats = probe_pass(host, latent, [PROMPT], [0])
            _sync(device)
            probe_times.append(time.perf_counter() - start)
    probe_time = min(probe_times)
    print(f"probe pass at {args.base * 8}x{args.base * 8} px: {probe_stats.unet_calls} UNet calls "
          f"(timesteps {PROBE_TIMESTEPS}, positive prompt only), {probe_time:.3f} s")

    for scale in [int(s) for s in args.scales.split(",")]:
        target = (args.base * scale, args.base * scale)
        with autocast, peak_memory(device) as mem:
            _sync(device)
            start = time.perf_counter()
            result = hires_pass(host, latent, [PROMPT], "", recorder, settings, target, args.steps,
                                args.denoise, seed=0)
            _sync(device)
            elapsed = time.perf_counter() - start
        print(f"\n{scale}x -> {target[1] * 8}x{target[0] * 8} px: {elapsed:.2f} s "
              f"({elapsed / (args.steps * len(result.stages)):.3f} s per step on average), "
              f"peak memory {mem['peak'] / 2**20:.1f} MiB")
        for stage, stats, encodes in zip(result.stages, result.stage_stats, result.stage_encodes):
            s = stage.dilation
            formula = ((2 * s - 1) ** 2 + s * s) * args.steps
            print(f"  stage {stage.index} ({stage.scale:g}x, latent {stage.size[1]}x{stage.size[0]}, s={s}): "
                  f"{stats.unet_calls} UNet calls, {stats.window_evals // 2} window evals per CFG row "
                  f"(formula ((2s-1)^2 + s^2)*steps = {formula}), "
                  f"{stats.latent_pixels / 2 / 1e6:.3f} M latent px per row, "
                  f"{encodes} tile-prompt encodes")
        calls = sum(st.unet_calls for st in result.stage_stats)
        print(f"  probe vs this tiled pass: {probe_stats.unet_calls} / {calls} UNet calls, "
              f"{probe_time:.3f} / {elapsed:.2f} s = {100 * probe_time / elapsed:.2f} % of the time")


if __name__ == "__main__":
    main()
