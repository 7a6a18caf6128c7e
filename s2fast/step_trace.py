"""What each denoising step of a pipeline call ran, for :func:`s2fast.trace_steps` (beside s2fast.trace's masks)."""

from __future__ import annotations

from dataclasses import dataclass

BLOCKS = ("full", "cached")
CORRECTIONS = ("computed", "reused", "none")


@dataclass(frozen=True)
class StepRecord:
    """One step: ``blocks`` is "full" (every block ran) or "cached" (a BlockCache skipped the blocks after its
    probe and added the stored residuals); ``correction`` is "computed" (the sub-network ran this step), "reused"
    (its value came from an earlier step) or "none" (no sub-network this step)."""

    blocks: str
    correction: str

    def __post_init__(self) -> None:
        if self.blocks not in BLOCKS:
            raise ValueError(f"StepRecord.blocks must be one of {BLOCKS}, got {self.blocks!r}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"StepRecord.correction must be one of {CORRECTIONS}, got {self.correction!r}")
