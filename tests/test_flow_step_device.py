"""Where the fused step's kernel launches and which dt it rounds like, checked on the CPU (the GPU side is in
tests/test_flow_step_gpu.py): the launch runs under a guard that makes the tensors' device current, and exact mode
rounds as ``dt * D`` does with dt on the device the scheduler keeps its sigmas on."""

import pytest
import torch
from flow_step_cases import LAM, OMEGA, inputs, run
from s2fast.kernels import dispatch
from s2fast.kernels import flow_step as flow_step_module
from s2fast.kernels.flow_step_reference import unfused_flow_step
from s2fast.kernels.rounding import ScalarRounding, scalar_rounding


def test_the_launch_guard_selects_the_tensors_cuda_device():
    guard = dispatch.launch_guard(torch.device("cuda", 1))  # built without touching CUDA
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with dispatch.launch_guard(torch.device("cpu")):  # nothing to select for CPU tensors (Triton's interpreter)
        pass


def test_every_kernel_launch_goes_through_the_guard(monkeypatch):
    seen = []
    real = dispatch.launch_guard
    monkeypatch.setattr(dispatch, "launch_guard", lambda device: seen.append(device) or real(device))
    args = inputs((4, 5), torch.bfloat16, True, 1)
    run(args, "exact", "triton")  # Triton under its interpreter on the CPU
    run(args, "fp32", "torch")  # the torch path launches nothing of ours
    assert seen == [args["cond"].device]


def test_exact_mode_multiplies_by_dt_where_dt_device_says(monkeypatch):
    """The torch path reproduces ``dt * D`` with dt moved to dt_device, not always to the CPU."""
    seen = []
    real = flow_step_module.reference_flow_step
    monkeypatch.setattr(flow_step_module, "reference_flow_step",
                        lambda *a, **k: seen.append(a[4].device) or real(*a, **k))
    args = inputs((4, 5), torch.bfloat16, True, 1)
    run(args, "exact", "torch", dt_device="cpu")
    assert seen == [torch.device("cpu")]
    x, _ = run(args, "exact", "torch")
    expected, _ = unfused_flow_step(args["sample"], args["cond"], args["uncond"], args["sub"], args["dt"], LAM, OMEGA)
    assert torch.equal(x, expected)


def test_dt_device_is_checked():
    args = inputs((4, 5), torch.float32, True, 1)
    with pytest.raises(ValueError, match="dt_device is cuda:0, the tensors are on cpu"):
        run(args, "exact", "torch", dt_device="cuda:0")


def test_the_rounding_probe_takes_the_dt_device():
    for dtype in (torch.bfloat16, torch.float16):
        assert scalar_rounding("cpu", dtype, "cpu") == scalar_rounding("cpu", dtype) == ScalarRounding(False, True)


def test_the_fused_step_passes_the_schedulers_sigmas_device(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    import s2fast.fused_step
    from s2fast.fused_step import FusedStep, SchedulerHook

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    seen = {}
    monkeypatch.setattr(s2fast.fused_step, "guided_flow_step", lambda *a, **k: seen.update(k) or a[0])
    step = FusedStep(SchedulerHook(scheduler), scheduler, torch.device("cpu"), "exact")
    x = torch.zeros(2, 3)
    step.step(scheduler, x, scheduler.timesteps[0], x, None, [], None, 0.0)
    assert seen["dt_device"] == scheduler.sigmas.device and seen["dt"].device == x.device
