"""guided_flow_step on a CUDA device: Triton and the CUDA C++ extension against the torch references.

Skipped without CUDA (tests/conftest.py); the extension tests also skip when it was not built
(see kernels/flow_step_cuda.py). Exact mode is checked with dt on the CPU and on the device (where diffusers'
scheduler keeps it): torch rounds the two differently.
"""

import pytest
import torch
from flow_step_cases import DTYPES, SHAPES, VARIANTS, bits, check_fp32_mode, inputs, run
from s2fast.kernels import dispatch
from s2fast.kernels.flow_step_reference import unfused_flow_step

pytestmark = pytest.mark.gpu


def backends():
    names = ["triton"]
    if dispatch._import("cuda")[0] is not None:
        names.append("cuda")
    return names


def cuda_inputs(shape, dtype, variant, seed=0):
    return inputs(shape, dtype, *variant, seed=seed, device="cuda")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"u{int(v[0])}s{v[1]}")
@pytest.mark.parametrize("shape", SHAPES + ((1, 16, 128, 128),), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_on_cuda_is_the_unfused_sequence_bit_for_bit(dtype, shape, variant):
    args = cuda_inputs(shape, dtype, variant)
    x_ref, d_ref = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"].cpu(),
                                     args["guidance_scale"], args["omega"])
    for backend in backends():
        x_next, d = run(args, "exact", backend, dt_device="cpu")  # the reference multiplies by a CPU dt
        assert torch.equal(bits(x_next), bits(x_ref)), backend
        assert torch.equal(bits(d), bits(d_ref)), backend


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"u{int(v[0])}s{v[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_on_cuda_is_the_float64_result_rounded_once(dtype, variant):
    for backend in backends():
        check_fp32_mode(cuda_inputs((64, 65), dtype, variant, seed=1), backend)


@pytest.mark.parametrize("offset", [1, 3])
def test_cuda_extension_unaligned_and_tail_paths(offset):
    # A storage offset breaks 16-byte alignment (scalar path); 4099 elements leave a tail after the vector packs.
    if "cuda" not in backends():
        pytest.skip("the CUDA extension is not built")
    base = cuda_inputs((4099 + offset,), torch.bfloat16, (True, 2))
    args = dict(base, sample=base["sample"][offset:], cond=base["cond"][offset:], uncond=base["uncond"][offset:],
                sub=base["sub"][:, offset:].contiguous())
    x_ref, _ = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"].cpu(),
                                 args["guidance_scale"], args["omega"])
    x_next, _ = run(args, "exact", "cuda", dt_device="cpu")
    assert torch.equal(bits(x_next), bits(x_ref))


def test_cuda_extension_rejects_cpu_tensors_clearly():
    if "cuda" not in backends():
        pytest.skip("the CUDA extension is not built")
    from s2fast.kernels import _C

    x = torch.zeros(8)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.guided_flow_step(x, x, None, None, 0, torch.zeros((), device="cuda"), x, None, 1.0, 0.0, True, False)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"u{int(v[0])}s{v[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_with_dt_on_the_device_is_the_unfused_sequence(dtype, variant):
    """diffusers keeps the scheduler's sigmas, hence dt, on the pipeline's device; torch rounds ``dt * D`` with a
    device dt differently from a CPU one, and exact mode follows dt_device."""
    args = cuda_inputs((1, 16, 64, 64), dtype, variant)
    x_ref, d_ref = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"],
                                     args["guidance_scale"], args["omega"])  # dt on CUDA
    for backend in ["torch"] + backends():
        x_next, d = run(args, "exact", backend, dt_device=args["dt"].device)
        assert torch.equal(bits(x_next), bits(x_ref)), backend
        assert torch.equal(bits(d), bits(d_ref)), backend


def test_rounding_probe_with_a_device_dt():
    from s2fast.kernels.rounding import scalar_rounding

    for dtype in (torch.bfloat16, torch.float16):
        scalar_rounding("cuda", dtype, "cuda")  # raises when neither rule matches torch on this device
        scalar_rounding("cuda", dtype, "cpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_launch_on_the_second_device_while_the_first_is_current():
    torch.cuda.set_device(0)
    args = inputs((4099,), torch.bfloat16, True, 1, device="cuda:1")
    x_ref, _ = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"],
                                 args["guidance_scale"], args["omega"])
    for backend in backends():
        x_next, _ = run(args, "exact", backend)
        torch.cuda.synchronize(1)
        assert torch.equal(bits(x_next), bits(x_ref)), backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_exact_pipeline_equals_the_unfused_pipeline_on_cuda(dtype):
    """End to end: the scheduler's dt lives on the GPU, and exact mode must match the stock step bit for bit."""
    import s2fast
    from s2fast import S2Config, tiny

    shape = tiny.SD3Shape()
    pipe = tiny.sd3_pipeline(shape, dtype=dtype, with_vae=False).to("cuda")
    kw = dict(tiny.embeddings(shape, dtype=dtype), **tiny.image_size(pipe, shape), output_type="latent",
              num_inference_steps=8, guidance_scale=4.0)
    kw = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    results = {}
    try:
        for fused in (True, False):
            s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, fused_step=fused, step_mode="exact"))
            results[fused] = pipe(**kw, generator=torch.Generator("cuda").manual_seed(0)).images
    finally:
        s2fast.unwrap(pipe)
    assert torch.equal(results[True], results[False])
