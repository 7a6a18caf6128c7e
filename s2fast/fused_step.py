"""The fused step: the guidance combination and the scheduler update in one kernel (S2Config.fused_step).

The transformer call computes x_{t−1} with ``guided_flow_step`` (it has the predictions, and the pipeline's
``latents`` and ``t`` are in its locals) and hands the pipeline D as usual; the scheduler's ``step``, replaced
on the scheduler *instance* like the transformer's forward, then returns that x_{t−1} and advances the
scheduler's own step index, so the scheduler's state is what the stock step leaves. If the pipeline calls
``step`` with anything but the sample and timestep the value was computed for, the stock step runs on the value
the pipeline passes (D), which is the unfused result: nothing can silently go wrong.

Only FlowMatchEulerDiscreteScheduler (deterministic: stochastic_sampling off) is fused. Other schedulers run the
unfused combination + ``scheduler.step``: with fused_step="auto" after a one-time notice, with True as an error.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch

from .kernels import guided_flow_step
from .kernels.dispatch import fast_backend_for, log_once


def unsupported_reason(scheduler) -> str:
    """Why the step cannot be fused with this scheduler, or "" when it can."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if type(scheduler) is not FlowMatchEulerDiscreteScheduler:
        return f"the scheduler is {type(scheduler).__name__}, and only FlowMatchEulerDiscreteScheduler is fused"
    if scheduler.config.get("stochastic_sampling", False):
        return "the scheduler's stochastic_sampling is on, and only its deterministic Euler step is fused"
    current = scheduler.__dict__.get("step")
    if current is not None and not isinstance(current, SchedulerHook):
        return "scheduler.step is already replaced by another hook"
    return ""


@dataclass
class _Pending:
    sample: torch.Tensor
    timestep: Any
    index: int
    x_next: torch.Tensor


class SchedulerHook:
    """Stands in for ``scheduler.step`` (an instance attribute) and serves the fused x_{t−1}."""

    def __init__(self, scheduler):
        self.scheduler_ref = weakref.ref(scheduler)
        self.pending: Optional[_Pending] = None

    @staticmethod
    def on(scheduler) -> "SchedulerHook":
        hook = scheduler.__dict__.get("step")
        if not isinstance(hook, SchedulerHook):
            hook = SchedulerHook(scheduler)
            scheduler.step = hook
        return hook

    @staticmethod
    def installed_on(scheduler) -> Optional["SchedulerHook"]:
        hook = scheduler.__dict__.get("step") if scheduler is not None else None
        return hook if isinstance(hook, SchedulerHook) else None

    def __reduce__(self):  # pickling a wrapped pipeline: the unpickled scheduler gets a hook of its own
        return (SchedulerHook, (self.scheduler_ref(),))

    def __deepcopy__(self, memo):
        # copy.deepcopy(scheduler) copies its __dict__, this hook included: the copy must drive the *copied*
        # scheduler (already in memo), never the original one, and owes nothing to a pending fused value.
        copied = memo.get(id(self.scheduler_ref()))
        return SchedulerHook(copied) if copied is not None else self

    def uninstall(self) -> None:
        scheduler = self.scheduler_ref()
        if scheduler is not None and scheduler.__dict__.get("step") is self:
            del scheduler.__dict__["step"]

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        scheduler = self.scheduler_ref()
        pending, self.pending = self.pending, None
        if (pending is not None and not args and set(kwargs) <= {"return_dict"} and sample is pending.sample
                and timestep is pending.timestep and scheduler.step_index == pending.index):
            scheduler._step_index += 1  # what the stock step does after its update
            if not kwargs.get("return_dict", True):
                return (pending.x_next,)
            from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=pending.x_next)
        if pending is not None:
            log_once("s2fast: scheduler.step was called with other arguments than the fused step was computed for; "
                     "ran the stock step instead")
        return type(scheduler).step(scheduler, model_output, timestep, sample, *args, **kwargs)


class FusedStep:
    """One pipeline call's fused step: its scheduler hook, the call's dt values on the device, the mode."""

    def __init__(self, hook: SchedulerHook, scheduler, device: torch.device, mode: str):
        self.hook = hook
        self.mode = mode
        # dt_i = σ_{i+1} − σ_i, computed as the scheduler does (fp32, on its sigmas), moved to the device once.
        # Exact mode rounds as the stock step's ``dt * D`` does with dt where the scheduler keeps its sigmas
        # (diffusers: the pipeline's device); a CPU dt would round differently on a GPU.
        sigmas = scheduler.sigmas
        self.dt_device = sigmas.device
        self.dts = (sigmas[1:] - sigmas[:-1]).to(device)

    def step(self, scheduler, latents: torch.Tensor, t, cond: torch.Tensor, uncond: Optional[torch.Tensor],
             subs: Sequence[torch.Tensor], guidance_scale: Optional[float], omega: float,
             correction: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compute and stash x_{t−1} for the scheduler's step from the loop's x_t (``latents``) and ``t``; return D
        for the pipeline. ``correction``: a stored Δ in place of S̄ − C (a reuse step, ``subs`` empty)."""
        if scheduler.step_index is None:
            scheduler._init_step_index(t)  # what the stock step would do first; the same index either way
        index = scheduler.step_index
        sub = None if not subs else (subs[0] if len(subs) == 1 else torch.stack(list(subs)))
        d = torch.empty_like(cond)
        x_next = guided_flow_step(latents, cond, dt=self.dts[index], uncond=uncond, sub=sub,
                                  guidance_scale=guidance_scale, omega=omega, mode=self.mode, guided_out=d,
                                  dt_device=self.dt_device, correction=correction)
        self.hook.pending = _Pending(latents, t, index, x_next)
        return d


def fused_step_for_call(pipe, config, latents: torch.Tensor, cond_shape, hooks: List[SchedulerHook]) -> Optional[FusedStep]:
    """The fused step for a new pipeline call, or None to run unfused (config.fused_step, scheduler, backend)."""
    if config.fused_step is False:
        return None
    scheduler = pipe.scheduler
    reason = unsupported_reason(scheduler)
    if not reason and tuple(latents.shape) != tuple(cond_shape):
        reason = f"the pipeline's latents {tuple(latents.shape)} are not shaped like the prediction {tuple(cond_shape)}"
    if not reason and config.fused_step == "auto" and fast_backend_for(latents.device) is None:
        log_once(f"s2fast: fused_step='auto' runs unfused on {latents.device.type}: no Triton or CUDA backend for it")
        return None
    if reason:
        if config.fused_step is True:
            raise ValueError(f"S2Config(fused_step=True) cannot fuse this step: {reason}")
        log_once(f"s2fast: the guidance + scheduler step runs unfused: {reason}")
        return None
    for old in [h for h in hooks if h.scheduler_ref() is not scheduler]:  # the pipeline's scheduler was replaced
        old.uninstall()
        hooks.remove(old)
    hook = SchedulerHook.on(scheduler)
    if hook not in hooks:
        hooks.append(hook)
    return FusedStep(hook, scheduler, latents.device, config.step_mode)
