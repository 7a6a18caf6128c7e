"""Wan 2.1 / 2.2 under s2fast.wrap: WanPipeline (text-to-video, two experts, TI2V's per-token timesteps) and
WanImageToVideoPipeline, against a plain three-pass loop written in the tests (tests/s2_reference.py).

The pipelines have no text encoder here (a UMT5 needs a tokenizer that cannot be built offline): prompt and
negative embeddings are passed directly, as the other families' tests do. Tolerances: the stock loop makes two
batch-B transformer calls per step (cond, uncond) where s2fast makes one batch-2B call, and the reference makes
batch-B calls; fp32 GEMMs of different row counts round differently (~1e-7 relative per op), which the UniPC
multistep update carries through the steps. atol 1e-4 bounds that; S² (ω = 0.5) moves the result by far more
(each test that compares with the reference checks that ω changes it by > 1e-2).
"""

import numpy as np
import pytest
import torch
from built_once import BuiltOnce
from PIL import Image
from s2_reference import wan_three_pass

import s2fast
from s2fast import S2Config, tiny
from s2fast.fused_step import SchedulerHook

TOL = dict(atol=1e-4, rtol=1e-4)
STEPS = 4
SHAPE = tiny.WanShape()
I2V_SHAPE = tiny.WanShape(image_dim=8)


def _image(size):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


class Case:
    """A tiny Wan pipeline and how to call it and its reference."""

    def __init__(self, pipe, shape, image=False, **call):
        self.pipe, self.shape = pipe, shape
        self.emb = tiny.wan_embeddings(shape)
        self.size = tiny.wan_video_size(pipe, shape)
        self.image = _image(self.size["height"]) if image else None
        self.call = call

    def kwargs(self, lam=4.0, seed=0, **more):
        kw = dict(self.emb, **self.size, num_inference_steps=STEPS, guidance_scale=lam, output_type="latent",
                  generator=torch.Generator().manual_seed(seed), **self.call)
        if self.image is not None:
            kw["image"] = self.image
        kw.update(more)
        return kw

    def __call__(self, **kw):
        return self.pipe(**self.kwargs(**kw)).frames

    def reference(self, masks, lam=4.0, omega=0.5, cfg=True):
        emb = self.emb if cfg else {k: v for k, v in self.emb.items() if k != "negative_prompt_embeds"}
        return wan_three_pass(self.pipe, emb, masks, steps=STEPS, lam=lam, lam_2=self.call.get("guidance_scale_2"),
                              omega=omega, image=self.image, cfg=cfg, **self.size)


_BUILD = {
    "wan21": lambda: Case(tiny.wan_pipeline(SHAPE), SHAPE),
    # Wan 2.2 A14B: two experts; with 4 UniPC steps (shift 3) the timesteps are 999, 908, 769, 556: a boundary of
    # 0.85 puts two steps on each expert; guidance_scale_2 differs from guidance_scale
    "wan22": lambda: Case(tiny.wan_pipeline(SHAPE, experts=2, boundary_ratio=0.85, seed=1), SHAPE,
                          guidance_scale_2=2.5),
    "ti2v": lambda: Case(tiny.wan_pipeline(SHAPE, expand_timesteps=True, seed=2), SHAPE),
    "i2v21": lambda: Case(tiny.wan_pipeline(I2V_SHAPE, image_to_video=True, seed=3), I2V_SHAPE, image=True),
    "i2v22": lambda: Case(tiny.wan_pipeline(SHAPE, image_to_video=True, experts=2, boundary_ratio=0.85, seed=4),
                          SHAPE, image=True, guidance_scale_2=3.0),
    "ti2v_i2v": lambda: Case(tiny.wan_pipeline(SHAPE, image_to_video=True, expand_timesteps=True, seed=5), SHAPE,
                             image=True),
}
_CASES = BuiltOnce(_BUILD)


@pytest.fixture(params=list(_BUILD))
def case(request):
    yield from _CASES.unwrapped_after(request.param)


@pytest.fixture
def wan21():
    yield from _CASES.unwrapped_after("wan21")


@pytest.fixture
def wan22():
    yield from _CASES.unwrapped_after("wan22")


MASKS = ((1,), (2, 3), (), (2,))  # on both sides of the boundary for the two-expert cases


def test_omega_zero_is_stock_within_batch_rounding_and_unwrap_is_bit_exact(case):
    stock = case()
    s2fast.wrap(case.pipe, S2Config(omega=0.0))
    # one batch-2B call against the stock loop's two batch-B calls: fp32 rounding only (module docstring)
    torch.testing.assert_close(case(), stock, **TOL)
    s2fast.unwrap(case.pipe)
    torch.testing.assert_close(case(), stock, atol=0, rtol=0)


def test_s2_matches_a_plain_three_pass_loop(case):
    expected = case.reference(MASKS)
    s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=MASKS))
    got = case()
    torch.testing.assert_close(got, expected, **TOL)
    assert s2fast.trace(case.pipe) == MASKS
    s2fast.wrap(case.pipe, S2Config(omega=0.0))
    assert (case() - got).abs().max() > 1e-2  # S² is visible well above the tolerance


def test_without_cfg_s2_applies_to_the_cond_prediction(wan21):
    expected = wan21.reference(MASKS, lam=1.0, cfg=False)
    s2fast.wrap(wan21.pipe, S2Config(omega=0.5, masks=MASKS))
    got = wan21(lam=1.0, negative_prompt_embeds=None)
    torch.testing.assert_close(got, expected, **TOL)


def test_two_experts_trace_names_the_expert_beside_the_masks(wan22):
    config = S2Config(omega=0.5, seed=3, drop_ratio=0.3)
    s2fast.wrap(wan22.pipe, config)
    wan22()
    assert s2fast.trace_denoisers(wan22.pipe) == ("transformer",) * 2 + ("transformer_2",) * 2
    trace = s2fast.trace(wan22.pipe)
    assert len(trace) == STEPS and all(isinstance(m, tuple) and len(m) == 1 for m in trace)  # round(0.3 · 3) = 1
    # the trace replays as explicit masks
    first = wan22()
    s2fast.wrap(wan22.pipe, S2Config(omega=0.5, masks=trace))
    torch.testing.assert_close(wan22(), first, atol=0, rtol=0)


def test_experts_of_different_block_counts_draw_masks_for_their_own_blocks():
    pipe = tiny.wan_pipeline(SHAPE, experts=2, boundary_ratio=0.85, expert_2_layers=2, seed=6)
    case = Case(pipe, SHAPE, guidance_scale_2=3.0)
    masks = ((1,), (), (1,), (1,))  # the first two steps run the 4-block expert, the last two the 2-block one
    expected = case.reference(masks)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=masks))
    torch.testing.assert_close(case(), expected, **TOL)
    # explicit masks are checked against every expert at wrap (which expert runs a step depends on the call)
    with pytest.raises(ValueError, match="drops block 3, but the model has 2 blocks"):
        s2fast.wrap(pipe, S2Config(omega=0.5, masks=((3,), (2,), (1,), ())))
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, drop_ratio=0.5))
    case()
    for mask, name in zip(s2fast.trace(pipe), s2fast.trace_denoisers(pipe)):
        assert max(mask) < (4 if name == "transformer" else 2)
    s2fast.unwrap(pipe)


def test_one_model_as_both_experts_is_named_as_the_loop_called_it():
    """transformer and transformer_2 holding the same model: trace_denoisers names the attribute the loop picked
    (the expert switch at the boundary), not the first attribute holding the model."""
    pipe = tiny.wan_pipeline(SHAPE, experts=2, boundary_ratio=0.85, seed=1)
    pipe.transformer_2 = pipe.transformer
    case = Case(pipe, SHAPE, guidance_scale_2=2.5)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    case()
    assert s2fast.trace_denoisers(pipe) == ("transformer",) * 2 + ("transformer_2",) * 2
    assert s2fast.trace(pipe) == MASKS
    s2fast.unwrap(pipe)


def test_the_low_noise_expert_alone_is_served():
    pipe = tiny.wan_pipeline(SHAPE, experts=2, boundary_ratio=1.0, seed=7)  # every t < 1000: transformer_2
    pipe.transformer = None
    case = Case(pipe, SHAPE)
    expected = case.reference(MASKS)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    torch.testing.assert_close(case(), expected, **TOL)
    assert s2fast.trace_denoisers(pipe) == ("transformer_2",) * STEPS


def test_flow_match_euler_fused_step_matches_unfused():
    pipe = tiny.wan_pipeline(SHAPE, scheduler="euler", seed=8)
    case = Case(pipe, SHAPE)
    expected = case.reference(MASKS)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, fused_step=False))
    unfused = case()
    torch.testing.assert_close(unfused, expected, **TOL)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, fused_step=True, step_mode="exact"))
    fused = case()
    assert SchedulerHook.installed_on(pipe.scheduler) is not None  # the scheduler's step was served fused
    torch.testing.assert_close(fused, unfused, atol=0, rtol=0)  # the exact mode rounds as the unfused sequence
    s2fast.unwrap(pipe)


def test_fused_step_true_refuses_unipc(wan21):
    with pytest.raises(ValueError, match="UniPCMultistepScheduler"):
        s2fast.wrap(wan21.pipe, S2Config(omega=0.5, fused_step=True))
    assert s2fast.config_of(wan21.pipe) is None


def test_callbacks_videos_per_prompt_lora_scale_and_output_types(wan21):
    s2fast.wrap(wan21.pipe, S2Config(omega=0.5, seed=0))
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 0.5}

    halved = wan21(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    assert seen == list(range(STEPS)) and torch.isfinite(halved).all()
    assert (halved - wan21()).abs().max() > 1e-3
    # batch-1 embeddings with two videos per prompt: both rows see the same prompt, different noise
    two = wan21(num_videos_per_prompt=2)
    assert two.shape[0] == 2 and (two[0] - two[1]).abs().max() > 1e-3
    # no LoRA is loaded: a LoRA scale changes nothing (and reaches the engine without error)
    torch.testing.assert_close(wan21(attention_kwargs={"scale": 0.5}), wan21(), atol=0, rtol=0)
    video = wan21(output_type="np")
    assert video.shape == (1, wan21.size["num_frames"], wan21.size["height"], wan21.size["width"], 3)
    frames = wan21(output_type="pil")
    assert len(frames[0]) == wan21.size["num_frames"] and isinstance(frames[0][0], Image.Image)


def test_videos_per_prompt_with_batch_one_embeddings_at_omega_zero_is_stock(wan21):
    stock = wan21(num_videos_per_prompt=2)  # the stock forward broadcasts the batch-1 text over 2 latent rows
    s2fast.wrap(wan21.pipe, S2Config(omega=0.0))
    torch.testing.assert_close(wan21(num_videos_per_prompt=2), stock, **TOL)


def test_prompt_and_negative_embeddings_of_different_lengths_run_apart(wan21):
    emb = dict(wan21.emb, negative_prompt_embeds=wan21.emb["negative_prompt_embeds"][:, :3])
    stock = wan21.pipe(**wan21.kwargs(**emb)).frames
    s2fast.wrap(wan21.pipe, S2Config(omega=0.0))
    torch.testing.assert_close(wan21.pipe(**wan21.kwargs(**emb)).frames, stock, **TOL)


def test_a_cache_on_wan_is_refused_by_name(wan21):
    from diffusers import FirstBlockCacheConfig

    wan21.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(ValueError, match="FirstBlockCache"):
            s2fast.wrap(wan21.pipe, S2Config(omega=0.5))
        assert s2fast.config_of(wan21.pipe) is None
    finally:
        wan21.pipe.transformer.disable_cache()
        for module in wan21.pipe.transformer.modules():
            module.__dict__.pop("forward", None)


def test_the_other_wan_pipelines_are_refused_by_name():
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    transformer = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, vace_layers=[0])
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=tiny.wan_scheduler(),
                           transformer=transformer)
    with pytest.raises(ValueError, match="does not support WanVACEPipeline; supported pipelines: .*WanPipeline"):
        s2fast.wrap(pipe)


def _video_to_video():
    pipe = tiny.wan_pipeline(SHAPE, video_to_video=True, scheduler="euler", seed=9)
    emb = tiny.wan_embeddings(SHAPE)
    size = tiny.wan_video_size(pipe, SHAPE)
    noisy = torch.randn(1, 16, SHAPE.latent_frames, SHAPE.latent_size, SHAPE.latent_size,
                        generator=torch.Generator().manual_seed(0))
    kw = dict(emb, height=size["height"], width=size["width"], num_inference_steps=8, strength=0.5,
              guidance_scale=4.0, output_type="latent")
    return pipe, emb, size, noisy, kw


def test_video_to_video_matches_a_plain_three_pass_loop():
    pipe, emb, size, noisy, kw = _video_to_video()
    masks = ((1,), (), (2, 3), (2,))  # strength 0.5 of 8 steps: the loop runs 4
    expected = wan_three_pass(pipe, emb, masks, steps=8, strength=0.5, lam=4.0, omega=0.5, latents=noisy.clone(),
                              **size)
    stock = pipe(**kw, latents=noisy.clone()).frames
    s2fast.wrap(pipe, S2Config(omega=0.0))
    torch.testing.assert_close(pipe(**kw, latents=noisy.clone()).frames, stock, **TOL)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=masks))
    got = pipe(**kw, latents=noisy.clone()).frames
    torch.testing.assert_close(got, expected, **TOL)
    assert s2fast.trace(pipe) == masks and (got - stock).abs().max() > 1e-2
    # from a video (the pipeline encodes and noises it): runs, and ω = 0 is stock
    video = [_image(size["height"]) for _ in range(size["num_frames"])]
    s2fast.unwrap(pipe)
    stock = pipe(**kw, video=video, generator=torch.Generator().manual_seed(0)).frames
    s2fast.wrap(pipe, S2Config(omega=0.0))
    torch.testing.assert_close(pipe(**kw, video=video, generator=torch.Generator().manual_seed(0)).frames, stock, **TOL)
    s2fast.unwrap(pipe)


@pytest.mark.parametrize("name", ["wan22", "ti2v"])
def test_block_graphs_serve_wan_blocks_and_equal_eager(name):
    """Block graphs through the CPU stand-in backend (the CUDA graph buffer contract): both experts' blocks, and
    TI2V's per-token modulation, replay graphs captured at the warm-up, bit for bit equal to the eager engine."""
    from s2fast.graphs import EagerBackend

    case = _CASES[name]
    config = S2Config(omega=0.5, drop_ratio=0.5, seed=None)  # fresh masks every call
    graphed, traces = [], []
    s2fast.wrap(case.pipe, config, _graph_backend=EagerBackend())
    try:
        for seed in range(2):
            graphed.append(case(seed=seed))
            traces.append(s2fast.trace(case.pipe))
        stats = s2fast.graph_stats(case.pipe)
        for seed, masks in enumerate(traces):
            s2fast.wrap(case.pipe, config.replace(masks=masks))
            assert torch.equal(graphed[seed], case(seed=seed))
    finally:
        s2fast.unwrap(case.pipe)
    assert stats["replays"] > 0 and stats["eager_calls"] == 0
    experts = 2 if name == "wan22" else 1
    assert stats["captures"] <= experts * SHAPE.num_layers * 2  # one graph per (block, lane) and expert


def test_two_experts_under_model_cpu_offload_sample_the_same_s2():
    pipe = tiny.wan_pipeline(SHAPE, experts=2, boundary_ratio=0.85, seed=1, with_vae=False)
    case = Case(pipe, SHAPE, guidance_scale_2=2.5)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    s2 = case()
    s2fast.unwrap(pipe)
    pipe.enable_model_cpu_offload(device="cpu")  # the same accelerate hooks, with a CPU execution device
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS))
    torch.testing.assert_close(case(), s2, atol=0, rtol=0)
    assert s2fast.trace_denoisers(pipe) == ("transformer",) * 2 + ("transformer_2",) * 2
    s2fast.unwrap(pipe)
