"""The torch references of guided_flow_step: what the fused kernels are tested against, and the CPU path.

``reference_flow_step(..., mode="exact")`` (alias ``unfused_flow_step``) *is* the definition of step_mode="exact":
the ops a wrapped pipeline runs without fusion, in their order and dtypes; mode="fp32" defines step_mode="fp32":
the same formula in fp32, rounded once.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from .guidance import guided_prediction, mean_of_subs


def sub_list(sub: Optional[torch.Tensor], sample: torch.Tensor) -> List[torch.Tensor]:
    """``sub`` as a list of sub-network predictions: one tensor of the sample's shape, or a stack (N, *shape)."""
    if sub is None:
        return []
    return [sub] if sub.dim() == sample.dim() else list(sub.unbind(0))


def reference_flow_step(
    sample: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    sub: Optional[torch.Tensor],
    dt: torch.Tensor,
    guidance_scale: Optional[float],
    omega: float,
    mode: str = "exact",
    correction: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_{t−1}, D) in plain torch ops. ``correction``: a stored Δ in place of S̄ − C (``sub`` None), as
    ``guided_prediction`` takes it; mode "fp32" reads it as fp32 (it is stored in the predictions' dtype).

    mode "exact", exactly as a wrapped pipeline computes them without fusion, op for op:
    1. D from Eq. 4 (``guided_prediction``, the pipelines' op order, one rounding per op in the model dtype);
    2. with CFG, the pipeline's own line ``U + λ(C − U)`` applied to the [D, D] s2fast hands it; this gives D back
       bit for bit except a −0 (which becomes +0), so it is kept to make "exact" exact;
    3. FlowMatchEulerDiscreteScheduler.step: ``(sample.float() + dt * value).to(value.dtype)``, dt a 0-dim fp32
       tensor on the device the scheduler keeps its sigmas on (diffusers: the pipeline's), as the caller passes it.

    mode "fp32": the same formula with the combination and the update in fp32, one rounding at the end.
    """
    subs = sub_list(sub, sample)
    if mode == "exact":
        d = guided_prediction(cond, uncond, subs, guidance_scale, omega, correction=correction)
        value = d + guidance_scale * (d - d) if uncond is not None else d
        prev = sample.to(torch.float32) + dt * value
        return prev.to(value.dtype), d
    f32 = torch.float32
    c = cond.to(f32)
    d = c if uncond is None else uncond.to(f32) + guidance_scale * (c - uncond.to(f32))
    if correction is not None and omega != 0:
        d = d - omega * correction.to(f32)
    elif subs and omega != 0:
        d = d - omega * (mean_of_subs(subs, round_to_input=False) - c)
    prev = sample.to(f32) + dt.to(device=sample.device, dtype=f32) * d
    return prev.to(cond.dtype), d.to(cond.dtype)


# The definition of step_mode="exact", under the name the tests and the docs use.
unfused_flow_step = functools.partial(reference_flow_step, mode="exact")
