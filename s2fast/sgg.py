"""SGGConfig: segmented guidance (SGG, Yuan et al.) and skip-layer guidance (SLG) on s2fast's engine.

SGG switches, by step, between CFG (condition-dependent) and skip-layer guidance (condition-agnostic: the cond pass
with a few blocks skipped). Its plan per step is which rows the engine computes (uncond or not, the skip rows or
not) and which scales combine them; the engine (s2fast/engine.py) and the adapters are the ones S² uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

from .config import EngineSettings, _as_sequence, _index_tuple, _real, _short
from .masks import in_interval
from .plan import StepGuidance

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True, repr=False)
class SGGConfig(EngineSettings):
    """Options of segmented guidance for :func:`s2fast.wrap` (used like :class:`s2fast.S2Config`).

    Per denoising step ``i`` of ``N``, with the pipeline's own guidance scale λ (a window ``(a, b)`` holds the steps
    with ``a·N ≤ i < b·N``)::

        D = D_u + λ_i (D_c − D_u)   inside cfg_window, else D = D_c (no uncond rows are computed)
        D ← D + s_i (D_c − D_skip)  inside skip_window

    where D_skip is the cond prediction with ``skip_blocks`` skipped (a skipped block's output is its input). The
    skip rows are forked off the cond rows at ``min(skip_blocks)``, so the blocks before it run once. Where the
    pipeline itself runs without CFG (guidance scale ≤ 1, Flux without true CFG) there are no uncond rows and
    cfg_window has no effect. Where the pipeline runs CFG but the step is outside cfg_window, the pipeline is handed
    a value its own CFG line turns into D exactly.

    Skip-layer guidance as SD3.5 uses it (diffusers' ``skip_guidance_layers=[7, 8, 9]``, scale 2.8, start 0.01, stop
    0.2) is ``SGGConfig(cfg_window=(0.0, 1.0), skip_window=(0.01, 0.2), skip_blocks=(7, 8, 9), skip_scale=2.8)``.

    Args:
        cfg_window: ``(start, stop)`` fractions of the steps where CFG applies, ``0 ≤ start < stop ≤ 1``.
            Default ``(0.0, 0.5)``: the first half (SGG's split).
        skip_window: ``(start, stop)`` fractions of the steps where skip-layer guidance applies. Default
            ``(0.5, 1.0)``. The windows may overlap (both terms apply) or leave steps with neither (D = D_c).
        skip_blocks: the block indices the skip pass skips (SD3-medium: ``(7, 8, 9)``, the default). Positions in
            the family's ordered block list (Flux: the double-stream blocks, then the single-stream ones); checked
            against the model at :func:`~s2fast.wrap` (an index past the last block, or every block, is refused).
        skip_scale: s, the scale of the skip term. Default 3.0. Any finite number.
        cfg_schedule: ``"constant"`` (λ_i = λ) or ``"linear"``: λ_i = λ + cfg_delta · (1 − 2 · progress), where
            progress runs from 0 at the window's first step to 1 at its last (0 for a window of one step), so λ_i
            goes from λ + cfg_delta down to λ − cfg_delta.
        cfg_delta: the linear schedule's half range for λ (finite). Ignored by ``"constant"``.
        skip_schedule: ``"constant"`` or ``"linear"``, as cfg_schedule, for s_i across skip_window.
        skip_delta: the linear schedule's half range for s (finite).
        batch_branches, reuse_prefix, fork_mode, fused_step, step_mode, cuda_graphs, attention, compile_blocks,
        branch_parallel, cache:
            how the engine runs the rows, exactly as in :class:`s2fast.S2Config` (same defaults, same meaning).
    """

    cfg_window: Tuple[float, float] = (0.0, 0.5)
    skip_window: Tuple[float, float] = (0.5, 1.0)
    skip_blocks: Tuple[int, ...] = (7, 8, 9)
    skip_scale: float = 3.0
    cfg_schedule: str = "constant"
    cfg_delta: float = 0.0
    skip_schedule: str = "constant"
    skip_delta: float = 0.0

    def __post_init__(self) -> None:
        # Every check runs before any field is normalised: a ValueError leaves nothing half-built behind.
        values = {
            "cfg_window": _window("cfg_window", self.cfg_window),
            "skip_window": _window("skip_window", self.skip_window),
            "skip_blocks": _blocks(self.skip_blocks),
            "skip_scale": _number("skip_scale", self.skip_scale),
            "cfg_schedule": _schedule("cfg_schedule", self.cfg_schedule),
            "cfg_delta": _number("cfg_delta", self.cfg_delta),
            "skip_schedule": _schedule("skip_schedule", self.skip_schedule),
            "skip_delta": _number("skip_delta", self.skip_delta),
        }
        self._check_engine()
        if self.cache is not None:
            self.cache.check_first_droppable(min(values["skip_blocks"]), "SGGConfig", "skip_blocks drops block")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes) -> "SGGConfig":
        """A copy with some fields changed (validated like the original)."""
        return replace(self, **changes)

    def check_blocks(self, num_blocks: int) -> None:
        """Validate skip_blocks against a model with ``num_blocks`` blocks (called by wrap)."""
        if self.cache is not None:
            self.cache.check_blocks(num_blocks, "SGGConfig")
        for b in self.skip_blocks:
            if b >= num_blocks:
                raise ValueError(f"SGGConfig.skip_blocks names block {b}, but the model has {num_blocks} blocks "
                                 f"(0 to {num_blocks - 1})")
        if len(self.skip_blocks) >= num_blocks:
            raise ValueError(f"SGGConfig.skip_blocks {self.skip_blocks} covers all {num_blocks} blocks: the skip pass "
                             "would skip the whole model")

    # --- the plan the controller follows (s2fast/plan.py) --------------------------------------------------------
    def guidance_steps(self, num_steps: int, num_blocks: int, seed: Optional[int] = None) -> List[StepGuidance]:
        """What every step of a ``num_steps``-step call computes and how it combines it (``seed`` is unused: the
        plan is deterministic)."""
        cfg_offsets = _offsets(self.cfg_window, self.cfg_schedule, self.cfg_delta, num_steps)
        skip_offsets = _offsets(self.skip_window, self.skip_schedule, self.skip_delta, num_steps)
        plan = []
        for i in range(num_steps):
            cfg = in_interval(i, num_steps, self.cfg_window)
            scale = self.skip_scale + skip_offsets[i] if in_interval(i, num_steps, self.skip_window) else 0.0
            # s_i = 0 (a schedule through zero, or skip_scale 0) adds nothing: the skip rows are not computed
            subnets = (self.skip_blocks,) if scale != 0 else ()
            plan.append(StepGuidance(subnets, uncond=cfg, guidance_offset=cfg_offsets[i] if cfg else 0.0,
                                     omega=scale))
        if any(step.subnets for step in plan):  # checked here too, for calls whose skip window holds no step at wrap
            self.check_blocks(num_blocks)
        return plan

    def subnets_needed(self) -> Optional[bool]:
        """Whether a pipeline call computes the skip pass: True for every call (a non-zero skip scale at step 0),
        False for none (a zero scale throughout), None where it depends on the call's step count (as
        S2Config.subnets_needed)."""
        if not self.warmup_subnets(len(self.skip_blocks) + 1):
            return False
        first = self.skip_scale + (self.skip_delta if self.skip_schedule == "linear" else 0.0)
        return True if self.skip_window[0] == 0 and first != 0 else None

    def warmup_subnets(self, num_blocks: int) -> Tuple[Tuple[int, ...], ...]:
        """The sub-networks of a graph warm-up: the skip pass itself (every step forks it at the same block)."""
        ever = self.skip_scale != 0 or (self.skip_schedule == "linear" and self.skip_delta != 0)
        return (self.skip_blocks,) if ever else ()


def _offsets(window: Tuple[float, float], schedule: str, delta: float, num_steps: int) -> List[float]:
    """Per step, what the schedule adds to the base value: 0 for "constant"; delta · (1 − 2 · progress) across the
    window's steps for "linear" (0 outside the window)."""
    offsets = [0.0] * num_steps
    if schedule == "constant" or delta == 0:
        return offsets
    steps = [i for i in range(num_steps) if in_interval(i, num_steps, window)]
    for k, i in enumerate(steps):
        progress = k / (len(steps) - 1) if len(steps) > 1 else 0.0
        offsets[i] = delta * (1.0 - 2.0 * progress)
    return offsets


def _number(name: str, x) -> float:
    try:
        return _real(name, x)
    except ValueError as e:
        raise ValueError(str(e).replace("S2Config.", "SGGConfig.")) from None


def _window(name: str, x) -> Tuple[float, float]:
    try:
        items = _as_sequence(name, x)
    except ValueError as e:
        raise ValueError(str(e).replace("S2Config.", "SGGConfig.")) from None
    if len(items) != 2:
        raise ValueError(f"SGGConfig.{name} must be (start, stop), got {_short(tuple(items))}")
    start, stop = _number(name, items[0]), _number(name, items[1])
    if not (0.0 <= start < stop <= 1.0):
        raise ValueError(f"SGGConfig.{name} must satisfy 0 <= start < stop <= 1 (fractions of the steps), "
                         f"got ({start}, {stop})")
    return (start, stop)


def _blocks(x) -> Tuple[int, ...]:
    try:
        blocks = _index_tuple("skip_blocks", x)
    except ValueError as e:
        raise ValueError(str(e).replace("S2Config.", "SGGConfig.")) from None
    if not blocks:
        raise ValueError("SGGConfig.skip_blocks must name at least one block")
    return blocks


def _schedule(name: str, x) -> str:
    if not isinstance(x, str) or x not in SCHEDULES:
        raise ValueError(f"SGGConfig.{name} must be one of {SCHEDULES}, got {_short(x)}")
    return x


