"""BlockCache (s2fast/step_cache.py): threshold 0 is the uncached result bit for bit; the engine's cached sampling
equals a plain loop with its own residual store (tests/step_cache_reference.py) on digits, DiT, SD3, Flux with
true CFG and Wan 2.2's two experts; the trace reports the steps that ran; stores are per role, per denoiser and per
call; bad settings are refused when the config is built or at wrap.

Tolerances. The reference runs every branch and sub-network alone at batch B; the engine batches U and C (2B) and
reads the sub-network's prefix from the cond rows. fp32 GEMMs of different row counts round differently (~1e-7
relative per op), carried through the steps: atol 1e-4 as tests/test_wan.py states for the same comparison. A
cached step moves the result by far more (each case checks the cache changes it by > 1e-3), and the thresholds sit
where the measured changes are at least 0.02 away, so the rounding cannot flip a decision (the traces are
compared exactly).
"""

import pytest
import torch
from built_once import BuiltOnce
from step_cache_reference import CachedReference

import s2fast
from s2fast import BlockCache, S2Config, SGGConfig, StepRecord, tiny
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline
from s2fast.engine import EngineOptions, predict
from s2fast.step_cache import CacheStore, StepCache

TOL = dict(atol=1e-4, rtol=1e-4)


class Case:
    def __init__(self, pipe, call, steps, threshold):
        self.pipe, self.call, self.steps, self.threshold = pipe, call, steps, threshold

    def __call__(self, seed=0):
        return self.call(self.steps, seed)


def _digits():
    torch.manual_seed(0)
    p = DigitsFlowPipeline(build_transformer(num_layers=4, attention_head_dim=8).eval(), build_scheduler())
    p.set_progress_bar_config(disable=True)
    call = lambda s, seed: p([3, 7, 0], guidance_scale=4.0, num_inference_steps=s, output_type="pt",  # noqa: E731
                             generator=torch.Generator().manual_seed(seed)).images
    return Case(p, call, 10, 0.4)


def _dit():
    p = tiny.dit_pipeline()
    call = lambda s, seed: p(class_labels=[1, 2], guidance_scale=4.0, num_inference_steps=s,  # noqa: E731
                             output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    return Case(p, call, 8, 0.9)


def _mmdit(shape, build, guidance: str, threshold: float):
    """SD3 and Flux differ here only in their shape, builder and guidance argument (Flux's true CFG)."""
    p = build(shape)
    emb, size = tiny.embeddings(shape), tiny.image_size(p, shape)
    call = lambda s, seed: p(**emb, **size, num_inference_steps=s, **{guidance: 4.0},  # noqa: E731
                             output_type="latent", generator=torch.Generator().manual_seed(seed)).images
    return Case(p, call, 8, threshold)


def _sd3():
    return _mmdit(tiny.SD3Shape(), tiny.sd3_pipeline, "guidance_scale", 0.36)


def _flux():
    return _mmdit(tiny.FluxShape(), tiny.flux_pipeline, "true_cfg_scale", 0.35)


def _wan22():
    # two experts: with 10 UniPC steps (shift 3) and boundary 0.85, steps 0-3 run transformer, 4-9 transformer_2
    shape = tiny.WanShape()
    p = tiny.wan_pipeline(shape, experts=2, boundary_ratio=0.85, seed=1)
    emb, size = tiny.wan_embeddings(shape), tiny.wan_video_size(p, shape)
    call = lambda s, seed: p(**emb, **size, num_inference_steps=s, guidance_scale=4.0,  # noqa: E731
                             guidance_scale_2=2.5, output_type="latent",
                             generator=torch.Generator().manual_seed(seed)).frames
    return Case(p, call, 10, 0.1)


_BUILD = {"digits": _digits, "dit": _dit, "sd3": _sd3, "flux": _flux, "wan22": _wan22}
_CASES = BuiltOnce(_BUILD)


@pytest.fixture(params=list(_BUILD))
def case(request):
    yield from _CASES.unwrapped_after(request.param)


@pytest.fixture
def digits():
    yield from _CASES.unwrapped_after("digits")


def _blocks(pipe):
    return tuple(r.blocks for r in s2fast.trace_steps(pipe))


def _assert_engine_equals_plain_loop(case, config):
    """The plain loop with its own store (wrapped as the predictor) against the engine, same config: equal
    outputs within TOL, the same full / cached steps, and at least one step cached (else the test is vacuous)."""
    reference = CachedReference(config.cache, case.steps)
    s2fast.wrap(case.pipe, config, _predictor=reference)
    expected = case()
    s2fast.wrap(case.pipe, config)
    got = case()
    assert _blocks(case.pipe) == tuple(reference.log) and "cached" in reference.log
    torch.testing.assert_close(got, expected, **TOL)


# --- the configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=-0.1), "threshold must be >= 0"),
    (dict(threshold=float("nan")), "threshold must be a finite number"),
    (dict(threshold="0.1"), "threshold must be a finite number"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(warmup_steps=1.5), "warmup_steps must be an integer"),
    (dict(probe_blocks=0), "probe_blocks must be an integer >= 1"),
    (dict(subnet="skip"), "subnet must be one of"),
])
def test_bad_block_cache_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockCache(**kwargs)


def test_a_probe_that_reaches_a_droppable_block_is_refused_by_the_config():
    with pytest.raises(ValueError, match="probe_blocks must be at most 1"):
        S2Config(cache=BlockCache(probe_blocks=2))  # block 1 is the first one protected_blocks=(0,) leaves
    S2Config(protected_blocks=(0, 1), cache=BlockCache(probe_blocks=2))
    with pytest.raises(ValueError, match="masks drop block 1"):
        S2Config(protected_blocks=(0, 1, 2), masks=((1,), ()), cache=BlockCache(probe_blocks=2))
    with pytest.raises(ValueError, match="skip_blocks drops block 2.*at most 2"):
        SGGConfig(skip_blocks=(2, 3), cache=BlockCache(probe_blocks=3))
    with pytest.raises(ValueError, match="cache must be None or an s2fast.BlockCache"):
        S2Config(cache=0.1)
    with pytest.raises(ValueError, match="cache and branch_parallel"):
        S2Config(cache=BlockCache(), branch_parallel=True)
    with pytest.raises(ValueError, match="cache is not supported by the guiders"):
        s2fast.S2Guidance(5.0, S2Config(cache=BlockCache()))


def test_a_probe_that_leaves_no_block_to_skip_is_refused_at_wrap(digits):
    config = S2Config(omega=0.0, protected_blocks=(0, 1, 2, 3), cache=BlockCache(probe_blocks=4))
    with pytest.raises(ValueError, match="probe_blocks=4 leaves no block to skip on a model of 4 blocks"):
        s2fast.wrap(digits.pipe, config)
    assert s2fast.config_of(digits.pipe) is None


# --- results ---------------------------------------------------------------------------------------------------
def test_threshold_zero_is_the_uncached_result_bit_for_bit(case):
    s2fast.wrap(case.pipe, S2Config(omega=0.5, seed=1))
    uncached = case()
    s2fast.wrap(case.pipe, S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=0.0)))
    assert torch.equal(case(), uncached)
    assert s2fast.trace_steps(case.pipe) == (StepRecord("full", "computed"),) * case.steps


@pytest.mark.parametrize("subnet", ["reuse", "recompute"])
@pytest.mark.parametrize("batch_branches", [True, False], ids=["batched", "per-branch"])
def test_the_engine_equals_a_plain_loop_with_its_own_store(case, subnet, batch_branches):
    cache = BlockCache(threshold=case.threshold, subnet=subnet)
    config = S2Config(omega=0.5, seed=1, cache=cache, batch_branches=batch_branches)
    reference = CachedReference(cache, case.steps)
    s2fast.wrap(case.pipe, config, _predictor=reference)
    expected = case()
    assert _blocks(case.pipe) == tuple(reference.log)  # the trace reports what ran
    s2fast.wrap(case.pipe, config)
    got = case()
    blocks = _blocks(case.pipe)
    assert blocks == tuple(reference.log)
    assert "cached" in blocks and blocks[0] == blocks[-1] == "full"
    torch.testing.assert_close(got, expected, **TOL)
    s2fast.wrap(case.pipe, S2Config(omega=0.5, seed=1))
    assert (case() - got).abs().max() > 1e-3  # the cache changed the result: the comparison above means something
    corrections = {r.correction for r, b in zip(s2fast.trace_steps(case.pipe), blocks)}
    assert corrections == {"computed"}


def test_records_name_the_reused_correction_and_steps_without_a_subnetwork(digits):
    cache = BlockCache(threshold=10.0)
    s2fast.wrap(digits.pipe, S2Config(omega=0.5, seed=1, interval=(0.5, 1.0), cache=cache))
    digits()
    records = s2fast.trace_steps(digits.pipe)
    assert [r.blocks for r in records] == ["full"] + ["cached"] * 4 + ["full"] + ["cached"] * 3 + ["full"]
    # S² from step 5: the first step with a sub-network has no residual of it, and runs fully
    assert records[5] == StepRecord("full", "computed")
    assert [r.correction for r in records] == ["none"] * 5 + ["computed"] + ["reused"] * 3 + ["computed"]
    s2fast.wrap(digits.pipe, S2Config(omega=0.5, seed=1, interval=(0.5, 1.0), cache=cache.__class__(
        threshold=10.0, subnet="recompute")))
    digits()
    records = s2fast.trace_steps(digits.pipe)  # "recompute" needs no stored sub-network residual: step 5 is cached
    assert [r.blocks for r in records] == ["full"] + ["cached"] * 8 + ["full"]
    assert [r.correction for r in records] == ["none"] * 5 + ["computed"] * 5


def test_warmup_steps_run_fully(digits):
    s2fast.wrap(digits.pipe, S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=10.0, warmup_steps=3)))
    digits()
    assert _blocks(digits.pipe) == ("full",) * 3 + ("cached",) * 6 + ("full",)


def test_two_experts_keep_their_own_stores_and_the_switch_step_runs_fully():
    case = _CASES["wan22"]
    try:
        s2fast.wrap(case.pipe, S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=10.0)))
        case()
        experts = s2fast.trace_denoisers(case.pipe)
        switch = experts.index("transformer_2")
        assert 1 < switch < case.steps - 2
        expected = ["full"] + ["cached"] * (switch - 1) + ["full"] + ["cached"] * (case.steps - switch - 2) + ["full"]
        assert list(_blocks(case.pipe)) == expected
        controller = s2fast.serving.controller_of(case.pipe)
        assert set(controller._run.stores) == {id(case.pipe.transformer), id(case.pipe.transformer_2)}
    finally:
        s2fast.unwrap(case.pipe)


def test_sgg_with_a_cache_equals_the_plain_loop(digits):
    cache = BlockCache(threshold=0.4)
    _assert_engine_equals_plain_loop(
        digits, SGGConfig(cfg_window=(0.0, 0.6), skip_window=(0.3, 1.0), skip_blocks=(2,), cache=cache))


def test_a_cfg_config_with_a_cache_runs_through_the_engine(digits):
    """ω = 0 with a cache is CFG with s2fast's cache: not stock's call (the cache changes the result)."""
    stock = digits()
    s2fast.wrap(digits.pipe, S2Config(omega=0.0, cache=BlockCache(threshold=10.0)))
    cached = digits()
    assert "cached" in _blocks(digits.pipe)
    assert (cached - stock).abs().max() > 1e-3
    assert {r.correction for r in s2fast.trace_steps(digits.pipe)} == {"none"}


# --- stores --------------------------------------------------------------------------------------------------
def _engine_rows(pipe, labels=(3, 7), size=None):
    """[uncond, cond] rows of the digits model at one timestep, through the adapter as a pipeline call would."""
    from s2fast.adapters.rows import BranchRows

    model = pipe.transformer
    size = size or model.config.sample_size
    x = torch.randn(len(labels), model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(labels),), 500.0)
    branches = [dict(hidden_states=x, timestep=t, class_labels=torch.full((len(labels),), 10)),
                dict(hidden_states=x, timestep=t, class_labels=torch.tensor(labels))]
    return model, BranchRows(("hidden_states", "timestep", "class_labels"), 2, branches=branches, cond_branch=1)


def _adapter(pipe):
    from s2fast.adapters import adapter_for

    return adapter_for(pipe)


def test_each_lane_reads_only_its_own_residual(digits):
    """A cached step's prediction of each role moves with that role's stored residual and no other's."""
    adapter = _adapter(digits.pipe)
    model, rows = _engine_rows(digits.pipe)
    store = CacheStore()
    step = lambda may: StepCache(BlockCache(threshold=10.0), store, may_cache=may)  # noqa: E731
    with torch.no_grad():
        full = step(False)
        predict(adapter, model, rows, [(2,)], EngineOptions(fork_mode="separate", cache=full))
        assert not full.cached and set(store.residuals) == {("uncond", 0), ("cond", 0), ("subnet", 0)}
        base = predict(adapter, model, rows, [(2,)], EngineOptions(fork_mode="separate", cache=step(True)))
        for k, name in enumerate([("uncond", 0), ("cond", 0), ("subnet", 0)]):
            saved = store.residuals[name]
            store.residuals[name] = [saved[0] + 1.0]
            cached = step(True)
            moved = predict(adapter, model, rows, [(2,)], EngineOptions(fork_mode="separate", cache=cached))
            store.residuals[name] = saved
            assert cached.cached
            changed = [not torch.equal(a, b) for a, b in zip(moved, base)]
            assert changed == [i == k for i in range(3)], name


def test_a_new_input_shape_clears_the_store(digits):
    adapter = _adapter(digits.pipe)
    model, rows = _engine_rows(digits.pipe)
    store = CacheStore()
    with torch.no_grad():
        predict(adapter, model, rows, [], EngineOptions(cache=StepCache(BlockCache(threshold=10.0), store, False)))
        other = _engine_rows(digits.pipe, labels=(1, 2, 4))[1]  # three rows: another shape
        step = StepCache(BlockCache(threshold=10.0), store, may_cache=True)
        predict(adapter, model, other, [], EngineOptions(cache=step))
    assert not step.cached and store.residuals[("cond", 0)][0].shape[0] == 3


def test_a_new_call_a_new_config_and_unwrap_start_from_an_empty_store(digits):
    config = S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=0.4))
    s2fast.wrap(digits.pipe, config)
    first, trace = digits(), _blocks(digits.pipe)
    assert torch.equal(digits(), first) and _blocks(digits.pipe) == trace  # a new call: nothing carried over
    s2fast.wrap(digits.pipe, config.replace(omega=0.25))
    s2fast.wrap(digits.pipe, config)  # a new config, then this one again
    assert torch.equal(digits(), first)
    s2fast.unwrap(digits.pipe)
    s2fast.wrap(digits.pipe, config)
    assert torch.equal(digits(), first)
    # another seed: other latents, other decisions, and still the result of a fresh wrap
    other = digits(seed=3)
    s2fast.unwrap(digits.pipe)
    s2fast.wrap(digits.pipe, config)
    assert torch.equal(digits(seed=3), other)


# --- graphs, fused step, refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("subnet", ["reuse", "recompute"])
def test_block_graphs_replay_fewer_blocks_on_cached_steps(digits, subnet):
    from s2fast.graphs import EagerBackend

    config = S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=0.4, subnet=subnet), fork_mode="separate")
    s2fast.wrap(digits.pipe, config)
    eager = digits()
    s2fast.unwrap(digits.pipe)
    s2fast.wrap(digits.pipe, config, _graph_backend=EagerBackend())
    graphed = digits()
    assert torch.equal(graphed, eager)
    assert "cached" in _blocks(digits.pipe) and s2fast.graph_stats(digits.pipe)["replays"] > 0


def test_the_fused_step_under_a_cache(digits):
    config = S2Config(omega=0.5, seed=1, cache=BlockCache(threshold=0.4), fused_step=True, step_mode="exact")
    s2fast.wrap(digits.pipe, config)
    fused = digits()
    s2fast.wrap(digits.pipe, config.replace(fused_step=False))
    torch.testing.assert_close(fused, digits(), atol=0, rtol=0)
    assert "cached" in _blocks(digits.pipe)


def test_diffusers_caches_are_refused_naming_the_s2fast_cache():
    from diffusers import FirstBlockCacheConfig

    case = _CASES["flux"]
    model = case.pipe.transformer
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(ValueError, match=r"FirstBlockCache.*S2Config\(cache=s2fast.BlockCache"):
            s2fast.wrap(case.pipe, S2Config(omega=0.5, cache=BlockCache()))
    finally:
        model.disable_cache()
        s2fast.unwrap(case.pipe)


def test_context_parallelism_refuses_a_cache_and_records_check_their_values():
    from types import SimpleNamespace

    from s2fast import context_parallel

    cp = SimpleNamespace(root_split=None, fixed_blocks=())
    found = context_parallel.refusals(cp, S2Config(cache=BlockCache()), 4)
    assert any("BlockCache" in f for f in found)
    assert not context_parallel.refusals(cp, S2Config(), 4)
    with pytest.raises(ValueError, match="blocks must be one of"):
        StepRecord("skipped", "none")
    with pytest.raises(ValueError, match="correction must be one of"):
        StepRecord("full", "partial")


@pytest.mark.parametrize("subnet", ["reuse", "recompute"])
@pytest.mark.parametrize("engine", [dict(fork_mode="join"), dict(reuse_prefix=False, fork_mode="join"),
                                    dict(reuse_prefix=False, fork_mode="separate"), dict(num_masks=2)],
                         ids=["join", "no-prefix-join", "no-prefix-separate", "two-masks"])
def test_every_lane_layout_equals_the_plain_loop(digits, engine, subnet):
    """Sub-network rows joined to the cond lane, forked at block 0 (their own probe rows), or two of them."""
    cache = BlockCache(threshold=digits.threshold, subnet=subnet)
    _assert_engine_equals_plain_loop(digits, S2Config(omega=0.5, seed=1, cache=cache, **engine))
