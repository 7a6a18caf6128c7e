"""guided_flow_step: S²-Guidance's Eq. 4 fused with the FlowMatchEulerDiscreteScheduler update.

    D        = U + λ (C − U) − ω (S̄ − C)      (no U: C − ω (S̄ − C); no S: plain CFG; S̄ = mean of N subs;
                                               a stored correction Δ in place of S̄ − C on a reuse step)
    x_{t−1}  = x_t + dt · D                   dt = σ_{i+1} − σ_i, a 0-dim fp32 tensor

Modes: "exact" reproduces the unfused torch sequence a wrapped pipeline runs (kernels/flow_step_reference.py)
bit for bit in fp32, bf16 and fp16; "fp32" computes in fp32 and rounds once (closer to the float64 result).
Backends (kernels/dispatch.py): the CUDA C++ extension, Triton, or the torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .flow_step_reference import reference_flow_step
from .rounding import effective_scalar, scalar_rounding

MODES = ("fp32", "exact")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def guided_flow_step(
    sample: torch.Tensor,
    cond: torch.Tensor,
    *,
    dt: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    sub: Optional[torch.Tensor] = None,
    guidance_scale: Optional[float] = None,
    omega: float = 0.0,
    mode: str = "fp32",
    out: Optional[torch.Tensor] = None,
    guided_out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    dt_device=None,
    correction: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x_{t−1} from x_t (``sample``) and the predictions; returns ``out`` (allocated when None).

    Args:
        sample: x_t, any float dtype; the result has the predictions' dtype, as the scheduler's.
        cond: C, the conditional prediction; ``uncond`` (U) and ``sub`` (S) have its shape and dtype. ``sub`` may
            be a stack (N, *shape) of N sub-network predictions (naive S², Eq. 3): S̄ is their mean.
        dt: σ_{i+1} − σ_i as a 0-dim float32 tensor, read on the device (a CUDA graph replay sees its new value);
            a CPU dt is copied to the device first.
        guidance_scale: λ, required with ``uncond``. ``omega``: ω; 0 ignores ``sub``.
        mode: "exact" or "fp32" (see the module docstring).
        out: where x_{t−1} goes (may be ``sample`` itself: an in-place step). ``guided_out``: optionally receives D.
        backend: "torch", "triton" or "cuda"; default: S2FAST_BACKEND, else the fastest available.
        dt_device: mode "exact" reproduces ``dt * D`` with dt on this device (the CPU or the tensors' device):
            torch rounds a CPU scalar and a device one differently on a GPU. Default: where ``dt`` is. The fused
            step passes the scheduler's sigmas device, which is where the stock step's dt lives.
        correction: Δ, a stored S̄ − C of an earlier step (S2Config.correction_every), shaped and typed like
            ``cond``, in place of ``sub``. Runs on the Triton kernel or the torch reference (the CUDA extension
            has no such input).
    """
    _check(sample, cond, uncond, sub, dt, guidance_scale, omega, mode, out, guided_out)
    if correction is not None:
        if sub is not None:
            raise ValueError("guided_flow_step: give sub or correction, not both")
        _check_like("correction", correction, cond, cond.shape)
        if correction.device != cond.device:
            raise ValueError(f"guided_flow_step: correction is on {correction.device}, the tensors on {cond.device}")
    dt_device = dt.device if dt_device is None else torch.device(dt_device)
    if dt_device.type != "cpu" and (dt_device.type != cond.device.type
                                    or dt_device.index not in (None, cond.device.index)):
        raise ValueError(f"guided_flow_step: dt_device is {dt_device}, the tensors are on {cond.device}")
    if omega == 0:
        sub = correction = None
    num_subs = 0 if sub is None else (1 if sub.dim() == sample.dim() else sub.shape[0])
    tensors = [t for t in (sample, cond, uncond, sub, correction, out, guided_out) if t is not None]
    skip = ("cuda",) if correction is not None else ()  # the CUDA extension takes no stored correction
    name, module = dispatch.choose(backend, tensors, same_dtype=sample.dtype == cond.dtype, skip=skip)
    if out is None:
        out = torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)
    if name == "torch":
        return _torch_step(sample, cond, uncond, sub, dt, guidance_scale, omega, mode, out, guided_out, dt_device,
                           correction)
    if dt.device != cond.device:  # a kernel reads dt on the device; a copy made here is not seen by a graph replay
        dt = dt.to(cond.device)
    exact = mode == "exact"
    rounding = scalar_rounding(cond.device, cond.dtype, dt_device) if exact else None
    lam = 0.0 if uncond is None else float(guidance_scale)
    om = float(omega)
    if exact:
        lam = effective_scalar(lam, cond.dtype, rounding.guidance_scale)
        om = effective_scalar(om, cond.dtype, rounding.guidance_scale)
    with dispatch.launch_guard(cond.device):  # a kernel launches on the current device: make it the tensors'
        if correction is not None:  # the Triton kernel reads Δ where it reads S, as its one "sub-network"
            module.launch(sample, cond, uncond, correction, 1, dt, out, guided_out, lam, om, exact,
                          bool(exact and rounding.dt), is_correction=True)
        else:
            module.launch(sample, cond, uncond, sub, num_subs, dt, out, guided_out, lam, om, exact,
                          bool(exact and rounding.dt))
    return out


def _torch_step(sample, cond, uncond, sub, dt, guidance_scale, omega, mode, out, guided_out, dt_device,
                correction=None):
    # Exact: the stock step multiplies by dt where the scheduler holds it; a CPU and a device dt can round
    # differently, so multiply by it there.
    x_next, d = reference_flow_step(sample, cond, uncond, sub, dt.to(dt_device) if mode == "exact" else dt,
                                    guidance_scale, omega, mode, correction=correction)
    if guided_out is not None:
        guided_out.copy_(d)
    return out.copy_(x_next)


def _check(sample, cond, uncond, sub, dt, guidance_scale, omega, mode, out, guided_out) -> None:
    """Every argument checked before anything runs: a bad call raises and changes nothing."""
    if mode not in MODES:
        raise ValueError(f"guided_flow_step: mode must be one of {MODES}, got {mode!r}")
    for name, t in (("sample", sample), ("cond", cond), ("dt", dt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"guided_flow_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if cond.dtype not in DTYPES or sample.dtype not in DTYPES:
        raise TypeError(f"guided_flow_step: sample and cond must be float32, bfloat16 or float16, got "
                        f"{sample.dtype} and {cond.dtype}")
    if sample.shape != cond.shape:
        raise ValueError(f"guided_flow_step: cond has shape {tuple(cond.shape)}, sample {tuple(sample.shape)}")
    if dt.dim() != 0 or dt.dtype != torch.float32:
        raise ValueError(f"guided_flow_step: dt must be a 0-dim float32 tensor, got shape {tuple(dt.shape)} {dt.dtype}")
    if uncond is not None:
        _check_like("uncond", uncond, cond, cond.shape)
        if guidance_scale is None:
            raise ValueError("guided_flow_step: uncond needs a guidance_scale (λ)")
    for name, x in (("guidance_scale", guidance_scale), ("omega", omega)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or abs(x) == float("inf")):
            raise ValueError(f"guided_flow_step: {name} must be a finite number, got {x!r}")
    if sub is not None:
        if sub.dim() == cond.dim():
            _check_like("sub", sub, cond, cond.shape)
        else:
            _check_like("sub", sub, cond, (sub.shape[0], *cond.shape) if sub.dim() == cond.dim() + 1 else None)
            if sub.shape[0] < 1:
                raise ValueError("guided_flow_step: sub holds no sub-network prediction")
    for name, t in (("out", out), ("guided_out", guided_out)):
        if t is not None:
            _check_like(name, t, cond, cond.shape)
    devices = {t.device for t in (sample, cond, uncond, sub, out, guided_out) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"guided_flow_step: all tensors must be on one device, got {sorted(map(str, devices))}")
    if dt.device.type != "cpu" and dt.device != cond.device:
        raise ValueError(f"guided_flow_step: dt is on {dt.device}, the tensors on {cond.device}")


def _check_like(name: str, t, cond: torch.Tensor, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"guided_flow_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != cond.dtype:
        raise TypeError(f"guided_flow_step: {name} has dtype {t.dtype}, cond {cond.dtype}")
    if shape is None or tuple(t.shape) != tuple(shape):
        expected = "the shape of cond or (N, *cond.shape)" if name == "sub" else str(tuple(cond.shape))
        raise ValueError(f"guided_flow_step: {name} has shape {tuple(t.shape)}, expected {expected}")
