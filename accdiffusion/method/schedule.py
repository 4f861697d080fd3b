"""Cosine factors of the DemoFusion frame, as functions of the real timestep t.

cf(t) = ½(1 + cos(π(T − t)/T)) falls from 1 at t = T to 0 at t = 0.
c1 = cf^cs1 weighs the skip residual, c2 = cf^cs2 the dilated branch, c3 = 0.99·cf^cs3 + 0.01
scales the blur of the dilated branch's input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000


def cosine_factor(t: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    t = min(max(float(t), 0.0), float(num_train_timesteps))
    return 0.5 * (1.0 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps))


@dataclass(frozen=True)
class StepFactors:
    cf: float
    c1: float  # skip residual weight
    c2: float  # dilated branch weight
    c3: float  # blur scale


def step_factors(t: float, cosine_scale_1: float, cosine_scale_2: float, cosine_scale_3: float,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> StepFactors:
    cf = cosine_factor(t, num_train_timesteps)
    return StepFactors(cf=cf, c1=cf ** cosine_scale_1, c2=cf ** cosine_scale_2,
                       c3=0.99 * cf ** cosine_scale_3 + 0.01)


SigmaToT = Callable[[torch.Tensor], torch.Tensor]


def timestep_of(sigma: torch.Tensor | float, sigma_to_t: SigmaToT) -> float:
    """The real (fractional) timestep of a k-diffusion sigma, through the model wrapper's own
    discrete-schedule mapping, so the factors follow the timestep, not a step index."""
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[:1]
    return float(sigma_to_t(sigma_t).reshape(-1)[0])
