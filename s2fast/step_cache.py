"""BlockCache: an opt-in step cache for every lane of s2fast's engine (uncond, cond and the sub-networks).

Step caches (FirstBlockCache, TeaCache, MagCache) skip most of the transformer on steps where the input to the
late blocks barely changed, adding the residual the skipped blocks produced at the last step they ran. Those
in diffusers tell branches apart by call parity or batch halves, so they know two: uncond and cond. s2fast runs
every block itself, lane by lane, so it keeps one residual per branch *and* per sub-network.

The rule (FirstBlockCache's, generalised to the first n blocks, not accumulated):

- every step runs the first ``probe_blocks`` = n blocks on every lane (n ≥ 1, all before any block a sub-network
  may drop, so the rows are still shared);
- the change is the relative L1 of the cond rows' residual over those n blocks, r = h_n − h_0, against r_ref, the
  same residual at the last fully computed step: ``mean|r − r_ref| / mean|r_ref|`` in fp32. r_ref changes only at
  full steps, so the change is measured against the last full step, never summed over the cached steps between
  (TeaCache's accumulated, rescaled L1 is the other common rule; this one needs no per-model polynomial). With
  n = 1 it is diffusers' FirstBlockCache's measure, taken on the cond rows alone: FirstBlockCache measures whatever
  batch its transformer call holds (both branches where a pipeline batches [cond, uncond], as DiT and the digits
  pipeline do, so it may cache other steps: 28 of 50 against 30 on the digits model at threshold 0.1,
  evaluation/s2fast_eval/digits/cache_quality.py fbc), and each branch apart where a pipeline calls twice a step;
- strictly under ``threshold``, the step is *cached*: the remaining blocks run on no lane and each group of rows
  takes h_n + R, R being its own residual (output minus h_n) from the last full step: U, C and each sub-network
  keep their own, keyed by role (uncond, cond, sub-network m), never mixed. Otherwise the step runs fully and
  stores new residuals and r_ref;
- the first and the last step, the first ``warmup_steps``, a step whose denoiser is not the one of the step
  before (Wan 2.2's expert switch: each expert keeps its own store) and any step whose rows the store lacks a
  residual for (a first step with CFG after steps without, a new input shape) run fully.

The sub-network's residual when the mask changes every step. S² draws a new random mask per step, so the
sub-network of a cached step is not the one whose residual is stored. ``subnet="reuse"`` (default) adds the stored
residual anyway: the cached step's sub-network prediction is that of the *last full step's mask*, moved by the
cond rows' change over the first n blocks, and since U and C are cached alike, D_s − D_c on a cached step is
exactly R_s − R_c of the last full step: the S² correction is held, as the CFG difference is (the trace reports it
as "reused"). ``subnet="recompute"`` runs the sub-network alone on the step's own mask over the blocks after the
probe (the U and C rows stay cached): an exact sub-network on an approximate cond, which costs L − n − d
block-rows per cached step instead of none. benchmarks/test_step_cache_cost.py counts both.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Hashable, List, Optional, Tuple

if TYPE_CHECKING:  # importing s2fast stays cheap: S2Config holds a BlockCache, and torch loads with wrap
    import torch

SUBNET_MODES = ("reuse", "recompute")


@dataclass(frozen=True)
class BlockCache:
    """A step cache for :class:`s2fast.S2Config` and :class:`s2fast.SGGConfig` (``cache=s2fast.BlockCache()``).

    Like every step cache it changes the output: a cached step adds the residuals of the last full step instead of
    running the late blocks. ``threshold=0`` caches no step (the result is the uncached one, bit for bit).
    ``s2fast.trace_steps(pipe)`` reports which steps ran fully.

    Args:
        threshold: skip a step's remaining blocks when the relative L1 change of the cond rows' residual over the
            first ``probe_blocks`` blocks, against the last full step, is strictly below this (diffusers'
            FirstBlockCache's measure on the cond rows; its default is 0.05). Higher skips more. Finite and ≥ 0.
        warmup_steps: the first steps that always run fully (the first and the last step always do). ≥ 0.
        probe_blocks: n, the blocks every step runs on every lane before deciding. At least 1 and at most the
            first block a sub-network can drop (S²: the first block outside ``protected_blocks``; SGG: the first
            of ``skip_blocks``), checked when the config is built and against the model at wrap.
        subnet: what a cached step does for the sub-network rows: ``"reuse"`` (default) adds the sub-network's
            residual of the last full step (whose mask was another one: the S² correction is held); ``"recompute"``
            runs the sub-network alone on the step's own mask over the blocks after the probe.
    """

    threshold: float = 0.05
    warmup_steps: int = 0
    probe_blocks: int = 1
    subnet: str = "reuse"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t)):
            raise ValueError(f"BlockCache.threshold must be a finite number, got {t!r}")
        if float(t) < 0:
            raise ValueError(f"BlockCache.threshold must be >= 0 (0 caches no step), got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        for name, low in (("warmup_steps", 0), ("probe_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"BlockCache.{name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.subnet not in SUBNET_MODES:
            raise ValueError(f"BlockCache.subnet must be one of {SUBNET_MODES}, got {self.subnet!r}")

    def check_first_droppable(self, first: Optional[int], owner: str, what: str) -> None:
        """ValueError when the probe reaches block ``first``, the first block a sub-network of ``owner`` may drop."""
        if first is not None and self.probe_blocks > first:
            raise ValueError(f"{owner}.cache: BlockCache.probe_blocks={self.probe_blocks} runs blocks 0 to "
                             f"{self.probe_blocks - 1} on every lane, but {what} {first} may be dropped: "
                             f"probe_blocks must be at most {first}")

    def check_blocks(self, num_blocks: int, owner: str) -> None:
        if self.probe_blocks >= num_blocks:
            raise ValueError(f"{owner}.cache: BlockCache.probe_blocks={self.probe_blocks} leaves no block to skip on "
                             f"a model of {num_blocks} blocks: it must be at most {num_blocks - 1}")


Role = Tuple[str, int]  # ("uncond", 0), ("cond", 0) or ("subnet", m): whose residual


def role(output: int, count: int, cond_branch: int) -> Role:
    """The role of the engine's prediction ``output`` (branches first, then sub-networks) in a step of ``count``
    branches."""
    if output < count:
        return ("cond", 0) if output == cond_branch else ("uncond", 0)
    return ("subnet", output - count)


@dataclass
class CacheStore:
    """One denoiser's residuals within one pipeline call (the controller keeps one per denoiser and call)."""

    reference: Optional[torch.Tensor] = None            # r_ref: the cond rows' probe residual at the last full step
    residuals: Dict[Role, List[Optional[torch.Tensor]]] = field(default_factory=dict)  # per flow slot
    signature: Optional[Hashable] = None                # the shapes the residuals were stored for

    def clear(self) -> None:
        self.reference, self.residuals, self.signature = None, {}, None


@dataclass
class StepCache:
    """What the engine needs for one step under a BlockCache, and what it reports back (``cached``)."""

    config: BlockCache
    store: CacheStore
    may_cache: bool                  # False: a step that runs fully whatever the change (first, last, warm-up, ...)
    cached: bool = False             # set by the predictor: whether the step skipped its late blocks
    change: Optional[float] = None   # the measured relative L1 change (None where not measured)

    @property
    def probe_blocks(self) -> int:
        return self.config.probe_blocks

    @property
    def recompute_subnets(self) -> bool:
        return self.config.subnet == "recompute"

    def decide(self, probe: torch.Tensor, needed: List[Role], signature: Hashable) -> bool:
        """Whether this step is cached, given the cond rows' probe residual ``probe`` and the roles it needs a
        stored residual for. A step whose shapes differ from the store's clears it first."""
        store = self.store
        if store.signature != signature:
            store.clear()
        self.cached = False
        if not self.may_cache or store.reference is None or any(r not in store.residuals for r in needed):
            return False
        self.change = relative_l1(probe, store.reference)
        self.cached = self.change < self.config.threshold
        return self.cached

    def keep(self, probe: torch.Tensor, residuals: Dict[Role, List[Optional[torch.Tensor]]], signature) -> None:
        """After a full step: its probe residual and every group's residual become the store."""
        self.store.reference = probe
        self.store.residuals = residuals
        self.store.signature = signature


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    """mean|now − before| / mean|before| in fp32 (inf where ``before`` is all zeros: such a step runs fully)."""
    now, before = now.float(), before.float()
    value = ((now - before).abs().mean() / before.abs().mean()).item()  # one host sync a step, as FirstBlockCache
    return value if math.isfinite(value) else float("inf")
