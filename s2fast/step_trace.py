"""What each denoising step of a wrapped pipeline's last call ran, beside the masks of s2fast.trace.

``s2fast.trace_steps(pipe)`` returns one StepRecord per step: ``blocks`` says whether the transformer blocks ran
("full") or a step cache served them ("cached"); ``correction`` says what the step did with S²'s sub-network
term: "computed" (the sub-networks ran), "reused" (the stored Δ = S̄ − D_c of an earlier step stood in,
S2Config.correction_every) or "none" (no sub-network term: CFG, ω = 0, outside the interval).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecord:
    blocks: str = "full"
    correction: str = "none"
