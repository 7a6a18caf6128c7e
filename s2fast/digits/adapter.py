"""s2fast's adapter for DigitsFlowPipeline, registered through the public ``s2fast.register_adapter`` (the
library's own registry names only diffusers pipelines; this is how any project teaches s2fast its pipeline)."""

from __future__ import annotations

from ..adapters.dit import DiTAdapter


class DigitsAdapter(DiTAdapter):
    """DigitsFlowPipeline: the same model and rows as DiTPipeline, a flow-matching scheduler and a loop that keeps
    x_t in ``latents`` and the timestep in ``t``, so the fused step applies."""

    pipeline_locals = DiTAdapter.pipeline_locals + ("latents", "t")  # the fused step reads x_t and the timestep
    supports_fused_step = True
    family = "dit (digits)"
    schedulers = "FlowMatchEulerDiscreteScheduler"
