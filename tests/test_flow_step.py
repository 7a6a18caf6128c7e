"""guided_flow_step against its references, on every backend this machine can run.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); the CUDA extension and the GPU runs of
both kernels are in test_flow_step_gpu.py. "exact" must equal kernels/flow_step_reference.unfused_flow_step bit for
bit; "fp32" is held to the float64 result (tolerances below, with their reasons).
"""

import logging

import pytest
import torch
from flow_step_cases import DT, DTYPES, LAM, OMEGA, SHAPES, VARIANTS, bits, check_fp32_mode, inputs, run
from s2fast.kernels import dispatch, guided_flow_step
from s2fast.kernels.flow_step_reference import unfused_flow_step
from s2fast.kernels.rounding import ScalarRounding, effective_scalar, scalar_rounding

KERNEL_BACKENDS = ("torch", "triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"u{int(v[0])}s{v[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_mode_is_the_unfused_sequence_bit_for_bit(dtype, shape, variant, backend):
    args = inputs(shape, dtype, *variant)
    x_ref, d_ref = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"],
                                     args["guidance_scale"], args["omega"])
    x_next, d = run(args, "exact", backend)
    assert torch.equal(bits(x_next), bits(x_ref))  # tolerance 0, on the bits (a −0 for +0 would fail too)
    assert torch.equal(bits(d), bits(d_ref))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"u{int(v[0])}s{v[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_mode_is_the_float64_result_rounded_once(dtype, variant, backend):
    check_fp32_mode(inputs((64, 65), dtype, *variant, seed=1), backend)


def test_omega_zero_ignores_the_sub_network_and_out_may_be_the_sample():
    args = inputs((5, 9), torch.bfloat16, True, 1)
    expected, _ = unfused_flow_step(args["sample"], args["cond"], args["uncond"], None, args["dt"], LAM, 0.0)
    sample = args["sample"].clone()
    for backend in KERNEL_BACKENDS:
        x = sample.clone()
        guided_flow_step(x, args["cond"], dt=args["dt"], uncond=args["uncond"], sub=args["sub"], guidance_scale=LAM,
                         omega=0.0, mode="exact", out=x, backend=backend)
        assert torch.equal(x, expected)


def test_scalar_rounding_rules_of_torch_on_the_cpu():
    # torch 2.13, CPU: `tensor * float` multiplies by the fp32 scalar; `dt_0dim * tensor` rounds dt first.
    for dtype in (torch.bfloat16, torch.float16):
        assert scalar_rounding(torch.device("cpu"), dtype) == ScalarRounding(guidance_scale=False, dt=True)
    assert scalar_rounding(torch.device("cpu"), torch.float32) == ScalarRounding(False, False)
    assert effective_scalar(1 / 3, torch.bfloat16, True) == 0.333984375
    assert effective_scalar(1 / 3, torch.bfloat16, False) == float(torch.tensor(1 / 3, dtype=torch.float32))


# --- dispatch -------------------------------------------------------------------------------------------------------
def test_dispatch_order_and_overrides(monkeypatch, caplog):
    args = inputs((3, 4), torch.float32, True, 1)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tensors = [args["sample"], args["cond"]]
    assert dispatch.choose(None, tensors, True)[0] == "triton"  # no extension on this machine: Triton next
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.choose(None, tensors, True)[0] == "torch"
    assert dispatch.choose("triton", tensors, True)[0] == "triton"  # the argument beats the environment
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv(dispatch.ENV_VAR)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="s2fast"):
        assert dispatch.choose(None, tensors, True)[0] == "torch"
        assert dispatch.choose(None, tensors, True)[0] == "torch"
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 2 and "cuda" in reasons[0] and "TRITON_INTERPRET" in reasons[1]  # each reason once
    assert dispatch.fast_backend_for(torch.device("cpu")) is None  # "auto" never fuses on the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.fast_backend_for(torch.device("cpu"), "triton") == "triton"


def test_non_contiguous_inputs_fall_back_or_raise(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    args = inputs((6, 8), torch.bfloat16, True, 1)
    cond_t = args["cond"].t().contiguous().t()  # same values, transposed strides
    assert not cond_t.is_contiguous()
    expected, _ = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"], LAM, OMEGA)
    got = guided_flow_step(args["sample"], cond_t, dt=args["dt"], uncond=args["uncond"], sub=args["sub"],
                           guidance_scale=LAM, omega=OMEGA, mode="exact")
    assert torch.equal(got, expected)  # automatic choice: the torch reference takes any strides
    with pytest.raises(ValueError, match="contiguous"):
        guided_flow_step(args["sample"], cond_t, dt=args["dt"], uncond=args["uncond"], sub=args["sub"],
                         guidance_scale=LAM, omega=OMEGA, backend="triton")


BAD_CALLS = {
    "shape": (dict(uncond=torch.zeros(3, 5)), ValueError, "uncond has shape"),
    "dtype": (dict(uncond=torch.zeros(3, 4, dtype=torch.float16)), TypeError, "uncond has dtype"),
    "sub shape": (dict(sub=torch.zeros(2, 3, 5)), ValueError, "sub has shape"),
    "int dtype": (dict(cond=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "float32, bfloat16 or float16"),
    "dt 1-d": (dict(dt=torch.zeros(1)), ValueError, "dt must be a 0-dim float32"),
    "dt float64": (dict(dt=torch.tensor(0.1, dtype=torch.float64)), ValueError, "dt must be a 0-dim float32"),
    "dt number": (dict(dt=0.1), TypeError, "dt must be a torch.Tensor"),
    "no lambda": (dict(guidance_scale=None), ValueError, "needs a guidance_scale"),
    "nan omega": (dict(omega=float("nan")), ValueError, "omega must be a finite number"),
    "mode": (dict(mode="fast"), ValueError, "mode must be one of"),
    "out dtype": (dict(out=torch.zeros(3, 4, dtype=torch.bfloat16)), TypeError, "out has dtype"),
    "backend": (dict(backend="cuda"), ValueError, "needs CUDA tensors"),
    "backend name": (dict(backend="tensorrt"), ValueError, "is not a backend"),
}


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_raises_clearly_and_writes_nothing(case):
    change, error, message = BAD_CALLS[case]
    kw = dict(sample=torch.randn(3, 4), cond=torch.randn(3, 4), uncond=torch.randn(3, 4), sub=torch.randn(3, 4),
              dt=torch.tensor(0.1), guidance_scale=2.0, omega=0.5, out=torch.full((3, 4), 7.0))
    kw.update(change)
    before = kw["out"].clone()
    with pytest.raises(error, match=message):
        guided_flow_step(**kw)
    assert torch.equal(kw["out"], before)


def test_bad_backend_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="S2FAST_BACKEND='fastest'"):
        guided_flow_step(torch.randn(2), torch.randn(2), dt=torch.tensor(0.1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_exact_mode_keeps_the_pipelines_cfg_line_down_to_the_sign_of_zero(backend):
    # D = −0 (λ·(C − U) underflows to −0 in fp16 and U = −0); the pipeline's U + λ(C − U) on [D, D] turns it into +0,
    # and with x = −0 and dt < 0 that sign decides the sign of x_{t−1}. Dropping that line from the kernel fails here.
    tiny = torch.finfo(torch.float16).smallest_normal * torch.finfo(torch.float16).eps  # 2^-24
    u = torch.tensor([-0.0], dtype=torch.float16)
    c = torch.tensor([-tiny], dtype=torch.float16)
    x = torch.tensor([-0.0], dtype=torch.float16)
    args = dict(sample=x, cond=c, uncond=u, sub=None, dt=torch.tensor(DT), guidance_scale=0.3, omega=0.0)
    expected, d = unfused_flow_step(x, c, u, None, args["dt"], 0.3, 0.0)
    without_line = (x.float() + args["dt"] * d).to(torch.float16)  # the step applied to D itself
    assert torch.signbit(d).item() and torch.signbit(expected).item() != torch.signbit(without_line).item()
    got, _ = run(args, "exact", backend)
    assert torch.equal(bits(got), bits(expected))
