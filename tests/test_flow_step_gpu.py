"""guided_flow_step on a CUDA device: Triton and the CUDA C++ extension against the torch references.

Skipped without CUDA (tests/conftest.py); the extension tests also skip when it was not built
(S2FAST_BUILD_CUDA=1 pip install -e .). The reference's dt stays on the CPU, where the scheduler keeps it.
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
        x_next, d = run(args, "exact", backend)
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
    x_next, _ = run(args, "exact", "cuda")
    assert torch.equal(bits(x_next), bits(x_ref))


def test_cuda_extension_rejects_cpu_tensors_clearly():
    if "cuda" not in backends():
        pytest.skip("the CUDA extension is not built")
    from s2fast.kernels import _C

    x = torch.zeros(8)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        _C.guided_flow_step(x, x, None, None, 0, torch.zeros((), device="cuda"), x, None, 1.0, 0.0, True, False)
