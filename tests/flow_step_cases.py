"""Inputs and references shared by the kernel tests (CPU and GPU)."""

import torch
from s2fast.kernels import guided_flow_step

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 1 element, primes, an odd 4-D latent, a 5-D video latent, and more than one Triton program (BLOCK = 1024).
SHAPES = ((1,), (13, 17), (2, 3, 7, 11), (1, 3, 5, 7, 11), (4099,))
# (has uncond, number of sub-network predictions): S², plain CFG, no CFG, no guidance at all, naive S² (N subs).
VARIANTS = ((True, 1), (True, 0), (False, 1), (False, 0), (True, 3), (False, 2))
LAM, OMEGA = 4.3, 0.27  # neither is a bf16/fp16 value: the scalar rounding rules matter
DT = -0.0357


def inputs(shape, dtype, has_u, num_subs, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    sub = None if num_subs == 0 else (rand(*shape) if num_subs == 1 else rand(num_subs, *shape))
    return dict(sample=rand(*shape), cond=rand(*shape), uncond=rand(*shape) if has_u else None, sub=sub,
                dt=torch.tensor(DT, device=device), guidance_scale=LAM if has_u else None, omega=OMEGA)


def run(args, mode, backend, **extra):
    out = torch.full_like(args["cond"], float("nan"))  # poisoned: every element must be written
    d = torch.full_like(args["cond"], float("nan"))
    x_next = guided_flow_step(args["sample"], args["cond"], dt=args["dt"], uncond=args["uncond"], sub=args["sub"],
                              guidance_scale=args["guidance_scale"], omega=args["omega"], mode=mode, out=out,
                              guided_out=d, backend=backend, **extra)
    assert x_next is out
    return out, d


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def f64_reference(args):
    """x_{t−1} and D in float64, from the fp32 values of the inputs and scalars (what fp32 mode computes with)."""
    f = lambda t: t.to(torch.float64)  # noqa: E731
    s32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    c = f(args["cond"])
    d = c if args["uncond"] is None else f(args["uncond"]) + s32(args["guidance_scale"]) * (c - f(args["uncond"]))
    sub = args["sub"]
    if sub is not None:
        mean = f(sub) if sub.dim() == c.dim() else f(sub).mean(0)
        d = d - s32(args["omega"]) * (mean - c)
    return f(args["sample"]) + float(args["dt"]) * d, d


def check_fp32_mode(args, backend):
    """fp32 mode against float64; tolerances and their reasons inline."""
    dtype = args["cond"].dtype
    x64, d64 = (t.cpu() for t in f64_reference(args))
    x_next, _ = (t.cpu() for t in run(args, "fp32", backend))
    x_exact, _ = (t.cpu() for t in run(args, "exact", backend))
    err = (x_next.double() - x64).abs()
    if dtype == torch.float32:
        # At most ~10 fp32 roundings, each ≤ 2^-24 relative to the magnitude of the value it rounds, and every such
        # value is bounded by `scale` (a sum of the terms' magnitudes); 16 × 2^-24 × scale bounds them with room.
        mag = lambda k: 0.0 if args[k] is None else args[k].cpu().double().abs()  # noqa: E731
        sub = mag("sub")
        sub = sub.amax(0) if torch.is_tensor(sub) and sub.dim() > x64.dim() else sub
        c, u = mag("cond"), mag("uncond")
        terms = d64.abs() + u + (args["guidance_scale"] or 0) * (c + u) + args["omega"] * (sub + c) + c
        scale = mag("sample") + abs(float(args["dt"])) * terms
        assert bool((err <= 16 * 2.0**-24 * scale).all()), float((err / scale).max())
    else:
        # fp32 intermediates are ~2^16 times finer than a bf16/fp16 ulp: the result is the float64 value rounded
        # once, or (within fp32 error of a tie) its neighbour, so never more than one ulp away...
        info = torch.finfo(dtype)
        ulp = (x64.abs() * info.eps).clamp_min(info.smallest_normal * info.eps)  # eps = 2^-(p-1): ≥ one ulp of x
        assert bool((err <= ulp).all())
        correctly_rounded = (x_next == x64.to(dtype)).double().mean()
        exact_rounded = (x_exact == x64.to(dtype)).double().mean()
        # ...and rounded correctly almost everywhere, more often than the op-by-op "exact" sequence manages.
        assert correctly_rounded >= 0.99
        assert correctly_rounded >= exact_rounded
