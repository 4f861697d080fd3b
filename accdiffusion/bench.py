"""Benchmark of the engine on a random-weight UNet: ``python -m accdiffusion.bench``.

Prints, per target scale: UNet calls and latent pixels per stage against the formula
((2s−1)² + s²)·steps (per CFG row), tile-prompt encodes per stage, time and peak memory; plus the
first pass's time with and without attention recording and the recorder's size.

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

from .reference import Host, build_unet, first_pass, hires_pass, load_tokenizer
from .settings import AccDiffusionSettings

PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, high quality"


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


if __name__ == "__main__":
    main()
