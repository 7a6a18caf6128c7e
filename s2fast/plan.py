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

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

from . import masks as mask_sampling
from .config import Mask


@dataclass(frozen=True)
class StepGuidance:
    subnets: Tuple[Mask, ...] = ()
    uncond: bool = True           # compute the uncond rows where the pipeline runs CFG (else D has no CFG term)
    guidance_offset: float = 0.0  # λ_i = the pipeline's λ + this (0.0 keeps λ bit for bit)
    omega: float = 0.0            # ω_i, the scale of the subtracted sub-network term
    # S̄ − D_c is the stored correction Δ of an earlier step of this denoiser: ``subnets`` (the masks drawn for the
    # step, which trace reports) are not run (S2Config.correction_every, see with_correction_reuse)
    reuse_correction: bool = False

    @property
    def computes_subnets(self) -> bool:
        return bool(self.subnets) and not self.reuse_correction

    @property
    def correction(self) -> str:
        """What the step does with the sub-network term, as s2fast.trace_steps reports it."""
        if not self.subnets or self.omega == 0:
            return "none"
        return "reused" if self.reuse_correction else "computed"


def guidance_steps(config, num_steps: int, num_blocks: int, seed: Optional[int] = None,
                   sigmas: Optional[Sequence[float]] = None) -> List[StepGuidance]:
    """The plan of every step of one pipeline call for a denoiser of ``num_blocks`` blocks; ``sigmas`` are the
    scheduler's noise levels of the call (S²'s sigma_interval reads them)."""
    own = getattr(config, "guidance_steps", None)
    if own is not None:
        return own(num_steps, num_blocks, seed)
    masks = mask_sampling.schedule(config, num_steps, num_blocks, seed=seed, sigmas=sigmas)
    return [StepGuidance(m, omega=config.omega) for m in masks]


def with_correction_reuse(config, step: StepGuidance, reused_since: Optional[int]) -> StepGuidance:
    """``step`` as it runs under ``config.correction_every`` = k, for a denoiser whose stored correction Δ has been
    reused on ``reused_since`` S² steps since the step that computed it (None: no Δ stored in this call, at the
    denoiser's first S² step, which for Wan 2.2's second expert is the first after the switch).

    Only S² steps count (a mask and ω > 0; the plain CFG steps outside the interval neither compute nor age Δ): the
    first computes, then every k-th. A reuse step keeps its mask in the plan, so the masks of computed steps are
    those of k = 1 and trace replays a call with the same k. k = 1 returns ``step`` itself: nothing changes."""
    every = getattr(config, "correction_every", 1)
    if every == 1 or not step.subnets or step.omega == 0 or reused_since is None or reused_since >= every - 1:
        return step
    return replace(step, reuse_correction=True)


def warmup_subnets(config, num_blocks: int) -> Tuple[Mask, ...]:
    """Sub-networks whose lanes cover every (block, lane) call a later step of ``config`` makes (the block graphs
    of s2fast/graphs.py are captured from them). A method with its own plan (``warmup_subnets`` on the config, as
    SGGConfig has) gives its fixed sub-networks.

    S²: sub-networks that fork at the first droppable block p and drop only it: every later mask forks at p or
    after, so its lanes run a subset of the (block, lane) calls these make (fork_mode "separate"). None when no
    step can run a sub-network (ω = 0, as s2fast's CFG baseline, or explicit masks that are all empty): the
    sub-network lanes would hold graphs that are never replayed."""
    own = getattr(config, "warmup_subnets", None)
    if own is not None:
        return own(num_blocks)
    explicit = config.step_masks()
    if config.omega == 0 or (explicit is not None and not any(explicit)):
        return ()
    droppable = [b for b in range(num_blocks) if b not in config.protected_blocks]
    if not droppable or num_blocks < 2:  # a model with nothing to drop: no call of it runs a sub-network
        return ()
    return ((droppable[0],),) * config.num_masks


def warmup_predictions(config, num_blocks: int, fork_mode: Optional[str] = None) -> Tuple[Tuple[Mask, ...], ...]:
    """The sub-networks of each discarded warm-up prediction before block graphs serve ``config``'s steps:
    together they make every (block, lane, rows) call any later step can make, so sampling replays graphs and
    never captures. A method with its own plan warms up its fixed sub-networks in one prediction.

    S²: a sub-network lane forks at its first dropped block (reuse_prefix) or at block 0, and the first droppable
    block p is the earliest any mask forks. fork_mode "separate": one prediction whose sub-networks fork as early
    as any can and skip as little as any can — drop only p (reuse_prefix), or nothing (forking at 0). fork_mode
    "join": the sub-network rows ride in the [uncond, cond] lane, whose row count at a block is 2 + the
    sub-networks that run it, anything from 2 to 2 + num_masks: prediction c has c sub-networks that drop every
    droppable block and the others drop as little as possible, so c = 0 … num_masks cover every row count at
    every block. ``fork_mode``: the mode the engine runs (what "auto" chose); the config's when None."""
    subnets = warmup_subnets(config, num_blocks)
    if getattr(config, "warmup_subnets", None) is not None:
        return (subnets,)
    if not subnets:
        return ((),)
    droppable = tuple(b for b in range(num_blocks) if b not in config.protected_blocks)
    light = subnets[0] if config.reuse_prefix else ()
    if not (config.batch_branches and (fork_mode or config.fork_mode) == "join"):
        return ((light,) * config.num_masks,)
    n = config.num_masks
    return tuple((light,) * (n - c) + (droppable,) * c for c in range(n + 1))


def num_masks(config) -> int:
    """Sub-networks per step as trace reports them (S² may average several; the other methods use one)."""
    return getattr(config, "num_masks", 1)
