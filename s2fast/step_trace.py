"""What each denoising step of a wrapped pipeline's last call ran, beside the masks of s2fast.trace.

``s2fast.trace_steps(pipe)`` returns one StepRecord per step: ``blocks`` says whether the transformer blocks ran
("full") or a BlockCache served the blocks after its probe ("cached", s2fast/step_cache.py); ``correction`` says
what the step did with S²'s sub-network term: "computed" (the sub-networks ran), "reused" (an earlier step's stands
in: the stored Δ = S̄ − D_c under S2Config.correction_every, or the sub-network residual of a cached step) or "none"
(no sub-network term: CFG, ω = 0, outside the interval).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCKS = ("full", "cached")
CORRECTIONS = ("computed", "reused", "none")


@dataclass(frozen=True)
class StepRecord:
    """One step: ``blocks`` "full" or "cached"; ``correction`` "computed", "reused" or "none" (module docstring)."""

    blocks: str = "full"
    correction: str = "none"

    def __post_init__(self) -> None:
        if self.blocks not in BLOCKS:
            raise ValueError(f"StepRecord.blocks must be one of {BLOCKS}, got {self.blocks!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"StepRecord.correction must be one of {CORRECTIONS}, got {self.correction!r}")
