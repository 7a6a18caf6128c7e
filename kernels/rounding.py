"""How torch rounds a scalar operand in the ops the stock step is made of, learned by a probe on each device.

The "exact" mode of guided_flow_step must round every intermediate as the unfused torch sequence does. For a
bf16/fp16 tensor times a scalar, torch either multiplies by the scalar in fp32 or first rounds the scalar to the
tensor's dtype, and which one depends on the device and on the operand order (torch 2.13, CPU, checked here):

    tensor * python_float   (the pipelines' ``λ * (C − U)``, our ``ω * (S − C)``)   scalar kept in fp32
    tensor_0dim * tensor    (the scheduler's ``dt * model_output``, dt a 0-dim fp32 tensor)   scalar rounded first

CUDA reads a CPU scalar through a different path than a 0-dim tensor on the device, and diffusers keeps the
scheduler's sigmas (hence dt) on the pipeline's device, so the dt pattern is probed with dt where the scheduler
holds it. Rather than hard-code any answer, the first exact step on a device runs each pattern once on a few
thousand values and compares against both hypotheses (computed exactly in float64). A device where neither
matches gets a clear error instead of a silently inexact "exact" mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ScalarRounding:
    """Whether each scalar operand is rounded to the tensors' dtype before its multiply."""

    guidance_scale: bool  # λ and ω: ``tensor * python_float``
    dt: bool              # ``dt * model_output``, dt a 0-dim fp32 tensor (as FlowMatchEulerDiscreteScheduler holds it)


@functools.lru_cache(maxsize=256)  # called for λ and ω at every fused step: two tensor conversions saved each time
def effective_scalar(value: float, dtype: torch.dtype, rounded: bool) -> float:
    """The fp32 value a torch op multiplies by: ``value`` in fp32, or rounded to ``dtype`` first (torch's own cast)."""
    t = torch.tensor(value, dtype=torch.float64)
    t = t.to(dtype) if rounded else t
    return float(t.to(torch.float32))


def scalar_rounding(device: torch.device, dtype: torch.dtype, dt_device=None) -> ScalarRounding:
    """The rounding rules of torch's elementwise ops on ``device`` for ``dtype`` (probed once, then cached), with
    dt a 0-dim tensor on ``dt_device`` (default: the CPU) for the dt pattern."""
    if dtype not in LOW_PRECISION:
        return ScalarRounding(False, False)  # fp32: rounding a fp32 scalar to fp32 changes nothing
    dt_type = "cpu" if dt_device is None else torch.device(dt_device).type
    return _probe(torch.device(device).type, dtype, dt_type)


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, dtype: torch.dtype, dt_device_type: str = "cpu") -> ScalarRounding:
    # 4096 normal values and a scalar that no bf16/fp16 holds exactly: the two hypotheses then disagree on about a
    # third of the elements (measured on the CPU), so the probe cannot match both (_which checks that they differ).
    values = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    scalar = 1.0 / 3.0
    device = torch.device(device_type)
    v = values.to(device)
    by_scalar = _which("tensor * python_float", (v * scalar).cpu(), values, scalar, dtype)
    dt = torch.tensor(scalar, dtype=torch.float32, device=dt_device_type)  # where the scheduler keeps its sigmas
    by_dt = _which("dt_tensor * tensor", (dt * v).cpu(), values, scalar, dtype)
    return ScalarRounding(guidance_scale=by_scalar, dt=by_dt)


def _which(pattern: str, observed: torch.Tensor, values: torch.Tensor, scalar: float, dtype: torch.dtype) -> bool:
    # The product of two values with ≤ 24 significant bits is exact in float64: round it to fp32, then to dtype.
    expected = [(values.double() * effective_scalar(scalar, dtype, r)).to(torch.float32).to(dtype) for r in (False, True)]
    assert not torch.equal(*expected), "the probe values cannot tell the two rules apart"
    for rounded in (False, True):
        if torch.equal(observed, expected[rounded]):
            return rounded
    raise RuntimeError(
        f"s2fast: torch's rounding of `{pattern}` in {dtype} matches neither scalar rule s2fast emulates, so "
        "step_mode='exact' cannot reproduce it on this device; use step_mode='fp32'"
    )
