"""S2Config.sigma_interval: S² placed by noise level, read from the scheduler's sigmas at each call."""

import pytest
import torch

import s2fast
from s2fast import S2Config, tiny
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline
from s2fast.masks import in_sigma_interval, sample_step, schedule

LABELS = [3, 7, 0]
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = DigitsFlowPipeline(build_transformer(num_layers=4, attention_head_dim=8).eval(), build_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, steps=STEPS, seed=0):
    return pipe(LABELS, guidance_scale=3.0, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def call_sigmas(pipe, steps):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma_interval=(0.9, 0.1)), "0 <= low < high"),
    (dict(sigma_interval=(0.5, 0.5)), "0 <= low < high"),
    (dict(sigma_interval=(-0.1, 0.5)), "0 <= low < high"),
    (dict(sigma_interval=(0.1,)), "(low, high)"),
    (dict(sigma_interval=(0.1, float("nan"))), "sigma_interval must be a finite number"),
    (dict(sigma_interval="0.1,0.9"), "sigma_interval must be a tuple or list"),
    (dict(sigma_interval=(0.1, 0.9), masks=((1,),)), "without masks or a step interval"),
    (dict(sigma_interval=(0.1, 0.9), interval=(0.1, 0.9)), "without masks or a step interval"),
])
def test_bad_sigma_intervals_are_refused(kwargs, message):
    with pytest.raises(ValueError) as info:
        S2Config(**kwargs)
    assert message in str(info.value) and "sigma_interval" in str(info.value)


def test_sigma_interval_is_stored_as_floats_and_allows_sigmas_above_one():
    cfg = S2Config(sigma_interval=[0, 14])  # Karras-style schedulers use σ far above 1
    assert cfg.sigma_interval == (0.0, 14.0) and isinstance(cfg.sigma_interval[1], float)
    assert S2Config().sigma_interval is None


def test_bounds_are_closed_at_both_ends():
    assert in_sigma_interval(0.9, (0.1, 0.9)) and in_sigma_interval(0.1, (0.1, 0.9))
    assert not in_sigma_interval(0.9000001, (0.1, 0.9)) and not in_sigma_interval(0.0999, (0.1, 0.9))


def test_schedule_applies_s2_where_sigma_lies_in_range_and_keeps_each_steps_masks():
    cfg = S2Config(seed=3, sigma_interval=(0.2, 0.6))
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    got = schedule(cfg, 6, 10, sigmas=sigmas + [0.0])
    assert [bool(m) for m in got] == [False, False, True, True, True, False]
    # the masks of the active steps are those of the same seed and step under any placement rule
    full = schedule(S2Config(seed=3), 6, 10)
    assert all(got[i] == full[i] for i in (2, 3, 4))
    assert got[2] == sample_step(3, 2, cfg, 10)


def test_schedule_without_sigmas_is_refused():
    with pytest.raises(ValueError, match="sigma_interval needs the noise level"):
        schedule(S2Config(seed=0, sigma_interval=(0.1, 0.9)), 4, 10)
    with pytest.raises(ValueError, match="sigma_interval needs the noise level"):
        schedule(S2Config(seed=0, sigma_interval=(0.1, 0.9)), 4, 10, sigmas=[1.0, 0.5])


def test_a_call_reads_the_schedulers_sigmas_and_trace_reports_what_ran(pipe):
    sigmas = call_sigmas(pipe, STEPS)
    inside = [0.1 <= s <= 0.9 for s in sigmas]
    # the flow-matching schedule starts at σ = 1: the central 80 % must leave out the first step and keep most
    assert sigmas[0] == 1.0 and not inside[0] and 4 <= sum(inside) < STEPS
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=5, sigma_interval=(0.1, 0.9)))
    try:
        got = run(pipe)
        trace = s2fast.trace(pipe)
        assert [bool(m) for m in trace] == inside
        # independent of how the schedule was placed: the explicit masks of the same steps give the same pixels
        expected_masks = tuple(sample_step(5, i, S2Config(seed=5), 4)[0] if inside[i] else () for i in range(STEPS))
        assert trace == expected_masks
        s2fast.wrap(pipe, S2Config(omega=0.5, masks=expected_masks))
        assert torch.equal(run(pipe), got)
        # and the interval changes the result (the first step's S² term is gone): not a no-op
        s2fast.wrap(pipe, S2Config(omega=0.5, seed=5))
        assert (run(pipe) - got).abs().max() > 1e-4
    finally:
        s2fast.unwrap(pipe)


def test_a_different_step_count_rereads_the_sigmas(pipe):
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=1, sigma_interval=(0.0, 0.5)))
    try:
        for steps in (4, 10):
            run(pipe, steps=steps)
            assert [bool(m) for m in s2fast.trace(pipe)] == [s <= 0.5 for s in call_sigmas(pipe, steps)]
    finally:
        s2fast.unwrap(pipe)


def test_a_scheduler_without_sigmas_is_refused_before_any_step(pipe):
    class NoSigmas:
        """A scheduler as DDIM's is for this purpose: timesteps, a step, no sigmas."""

        config = {}

        def set_timesteps(self, n, device=None):
            self.timesteps = torch.linspace(999, 0, n)

        def step(self, *args, **kwargs):  # pragma: no cover - the refusal comes first
            raise AssertionError("a step ran before the refusal")

    own = pipe.scheduler
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, sigma_interval=(0.1, 0.9)))
    try:
        pipe.scheduler = NoSigmas()
        with pytest.raises(ValueError, match="NoSigmas.*has no sigmas.*use interval"):
            run(pipe)
    finally:
        pipe.scheduler = own
        s2fast.unwrap(pipe)


# --- strength: the loop runs the last part of the schedule ------------------------------------------------------
def _strength_case(name):
    """(pipe, call kwargs, σ of a transformer call's timestep) for a pipeline whose loop runs the last ``strength``
    part of an 8-step schedule (4 steps)."""
    if name.startswith("sd3") or name.startswith("flux"):
        family, kind = name.split("-")
        shape = tiny.SD3Shape() if family == "sd3" else tiny.FluxShape()
        pipe = tiny.sd3_sibling_pipeline(kind, shape) if family == "sd3" else tiny.flux_sibling_pipeline(kind, shape)
        images = tiny.sibling_images(pipe, shape)
        kw = dict(tiny.embeddings(shape), **tiny.image_size(pipe, shape), image=images["image"],
                  num_inference_steps=8, strength=0.5, output_type="latent")
        if kind == "inpaint":
            kw["mask_image"] = images["mask_image"]
        if family == "flux":
            kw["true_cfg_scale"] = 4.0
            return pipe, kw, lambda t: float(t[0])  # Flux passes timestep / 1000
        kw["guidance_scale"] = 4.0
        return pipe, kw, lambda t: float(t[0]) / 1000
    shape = tiny.WanShape()
    pipe = tiny.wan_pipeline(shape, video_to_video=True, scheduler="euler", seed=9)
    size = tiny.wan_video_size(pipe, shape)
    latents = torch.randn(1, 16, shape.latent_frames, shape.latent_size, shape.latent_size,
                          generator=torch.Generator().manual_seed(0))
    kw = dict(tiny.wan_embeddings(shape), height=size["height"], width=size["width"], num_inference_steps=8,
              strength=0.5, guidance_scale=4.0, output_type="latent", latents=latents)
    return pipe, kw, lambda t: float(t[0]) / 1000


@pytest.mark.parametrize("name", ["sd3-img2img", "sd3-inpaint", "flux-img2img", "wan-v2v"])
def test_sigma_interval_reads_the_noise_levels_the_loop_runs(name):
    """With strength 0.5 the loop runs the last 4 of 8 steps: S² is placed by the σ of those steps (read here from
    the timestep each transformer call receives), not by the full schedule's first four."""
    pipe, kw, sigma_of = _strength_case(name)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(sigma_of(kwargs["timestep"])), with_kwargs=True)
    try:
        pipe(**kw)  # stock: the σ of each step the loop runs (the first of each step's calls)
        sigmas = sorted(set(seen), reverse=True)
        assert len(sigmas) == 4
        high = (sigmas[1] + sigmas[2]) / 2  # S² at the last two steps the loop runs
        s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, sigma_interval=(0.0, high)))
        pipe(**kw)
        assert [bool(m) for m in s2fast.trace(pipe)] == [False, False, True, True]
    finally:
        handle.remove()
        s2fast.unwrap(pipe)
