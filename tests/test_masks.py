"""The mask sampler: counts, protected blocks, uniformity, determinism, schedules."""

import collections

import pytest
import torch

from s2fast import S2Config
from s2fast.masks import in_interval, num_dropped, sample_step, schedule


@pytest.mark.parametrize("ratio, droppable, blocks, expected", [
    (0.1, 23, 24, 2),   # SD3-medium: 24 blocks, block 0 protected -> 2 dropped (docs/PERFORMANCE.md, cost model)
    (0.1, 56, 57, 6),   # Flux.1: 57 blocks
    (0.1, 5, 6, 1),     # 0.5 rounds up, and at least one block is always dropped
    (0.01, 5, 6, 1),
    (0.5, 5, 6, 3),
    (0.99, 3, 4, 3),
    (0.99, 4, 4, 3),    # nothing protected: the sub-network still keeps one block
])
def test_number_of_dropped_blocks(ratio, droppable, blocks, expected):
    assert num_dropped(ratio, droppable, blocks) == expected


def test_masks_are_sorted_unique_unprotected_and_uniform():
    cfg = S2Config(protected_blocks=(0, 5), drop_ratio=0.2)
    counts = collections.Counter()
    trials = 2000
    for step in range(trials):
        (mask,) = sample_step(seed=3, step=step, cfg=cfg, num_blocks=12)
        assert list(mask) == sorted(set(mask)) and len(mask) == 2
        assert not {0, 5} & set(mask)
        counts.update(mask)
    assert set(counts) == set(range(12)) - {0, 5}
    expected = trials * 2 / 10
    # Binomial(4000 draws, p=0.1) per block: sd ≈ 19; 6 sd bounds fail by chance with probability < 1e-8.
    assert all(abs(c - expected) < 6 * 19 for c in counts.values())


def test_same_seed_and_step_give_the_same_masks():
    cfg = S2Config(num_masks=3)
    assert sample_step(1, 4, cfg, 24) == sample_step(1, 4, cfg, 24)
    assert len({sample_step(1, s, cfg, 24) for s in range(20)}) > 10
    assert sample_step(1, 4, cfg, 24) != sample_step(2, 4, cfg, 24)


def test_schedule_honours_interval_omega_zero_and_explicit_masks():
    sched = schedule(S2Config(seed=0, interval=(0.1, 0.9)), 10, 24)
    assert [bool(m) for m in sched] == [False] + [True] * 8 + [False]
    assert schedule(S2Config(omega=0.0, seed=0), 5, 24) == [()] * 5
    explicit = S2Config(masks=((1,), (), (2, 3)))
    assert schedule(explicit, 3, 24) == [((1,),), (), ((2, 3),)]
    with pytest.raises(ValueError, match="3 entries, but this call runs 4"):
        schedule(explicit, 4, 24)
    fresh = [schedule(S2Config(), 6, 24) for _ in range(4)]  # seed=None: new masks on every call
    assert len({tuple(s) for s in fresh}) > 1


@pytest.mark.parametrize("step, n, interval, inside", [
    (2, 8, (0.25, 0.75), True), (6, 8, (0.25, 0.75), False), (1, 8, (0.25, 0.75), False),
    (0, 28, (0.0, 1.0), True), (27, 28, (0.0, 1.0), True),
])
def test_interval_bounds_are_start_inclusive_stop_exclusive(step, n, interval, inside):
    assert in_interval(step, n, interval) is inside


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(2, 60), data=st.data())
def test_sampled_masks_satisfy_the_config_for_any_model(num_blocks, data):
    protected = data.draw(st.sets(st.integers(0, num_blocks - 1), max_size=num_blocks - 1))
    ratio = data.draw(st.floats(0.01, 0.99))
    num_masks = data.draw(st.integers(1, 4))
    cfg = S2Config(protected_blocks=tuple(protected), drop_ratio=ratio, num_masks=num_masks)
    cfg.check_blocks(num_blocks)
    droppable = num_blocks - len(protected)
    masks = sample_step(data.draw(st.integers(0, 2**32)), data.draw(st.integers(0, 100)), cfg, num_blocks)
    assert len(masks) == num_masks
    for mask in masks:
        assert len(mask) == num_dropped(ratio, droppable, num_blocks) and 1 <= len(mask) < num_blocks
        assert list(mask) == sorted(set(mask)) and not set(mask) & protected and max(mask) < num_blocks
    # Sampled masks are valid explicit masks: the trace form round-trips through S2Config.
    public = masks[0] if num_masks == 1 else masks
    again = S2Config(protected_blocks=tuple(protected), num_masks=num_masks, masks=(public, ()))
    again.check_blocks(num_blocks)
    assert again.masks == (public, ())


# --- what a mask may drop: sampling and replay agree -----------------------------------------------------------
def _sd3_blocks(num_layers):
    import s2_reference
    from conftest import Family

    from s2fast import tiny

    shape = tiny.SD3Shape(num_layers=num_layers)
    pipe = tiny.sd3_pipeline(shape, with_vae=False)
    return Family("sd3", pipe, shape, tiny.embeddings(shape), tiny.image_size(pipe, shape), "guidance_scale",
                  s2_reference.sd3_three_pass, num_layers)


def test_a_one_block_model_runs_stock_at_omega_zero_and_refuses_s2_naming_protected_blocks():
    """The 1-block SD3 model of diffusers' own pipeline tests: ω = 0 (and configs that never need a sub-network)
    is stock, bit for bit (SD3's one [uncond, cond] call, as stock batches it); ω > 0 is refused at wrap naming
    protected_blocks, with the default protection and without any (a sub-network keeps at least one block)."""
    import s2fast

    one = _sd3_blocks(1)
    stock = one()
    for config in (S2Config(omega=0.0), S2Config(omega=0.5, masks=((),) * 4),
                   s2fast.SGGConfig(cfg_window=(0.0, 1.0), skip_blocks=(0,), skip_scale=0.0)):
        s2fast.wrap(one.pipe, config)
        torch.testing.assert_close(one(), stock, atol=0, rtol=0)
    s2fast.unwrap(one.pipe)
    for protected in ((0,), ()):
        with pytest.raises(ValueError, match="protected_blocks .* leaves nothing to drop on a model of 1 block"):
            s2fast.wrap(one.pipe, S2Config(omega=0.5, protected_blocks=protected))
        assert s2fast.config_of(one.pipe) is None
    # also where the config leaves the need of a sub-network to the call (a sigma_interval)
    with pytest.raises(ValueError, match="protected_blocks"):
        s2fast.wrap(one.pipe, S2Config(omega=0.5, protected_blocks=(), sigma_interval=(0.0, 1.0)))
    with pytest.raises(ValueError, match="leaves nothing to drop"):  # and replaying a mask that drops it
        s2fast.wrap(one.pipe, S2Config(omega=0.5, protected_blocks=(), masks=((0,),) * 4))
    s2fast.unwrap(one.pipe)
    two = _sd3_blocks(2)
    with pytest.raises(ValueError, match="drops every block"):  # what sampling never draws: both blocks
        s2fast.wrap(two.pipe, S2Config(omega=0.5, protected_blocks=(), masks=((0, 1),) * 4))


@pytest.mark.parametrize("num_blocks, protected", [(2, ()), (2, (0,)), (3, ()), (3, (0, 1))])
def test_every_sampled_trace_replays(num_blocks, protected):
    """What sampling draws, replay accepts, and replaying it gives the same output, bit for bit."""
    import s2fast

    small = _sd3_blocks(num_blocks)
    s2fast.wrap(small.pipe, S2Config(omega=0.5, seed=2, drop_ratio=0.9, protected_blocks=protected))
    sampled = small()
    trace = s2fast.trace(small.pipe)
    assert all(0 < len(m) < num_blocks and not set(m) & set(protected) for m in trace)
    s2fast.wrap(small.pipe, S2Config(omega=0.5, protected_blocks=protected, masks=trace))
    torch.testing.assert_close(small(), sampled, atol=0, rtol=0)
    s2fast.unwrap(small.pipe)


def test_skip_guidance_layers_run_stock_where_no_step_needs_a_subnetwork(sd3):
    """SD3's own skip-layer guidance is refused where S² runs; at ω = 0 the call is stock's: the stock forward
    serves every call (the pipeline's skip pass included), bit for bit."""
    import s2fast

    stock = sd3(skip_guidance_layers=[2])
    s2fast.wrap(sd3.pipe, S2Config(omega=0.0))
    torch.testing.assert_close(sd3(skip_guidance_layers=[2]), stock, atol=0, rtol=0)
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=1))
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        sd3(skip_guidance_layers=[2])
    s2fast.unwrap(sd3.pipe)
