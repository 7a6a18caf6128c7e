"""S2Config(fused_step, step_mode) end to end: the fused step changes nothing but speed in "exact" mode, keeps the
scheduler's state, and falls back or refuses clearly where it cannot fuse."""

import logging

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from s2fast.kernels import dispatch

import s2fast
from s2fast import S2Config, tiny

MASKS = ((2,), (1, 3), (), (4,))


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def low_precision_family(name, dtype):
    shape = tiny.SD3Shape() if name == "sd3" else tiny.FluxShape()
    build = tiny.sd3_pipeline if name == "sd3" else tiny.flux_pipeline
    pipe = build(shape, dtype=dtype, with_vae=False)
    scale_key = "guidance_scale" if name == "sd3" else "true_cfg_scale"
    kw = dict(tiny.embeddings(shape, dtype=dtype), **tiny.image_size(pipe, shape), num_inference_steps=4,
              output_type="latent", **{scale_key: 4.3})
    return pipe, kw


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("num_masks", [1, 2])
def test_exact_fused_step_gives_bit_identical_latents(name, dtype, backend, num_masks, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    pipe, kw = low_precision_family(name, dtype)
    config = S2Config(omega=0.5, seed=3, num_masks=num_masks, drop_ratio=0.3)
    run = lambda: pipe(**kw, generator=torch.Generator().manual_seed(0)).images  # noqa: E731
    s2fast.wrap(pipe, config.replace(fused_step=False))
    unfused = run()
    s2fast.wrap(pipe, config.replace(fused_step=True, step_mode="exact"))
    fused = run()
    assert torch.equal(bits(fused), bits(unfused))  # tolerance 0: "exact" is the unfused sequence, op for op
    assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps)  # the scheduler advanced as the stock one
    s2fast.wrap(pipe, config.replace(fused_step=True, step_mode="fp32"))
    fp32 = run()
    if dtype != torch.float32:  # fp32 model: the same fp32 ops either way (but for FMA contraction on a GPU)
        assert not torch.equal(fp32, unfused)  # one rounding instead of ~10 per step: a different, closer value
    # fp32 vs the op-by-op sequence: both within their rounding error of the same math; over 4 steps a latent of
    # magnitude ~3 moves by at most a few of its ulps (bf16: 2^-7 relative) in each.
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}[dtype]
    torch.testing.assert_close(fp32.float(), unfused.float(), atol=tol, rtol=0)


def test_auto_does_not_fuse_on_the_cpu_and_true_does(sd3, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    stock_step = type(sd3.pipe.scheduler).step
    calls = []
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", lambda *a, **k: calls.append(1) or stock_step(*a, **k))
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS))  # fused_step="auto": no kernel backend for CPU tensors
    unfused = sd3()
    assert len(calls) == 4 and "step" not in sd3.pipe.scheduler.__dict__
    calls.clear()
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
    assert torch.equal(sd3(), unfused)
    assert calls == [] and "step" in sd3.pipe.scheduler.__dict__  # every step served by the fused value
    s2fast.unwrap(sd3.pipe)
    assert "step" not in sd3.pipe.scheduler.__dict__


def test_the_scheduler_hook_serves_only_the_call_it_was_computed_for(sd3):
    from s2fast.fused_step import _Pending

    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
    sd3()
    scheduler, fresh = sd3.pipe.scheduler, FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config)
    for s in (scheduler, fresh):
        s.set_timesteps(4)
    t = scheduler.timesteps[0]
    x, v, stale = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.full((1, 4, 8, 8), 99.0)
    scheduler.step.pending = _Pending(sample=x.clone(), timestep=t, index=0, x_next=stale)  # another sample object
    stock = fresh.step(v, t, x, return_dict=False)[0]
    assert torch.equal(scheduler.step(v, t, x, return_dict=False)[0], stock)  # stock step, never the stale value
    assert scheduler.step.pending is None and scheduler.step_index == fresh.step_index == 1
    t1 = scheduler.timesteps[1]  # one object: the pipeline passes its loop variable to both calls
    scheduler.step.pending = _Pending(sample=x, timestep=t1, index=1, x_next=stale)
    assert scheduler.step(v, t1, x).prev_sample is stale  # the matching call is served
    assert scheduler.step_index == 2


def test_other_schedulers_fall_back_with_a_notice_or_refuse(sd3, caplog):
    original = sd3.pipe.scheduler
    config = S2Config(omega=0.5, masks=MASKS)
    s2fast.wrap(sd3.pipe, config)
    stochastic = FlowMatchEulerDiscreteScheduler.from_config(original.config, stochastic_sampling=True)
    try:
        for scheduler in (EulerDiscreteScheduler.from_config(original.config), stochastic):
            sd3.pipe.scheduler = scheduler
            with pytest.raises(ValueError, match="fused_step=True"):
                s2fast.wrap(sd3.pipe, S2Config(fused_step=True))
            assert s2fast.config_of(sd3.pipe) is config  # the failed wrap changed nothing
        sd3.pipe.scheduler = original
        s2fast.wrap(sd3.pipe, config.replace(fused_step=True))
        sd3.pipe.scheduler = stochastic  # replaced after wrap: checked again at the call, before any step
        with pytest.raises(ValueError, match="stochastic_sampling"):
            sd3()
        s2fast.wrap(sd3.pipe, config)  # "auto"
        dispatch._logged.clear()
        with caplog.at_level(logging.INFO, logger="s2fast"):
            sd3()
            sd3()
        notices = [r.getMessage() for r in caplog.records if "unfused" in r.getMessage()]
        assert len(notices) == 1 and "stochastic_sampling" in notices[0]  # once, with the reason
        assert "step" not in stochastic.__dict__
    finally:
        sd3.pipe.scheduler = original


def test_a_replaced_scheduler_gets_the_hook_and_the_old_one_loses_it(sd3, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    original = sd3.pipe.scheduler
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
    first = sd3()
    replacement = FlowMatchEulerDiscreteScheduler.from_config(original.config)
    sd3.pipe.scheduler = replacement
    try:
        assert torch.equal(sd3(), first)
        assert "step" not in original.__dict__ and "step" in replacement.__dict__
    finally:
        s2fast.unwrap(sd3.pipe)
        sd3.pipe.scheduler = original
    assert "step" not in replacement.__dict__


def test_config_fields_are_validated():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="fused_step"):
            S2Config(fused_step=bad)
    with pytest.raises(ValueError, match="step_mode"):
        S2Config(step_mode="fp16")
    assert S2Config().fused_step == "auto" and S2Config().step_mode == "fp32"


def test_a_deep_copied_scheduler_steps_itself(sd3):
    import copy

    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
    sd3()
    original = sd3.pipe.scheduler
    clone = copy.deepcopy(original)
    clone.set_timesteps(4)
    index_before = original.step_index
    t = clone.timesteps[0]
    clone.step(torch.randn(1, 4, 8, 8), t, torch.randn(1, 4, 8, 8))
    assert clone.step_index == 1 and original.step_index == index_before
    assert clone.step.scheduler_ref() is clone
