"""How many windows go into one UNet call: ``tile_batch_size``, or 0 = automatic.

Automatic on CUDA: the first call of each window shape runs one window (× its CFG rows) alone and
records the peak memory it allocated; from then on a call takes as many windows as fit in the
free memory (device free + the allocator's reserved-but-unused), less a margin. On any other
device a fixed small batch (:data:`CPU_TILE_BATCH`): there, memory is rarely the limit and larger
batches gain nothing.

Everything that touches the device goes through injectable queries, so tests drive the choice
with stand-in memory numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

import torch

CPU_TILE_BATCH = 4
MAX_TILE_BATCH = 64  # the setting's own maximum
MARGIN_FRACTION = 0.2  # of the free memory, kept for fragmentation and per-call workspace
MARGIN_BYTES = 512 * 2**20  # kept in any case (other extensions, the VAE, the sampler's state)


def fit_tile_batch(free_bytes: int, window_bytes: int, margin_fraction: float = MARGIN_FRACTION,
                   margin_bytes: int = MARGIN_BYTES, maximum: int = MAX_TILE_BATCH) -> int:
    """The largest batch b (1 ≤ b ≤ maximum) with b·window_bytes ≤ free·(1 − margin) − margin_bytes;
    1 when not even one window fits that budget (one window per call is the least we can do)."""
    budget = free_bytes * (1.0 - margin_fraction) - margin_bytes
    if window_bytes <= 0:
        return maximum
    return int(max(1, min(maximum, budget // window_bytes)))


class MemoryProbe(Protocol):
    def free_bytes(self) -> int:
        """Memory a new allocation can still use on the device."""

    def window_bytes(self) -> int:
        """Peak memory of one window's UNet evaluation (all its rows), as the host runs it."""


def resolve_tile_batch(settings: Any, device: torch.device | str, probe: MemoryProbe | None = None) -> int:
    """Windows per UNet call: the user's ``tile_batch_size`` (``settings`` or the int itself) when
    set; 0 = automatic: on CUDA the most that fit (``probe`` measures), elsewhere
    :data:`CPU_TILE_BATCH`."""
    tile_batch_size = getattr(settings, "tile_batch_size", settings)
    if tile_batch_size:
        return int(tile_batch_size)
    if torch.device(device).type != "cuda" or probe is None:
        return CPU_TILE_BATCH
    return fit_tile_batch(probe.free_bytes(), probe.window_bytes())


def planned_tile_batch(tile_batch_size: int, auto: "AutoTileBatch | None", device: torch.device | str) -> int:
    """Windows per UNet call as known before or while a stage runs (for a host's memory estimate):
    the setting when set; automatic: where it applies (CUDA), the largest batch chosen so far in
    the job (1 before the first measurement, whose call runs one window alone), elsewhere
    :data:`CPU_TILE_BATCH`."""
    if tile_batch_size:
        return int(tile_batch_size)
    if auto is None or not auto.applies(torch.device(device)):
        return CPU_TILE_BATCH
    return max(auto.chosen.values(), default=1)


def cuda_free_bytes(device: torch.device) -> int:
    """Free device memory plus what torch's allocator holds reserved but unused (it reuses that
    before asking the driver)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def cuda_peak_of(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """Run once and return (output, peak bytes allocated above what was allocated before).
    Resets the device's peak statistic (the WebUI's own peak read-out then starts from here)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    torch.cuda.synchronize(device)
    return out, int(torch.cuda.max_memory_allocated(device) - before)


@dataclass
class AutoTileBatch:
    """Measured per-window costs (per window shape, rows, dtype) and the batch chosen from them.
    One instance may serve every stage of a job, so each shape is measured once."""
    free_bytes: Callable[[torch.device], int] = cuda_free_bytes
    peak_of: Callable[[Callable[[], torch.Tensor], torch.device], tuple[torch.Tensor, int]] = cuda_peak_of
    applies: Callable[[torch.device], bool] = lambda device: device.type == "cuda"
    costs: dict[Hashable, int] = field(default_factory=dict)
    chosen: dict[Hashable, int] = field(default_factory=dict)

    def measure(self, key: Hashable, run: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        out, cost = self.peak_of(run, device)
        self.costs[key] = max(1, cost)
        return out

    def batch(self, key: Hashable, device: torch.device) -> int:
        probe = _Probe(self.free_bytes(device), self.costs[key])
        self.chosen[key] = resolve_tile_batch(0, "cuda", probe)
        return self.chosen[key]


@dataclass(frozen=True)
class _Probe:
    free: int
    cost: int

    def free_bytes(self) -> int:
        return self.free

    def window_bytes(self) -> int:
        return self.cost


def batch_key(xs: torch.Tensor, rows_per_item: int) -> tuple[Any, ...]:
    return tuple(xs.shape[-2:]), rows_per_item, xs.dtype
