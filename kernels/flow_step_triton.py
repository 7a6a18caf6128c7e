"""guided_flow_step as one Triton kernel: Eq. 4 and the FlowMatchEulerDiscrete update in one pass over the latents.

Unfused, a bf16 S² step ends in ten elementwise kernels (sub, mul, add for CFG; sub, mul, sub for the S² term;
mul, add and two casts in the scheduler), each reading and writing the whole latent; fused, the kernel reads
x, C, U, S once and writes x_{t−1} (and D, which the pipeline still receives) once.

Rounding, mode "exact": every op is rounded to the model dtype where torch rounds it (ROUND_* flags come from
kernels/rounding.py's probe) and FMA contraction is off (``enable_fp_fusion=False``), so the result equals
``unfused_flow_step`` bit for bit. Mode "fp32": fp32 throughout, FMA allowed, one rounding at the end.

Rounding to bf16 is done on the fp32 bits (round to nearest, ties to even): Triton's interpreter truncates on a
bf16 cast (518 of 1024 random values differed from torch, measured here), and on a GPU the result is the same
value as ``cvt.rn.bf16``. After it, the cast to bf16 at a store is exact on every backend.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_LOW_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BLOCK = 1024  # elements per program; 4 warps × 32 lanes × 8 elements: 16-byte accesses for bf16


@triton.jit
def _round(v, LOW: tl.constexpr):
    """v rounded to the model dtype (LOW: 0 fp32, 1 fp16, 2 bf16), returned as fp32."""
    if LOW == 2:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif LOW == 1:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _guided_flow_step_kernel(
    x_ptr, c_ptr, u_ptr, s_ptr, dt_ptr, out_ptr, d_ptr,
    n, lam, omega, inv_num_subs,
    HAS_U: tl.constexpr, NUM_SUBS: tl.constexpr, WRITE_D: tl.constexpr, EXACT: tl.constexpr,
    ROUND_DT: tl.constexpr, LOW: tl.constexpr, BLOCK: tl.constexpr, IS_CORRECTION: tl.constexpr = False,
):
    # IS_CORRECTION: s_ptr holds a stored Δ = S̄ − C (one tensor, NUM_SUBS = 1), read in place of S̄ − C
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=mask).to(tl.float32)
    dt = tl.load(dt_ptr).to(tl.float32)
    if EXACT:
        # One rounding per torch op, in the pipeline's order (kernels/flow_step_reference.py).
        d = c
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
            d = _round(u + _round(lam * _round(c - u, LOW), LOW), LOW)
        if IS_CORRECTION:
            delta = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
            d = _round(d - _round(omega * delta, LOW), LOW)
        elif NUM_SUBS > 0:
            sbar = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
            if NUM_SUBS > 1:
                for j in tl.static_range(1, NUM_SUBS):
                    sbar += tl.load(s_ptr + j * n + offs, mask=mask).to(tl.float32)
                sbar = _round(sbar * inv_num_subs, LOW)
            d = _round(d - _round(omega * _round(sbar - c, LOW), LOW), LOW)
        if WRITE_D:
            tl.store(d_ptr + offs, d.to(d_ptr.dtype.element_ty), mask=mask)
        if HAS_U:  # the pipeline's own CFG line on [D, D]: D back, except −0 → +0
            d = _round(d + _round(lam * _round(d - d, LOW), LOW), LOW)
        if ROUND_DT:
            dt = _round(dt, LOW)
        x_next = _round(x + _round(dt * d, LOW), LOW)
    else:
        d = c
        if HAS_U:
            u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
            d = u + lam * (c - u)
        if IS_CORRECTION:
            d = d - omega * tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        elif NUM_SUBS > 0:
            sbar = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
            for j in tl.static_range(1, NUM_SUBS):
                sbar += tl.load(s_ptr + j * n + offs, mask=mask).to(tl.float32)
            if NUM_SUBS > 1:
                sbar = sbar * inv_num_subs
            d = d - omega * (sbar - c)
        if WRITE_D:
            tl.store(d_ptr + offs, _round(d, LOW).to(d_ptr.dtype.element_ty), mask=mask)
        x_next = _round(x + dt * d, LOW)
    tl.store(out_ptr + offs, x_next.to(out_ptr.dtype.element_ty), mask=mask)


def launch(
    sample: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    sub: Optional[torch.Tensor],
    num_subs: int,
    dt: torch.Tensor,
    out: torch.Tensor,
    guided_out: Optional[torch.Tensor],
    lam: float,
    omega: float,
    exact: bool,
    round_dt: bool,
    is_correction: bool = False,
) -> None:
    """Run the kernel; inputs are validated, contiguous and on one device (kernels/flow_step.py)."""
    n = cond.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _guided_flow_step_kernel[grid](
        sample, cond, uncond if uncond is not None else cond, sub if sub is not None else cond, dt, out,
        guided_out if guided_out is not None else out,
        n, lam, omega, 1.0 / max(num_subs, 1),
        HAS_U=uncond is not None, NUM_SUBS=num_subs, WRITE_D=guided_out is not None, EXACT=exact,
        ROUND_DT=round_dt, LOW=_LOW_KIND[cond.dtype], BLOCK=BLOCK, IS_CORRECTION=is_correction,
        num_warps=4,
        enable_fp_fusion=not exact,  # exact: a contracted a*b+c rounds once where torch rounds twice
    )
