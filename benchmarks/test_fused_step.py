"""The fused guidance + scheduler step against the unfused torch sequence it replaces, on a CUDA device.

Sizes: SD3 at 1024² (latent 1×16×128×128), a batch of 4, a Wan-shaped video latent (1×16×21×60×104), and 256 MiB
per tensor; bf16 and fp32; the S² variant (U, C, one S). Each result says whether the step's six tensors fit in the
GPU's L2 (then its GB/s is L2 bandwidth, not DRAM's) or not. Each case is captured ITERS times into a CUDA graph
and timed by CUDA events around a replay, so the numbers are GPU time without Python launch overhead (which the
pipeline loop pays equally for one kernel and hides behind the transformer for the rest). Achieved bandwidth counts
the fused kernel's own traffic, 4 reads + 2 writes per element (x, C, U, S in; x_{t−1}, D out), against the
device's copy bandwidth measured in the same run (bytes read + written by a 512 MiB device-to-device copy).

The baseline "unfused" is what the fused op replaces in a wrapped pipeline: s2fast's Eq. 4 (guided_prediction)
then FlowMatchEulerDiscreteScheduler.step's arithmetic, with dt a 0-dim tensor on the GPU, where diffusers' scheduler
keeps its sigmas.

    .venv/bin/pytest benchmarks/test_fused_step.py --benchmark-only      # skipped without CUDA
"""

import pytest
import torch
from s2fast.kernels import dispatch, guided_flow_step, guided_prediction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="times GPU kernels: no CUDA device here")

# The latents of real pipelines fit in a GPU's L2 (50 MB on an H100/H200) with all six tensors of the step, so their
# GB/s is L2 bandwidth; "dram-256MiB" makes every tensor 256 MiB, far past any L2, so its GB/s is DRAM bandwidth,
# the number to hold against the copy bandwidth (itself measured on 512 MiB buffers). Each result says which.
SIZES = {"sd3-1024": (1, 16, 128, 128), "sd3-1024-b4": (4, 16, 128, 128), "wan-video": (1, 16, 21, 60, 104),
         "dram-256MiB": None}
DRAM_BYTES = 256 * 2**20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAMBDA, OMEGA, DT = 7.0, 0.25, -0.0357
ITERS, ROUNDS = 20, 15


def graph_case(fn, iters=ITERS):
    """A case that replays ``iters`` calls of ``fn`` captured in one CUDA graph; returns seconds per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture: Triton compiles, the allocator settles
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def case():
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    return case


@pytest.fixture(scope="module")
def copy_bandwidth():
    n = 512 * 2**20 // 4
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    case = graph_case(lambda: dst.copy_(src), iters=10)
    seconds = sorted(case() for _ in range(10))[5]
    return 2 * n * 4 / seconds  # bytes read + written per second


def kernel_backends():
    return ["triton"] + (["cuda"] if dispatch._import("cuda")[0] is not None else [])


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_fused_step_vs_unfused(interleaved, copy_bandwidth, size, dtype_name):
    torch.set_grad_enabled(False)
    dtype, shape = DTYPES[dtype_name], SIZES[size]
    if shape is None:  # every tensor DRAM_BYTES, whatever the dtype
        shape = (DRAM_BYTES // torch.tensor([], dtype=dtype).element_size(),)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, c, u, s = (torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(4))
    dt_dev = torch.tensor(DT, device="cuda")
    out, d = torch.empty_like(c), torch.empty_like(c)

    def unfused():
        value = guided_prediction(c, u, [s], LAMBDA, OMEGA)
        return (x.to(torch.float32) + dt_dev * value).to(value.dtype)

    cases = {"unfused": graph_case(unfused)}
    for backend in kernel_backends():
        for mode in ("fp32", "exact"):
            fn = lambda b=backend, m=mode: guided_flow_step(  # noqa: E731
                x, c, dt=dt_dev, uncond=u, sub=s, guidance_scale=LAMBDA, omega=OMEGA, mode=m, out=out, guided_out=d,
                backend=b)
            cases[f"{backend}-{mode}"] = graph_case(fn)
    summary = interleaved(f"fused-step {size} {dtype_name}", cases, "unfused", ROUNDS, self_timed=True)
    fused_bytes = 6 * c.numel() * c.element_size()
    l2 = getattr(torch.cuda.get_device_properties(c.device), "L2_cache_size", 0)
    for name, r in summary.items():
        r["speedup"] = 1.0 / r["ratio"]
        r["MiB_each"] = c.numel() * c.element_size() / 2**20
        r["resident"] = "L2" if fused_bytes <= l2 else "DRAM"  # what the GB/s measures
        if name != "unfused":
            r["GB/s"] = fused_bytes / r["median_s"] / 1e9
            r["of_copy"] = fused_bytes / r["median_s"] / copy_bandwidth
    summary["unfused"]["copy_GB/s"] = copy_bandwidth / 1e9
