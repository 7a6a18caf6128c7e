"""The per-step plan a guidance config gives the controller: which rows to compute and how to combine them.

Every method s2fast runs is the same combination of the engine's predictions,

    D = D_u + λ_i (D_c − D_u) − ω_i (S̄ − D_c)      (D = D_c − ω_i (S̄ − D_c) without uncond rows)

with a plan per step: the sub-networks (S̄ is their mean), whether the uncond rows are computed where the pipeline
runs CFG, λ_i as an offset to the pipeline's own guidance scale, and ω_i. S²-Guidance (S2Config) drops random
blocks with a fixed ω; segmented guidance (SGGConfig, s2fast/sgg.py) switches CFG and skip-layer guidance on and off
by step. A new method is a config with ``guidance_steps`` and ``warmup_subnets`` (as SGGConfig has) and
``check_blocks``, plus the engine options of S2Config; a new model family is an adapter, whatever the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .config import Mask


@dataclass(frozen=True)
class StepGuidance:
    subnets: Tuple[Mask, ...] = ()
    uncond: bool = True           # compute the uncond rows where the pipeline runs CFG (else D has no CFG term)
    guidance_offset: float = 0.0  # λ_i = the pipeline's λ + this (0.0 keeps λ bit for bit)
    omega: float = 0.0            # ω_i, the scale of the subtracted sub-network term


def guidance_steps(config, num_steps: int, num_blocks: int, seed: Optional[int] = None,
                   sigmas: Optional[Sequence[float]] = None) -> List[StepGuidance]:
    """The plan of every step of one pipeline call for a denoiser of ``num_blocks`` blocks; ``sigmas`` are the
    scheduler's noise levels of the call (S²'s sigma_interval reads them)."""
    own = getattr(config, "guidance_steps", None)
    if own is not None:
        return own(num_steps, num_blocks, seed)
    from . import masks as mask_sampling

    masks = mask_sampling.schedule(config, num_steps, num_blocks, seed=seed, sigmas=sigmas)
    return [StepGuidance(m, omega=config.omega) for m in masks]


def warmup_subnets(config, num_blocks: int) -> Tuple[Mask, ...]:
    """Sub-networks whose lanes cover every (block, lane) graph a later step of ``config`` needs (s2fast/graphs.py)."""
    own = getattr(config, "warmup_subnets", None)
    if own is not None:
        return own(num_blocks)
    from .graphs import warmup_subnets as s2_warmup

    return s2_warmup(num_blocks, config)


def warmup_predictions(config, num_blocks: int, fork_mode: str) -> Tuple[Tuple[Mask, ...], ...]:
    """The sub-networks of each discarded warm-up prediction before graphs serve ``config``'s steps: a method with
    its own plan warms up its fixed sub-networks; S² those of graphs.warmup_predictions (every row count a
    joined lane can have)."""
    if getattr(config, "warmup_subnets", None) is not None:
        return (warmup_subnets(config, num_blocks),)
    from .graphs import warmup_predictions as s2_predictions

    return s2_predictions(num_blocks, config, fork_mode)


def num_masks(config) -> int:
    """Sub-networks per step as trace reports them (S² may average several; the other methods use one)."""
    return getattr(config, "num_masks", 1)
