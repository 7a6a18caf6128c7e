"""Which blocks each step's sub-networks drop: sampling (seeded, separate from every torch RNG) and schedules."""

from __future__ import annotations

import random
import secrets
from typing import List, Optional, Sequence, Tuple

from .config import Mask, S2Config


def num_dropped(drop_ratio: float, droppable: int, num_blocks: int) -> int:
    """round(drop_ratio · droppable) blocks (half up, unlike Python's banker's round), at least one, and never
    every block of the model: a sub-network keeps at least one block (explicit masks obey the same rule)."""
    return max(1, min(droppable, num_blocks - 1, int(drop_ratio * droppable + 0.5)))


def droppable_blocks(num_blocks: int, protected: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(b for b in range(num_blocks) if b not in protected)


def in_interval(step: int, num_steps: int, interval: Tuple[float, float]) -> bool:
    """start ≤ step/num_steps < stop, compared without dividing (so 0.25 · 8 = 2 is exact)."""
    start, stop = interval
    return start * num_steps <= step < stop * num_steps


def in_sigma_interval(sigma: float, interval: Tuple[float, float]) -> bool:
    """low ≤ σ ≤ high: closed at both ends, so (0.1, 0.9) keeps a step that starts exactly at σ = 0.9."""
    low, high = interval
    return low <= sigma <= high


def step_rng(seed: int, step: int) -> random.Random:
    # One stream per (seed, step): step i's masks do not depend on how many masks earlier steps drew, so a
    # different interval or num_inference_steps keeps the masks of the steps it shares.
    return random.Random(f"s2fast/{seed}/{step}")


def sample_step(seed: int, step: int, cfg: S2Config, num_blocks: int) -> Tuple[Mask, ...]:
    """num_masks independent masks for one step, each drawn uniformly without replacement."""
    candidates = droppable_blocks(num_blocks, cfg.protected_blocks)
    k = num_dropped(cfg.drop_ratio, len(candidates), num_blocks)
    rng = step_rng(seed, step)
    return tuple(tuple(sorted(rng.sample(candidates, k))) for _ in range(cfg.num_masks))


def fresh_seed() -> int:
    """A seed for a call of a config whose seed is None (fresh masks per call)."""
    return secrets.randbits(63)


def schedule(cfg: S2Config, num_steps: int, num_blocks: int, seed: Optional[int] = None,
             sigmas: Optional[Sequence[float]] = None) -> List[Tuple[Mask, ...]]:
    """The sub-network masks of every step of one pipeline call; () where S² is off. ``seed`` overrides the
    config's (a call draws one seed and uses it for every denoiser it runs). ``sigmas``: the noise level each step
    starts from (at least ``num_steps`` values), needed when the config has a ``sigma_interval``.

    Raises ValueError when explicit masks do not cover exactly ``num_steps`` steps, or when a sigma_interval has no
    sigmas to read.
    """
    if cfg.omega == 0:
        return [()] * num_steps
    explicit = cfg.step_masks()
    if explicit is not None:
        if len(explicit) != num_steps:
            raise ValueError(f"S2Config.masks has {len(explicit)} entries, but this call runs {num_steps} denoising steps")
        return list(explicit)  # checked against the model where it is known (wrap, the guider's first batch)
    if cfg.sigma_interval is not None:
        if sigmas is None or len(sigmas) < num_steps:
            raise ValueError(f"S2Config.sigma_interval needs the noise level of each of the {num_steps} steps; got "
                             f"{'none' if sigmas is None else len(sigmas)}")
        active = [in_sigma_interval(float(sigmas[i]), cfg.sigma_interval) for i in range(num_steps)]
    else:
        active = [in_interval(i, num_steps, cfg.interval) for i in range(num_steps)]
    if any(active):  # checked here too, for configs whose need of a sub-network depends on the call
        cfg.check_blocks(num_blocks)
    if seed is None:
        seed = cfg.seed if cfg.seed is not None else fresh_seed()
    return [sample_step(seed, i, cfg, num_blocks) if active[i] else () for i in range(num_steps)]
