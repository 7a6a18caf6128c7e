"""Eq. 4 of S²-Guidance as plain torch ops, in the pipelines' own rounding order."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def guided_prediction(
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    subs: Sequence[torch.Tensor],
    guidance_scale: Optional[float],
    omega: float,
) -> torch.Tensor:
    """D = U + λ(C − U) − ω(S̄ − C), or C − ω(S̄ − C) without an uncond branch; S̄ is the mean of ``subs``.

    The CFG part is computed exactly as the diffusers pipelines write it (``U + λ * (C - U)``, one rounding per
    op in the model dtype), so with no sub-network the result is bit-identical to the stock pipeline's CFG line.
    """
    if uncond is not None:
        if guidance_scale is None:
            raise ValueError("guided_prediction: an uncond prediction needs a guidance_scale")
        out = uncond + guidance_scale * (cond - uncond)
    else:
        out = cond
    if not subs or omega == 0:
        return out
    sub = subs[0] if len(subs) == 1 else torch.stack(list(subs)).mean(dim=0)
    return out - omega * (sub - cond)
