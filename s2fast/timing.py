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


def timing_warning(ratios: List[float], floor: Optional[float] = None, max_spread: float = 0.20) -> Optional[str]:
    """Why a ratio measured over ``ratios`` (one per round) should not be trusted, or None.

    Untrustworthy: fewer than 3 rounds (no spread to judge), rounds that spread by more than ``max_spread`` of their
    median (the machine's load changed under the measurement), or a median below ``floor``, the block-row floor of
    the work done, which no implementation can beat (the baseline was slowed, not the method sped up).
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
    if floor is not None and median < floor:
        problems.append(f"the ratio is below the block-row floor {floor:.3f}, which no implementation can beat "
                        "(a busy machine slowed the baseline)")
    return "untrustworthy: " + "; ".join(problems) if problems else None
