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
    correction: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """D = U + λ(C − U) − ω(S̄ − C), or C − ω(S̄ − C) without an uncond branch; S̄ is the mean of ``subs``
    (:func:`mean_of_subs`). ``correction``: a stored Δ standing for S̄ − C (``subs`` then empty), the reuse step of
    S2Config.correction_every; :func:`correction_of` is the Δ a step with ``subs`` computes, so a reuse of this
    step's own Δ gives this step's D bit for bit.

    The CFG part is computed exactly as the diffusers pipelines write it (``U + λ * (C - U)``, one rounding per
    op in the model dtype), so with no sub-network the result is bit-identical to the stock pipeline's CFG line.
    """
    if uncond is not None:
        if guidance_scale is None:
            raise ValueError("guided_prediction: an uncond prediction needs a guidance_scale")
        out = uncond + guidance_scale * (cond - uncond)
    else:
        out = cond
    if correction is not None:
        if subs:
            raise ValueError("guided_prediction: give the sub-network predictions or a stored correction, not both")
        return out if omega == 0 else out - omega * correction
    if not subs or omega == 0:
        return out
    return out - omega * correction_of(cond, subs)


def correction_of(cond: torch.Tensor, subs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Δ = S̄ − C in the predictions' dtype, one rounding as :func:`guided_prediction` (and the fused step's exact
    mode) compute it: what a step that reuses the correction is given."""
    return mean_of_subs(subs) - cond


def mean_of_subs(subs: Sequence[torch.Tensor], round_to_input: bool = True) -> torch.Tensor:
    """S̄ of Eq. 3: the mean of N sub-network predictions, summed in fp32 in order, times fp32(1/N), rounded once
    to the predictions' dtype (or kept in fp32 with ``round_to_input=False``, for the fp32 step).

    Written as elementwise ops in a fixed order (not ``torch.mean``, whose reduction order and division are the
    device's choice) so that a fused kernel can reproduce it bit for bit on every device.
    """
    if len(subs) == 1:
        return subs[0] if round_to_input else subs[0].to(torch.float32)
    acc = subs[0].to(torch.float32)
    for s in subs[1:]:
        acc = acc + s.to(torch.float32)
    mean = acc * (1.0 / len(subs))
    return mean.to(subs[0].dtype) if round_to_input else mean
