"""Interleaved timing: the method behind every ratio the demo and the benchmarks report.

A shared machine drifts over seconds (we saw stock CFG move 25 % between two runs minutes apart), so cases timed
one after another give unreliable ratios. Here each round runs every case once, in a shuffled order, and a ratio
is taken within a round; the reported ratio is its median over rounds.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Dict, List, Optional


class InterleavedRounds:
    """Time ``cases`` ({name: callable}) in shuffled interleaved rounds.

    A case returns None to be timed by the wall clock, or the seconds it measured itself (the demo reports the
    median step of a pipeline call, timed by the pipeline's own step-end callback).
    """

    def __init__(self, cases: Dict[str, Callable[[], Optional[float]]], seed: int = 0):
        self.cases = cases
        self.times: Dict[str, List[float]] = {name: [] for name in cases}
        self._order = random.Random(seed)

    def run_round(self, record: bool = True) -> None:
        names = list(self.cases)
        self._order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            measured = self.cases[name]()
            elapsed = time.perf_counter() - start
            if record:
                self.times[name].append(elapsed if measured is None else measured)

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratios(self, name: str, baseline: str) -> List[float]:
        """``name``'s time over ``baseline``'s, round by round."""
        return [a / b for a, b in zip(self.times[name], self.times[baseline])]

    def ratio(self, name: str, baseline: str) -> float:
        return statistics.median(self.ratios(name, baseline))


def block_share(blocks, call: Callable[[], object]) -> float:
    """The fraction of ``call()``'s wall time spent inside ``blocks`` (torch forward hooks on each, removed after).

    A step also embeds, runs the head, combines and steps the scheduler: the same work for CFG and S². So S²'s time
    over CFG's cannot go below ``1 + (block-row floor − 1) · share``, not the block-row floor itself (the demo's
    small model spends a fifth of a CFG step outside its blocks)."""
    spent = [0.0]
    started: List[float] = []

    def pre(module, args):
        started.append(time.perf_counter())

    def post(module, args, output):
        spent[0] += time.perf_counter() - started.pop()

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return min(1.0, spent[0] / total) if total > 0 else 1.0


def step_floor(block_row_floor: float, share: float) -> float:
    """The lowest S²/CFG step-time ratio the work allows: only the block share of a step grows with the rows."""
    return 1.0 + (block_row_floor - 1.0) * share


def timing_warning(ratios: List[float], floor: Optional[float] = None, max_spread: float = 0.20,
                   floor_tolerance: float = 0.10) -> Optional[str]:
    """Why a ratio measured over ``ratios`` (one per round) should not be trusted, or None.

    Untrustworthy: fewer than 3 rounds (no spread to judge), rounds that spread by more than ``max_spread`` of their
    median (the machine's load changed under the measurement), or a median whose extra cost over 1 falls short of
    the extra that ``floor`` (``step_floor``: the lowest ratio the work allows) requires by more than
    ``floor_tolerance`` of it: the baseline was slowed, not the method sped up. The tolerance is there because the
    floor takes block time as linear in rows, and it is not quite: one block of the digits model cost 307 µs per row
    at batch 100 and 320 µs at batch 200 on a 2-core CPU, so S²'s sub-network rows (batch B) can be 4 % cheaper than
    CFG's (batch 2B).
    """
    if not ratios:
        return "untrustworthy: nothing was measured"
    median = statistics.median(ratios)
    problems = []
    if len(ratios) < 3:
        problems.append(f"{len(ratios)} round{'s' if len(ratios) > 1 else ''} only (3 or more show the spread)")
    spread = (max(ratios) - min(ratios)) / median
    if spread > max_spread:
        problems.append(f"the rounds spread by {100 * spread:.0f} % of their median (more than {100 * max_spread:.0f} %)")
    if floor is not None and median < floor - floor_tolerance * (floor - 1.0):
        problems.append(f"the ratio is below its floor {floor:.3f} by more than {100 * floor_tolerance:.0f} % of the "
                        "extra cost the floor requires, which no implementation can beat (a busy machine slowed the "
                        "baseline)")
    return "untrustworthy: " + "; ".join(problems) if problems else None
