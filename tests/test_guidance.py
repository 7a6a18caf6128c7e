"""wrap(pipe) against plain three-pass loops, on tiny SD3 and Flux pipelines in fp32.

Tolerances:
- EXACT (0): with batch_branches off, every branch runs at batch B like the reference's separate forward calls, and
  the same ops at the same batch size on one device are deterministic; prefix reuse is exact too (a cached state is
  the very tensor a recompute would produce). So these paths must match bit for bit.
- BATCHED (atol 2e-5, rtol 1e-5): a batched call changes the GEMM blocking (CPU BLAS picks kernels by the row
  count), so fp32 roundings differ at ~1e-7 relative per op; over 4 steps of 5–6 blocks we measured up to 3e-6
  on latents of magnitude ~4. 2e-5 leaves ~5x margin and stays far below the S² effect that EFFECT asserts.
- EFFECT (1e-3): S² must change the result by more than this, so that every comparison above can fail.
"""

import pytest
import torch

import s2fast
from s2fast import S2Config

EXACT = dict(atol=0.0, rtol=0.0)
BATCHED = dict(atol=2e-5, rtol=1e-5)
EFFECT = 1e-3

MASKS_4 = ((2,), (1, 3), (), (4,))  # fixed masks for 4 steps: a fork late, two drops, an S²-off step, the last block

OPTIONS = {
    "default": ({}, BATCHED),
    "joined-suffix": ({"fork_mode": "join"}, BATCHED),
    "no-prefix-reuse": ({"reuse_prefix": False}, BATCHED),
    "unbatched": ({"batch_branches": False}, EXACT),
    "unbatched-no-reuse": ({"batch_branches": False, "reuse_prefix": False}, EXACT),
}


def _masks_for(family):
    # Flux's tiny model has 5 blocks (2 double, 3 single): block 4 is its last single block.
    return MASKS_4


@pytest.mark.parametrize("option", OPTIONS)
def test_matches_three_pass_reference(family, option):
    extra, tol = OPTIONS[option]
    masks = _masks_for(family)
    expected = family.reference(masks, omega=0.5)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=masks, **extra))
    got = family()
    torch.testing.assert_close(got, expected, **tol)
    cfg_only = family.reference(((),) * 4, omega=0.5)
    assert (expected - cfg_only).abs().max() > EFFECT


@pytest.mark.parametrize("option", ["default", "unbatched"])
def test_without_cfg_subtracts_from_cond(family, option):
    extra, tol = OPTIONS[option]
    expected = family.reference(MASKS_4, omega=0.5, cfg=False)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4, **extra))
    torch.testing.assert_close(family(cfg=False), expected, **tol)
    assert s2fast.trace(family.pipe) == MASKS_4


def test_omega_zero_is_stock_cfg(family):
    # SD3's stock loop makes one batched [uncond, cond] call per step, Flux's two batch-B calls: the s2fast path
    # that does the same is bit-identical, the other one equal up to batch-size rounding.
    stock = family()
    stock_batched = family.name == "sd3"
    for batch_branches in (True, False):
        s2fast.wrap(family.pipe, S2Config(omega=0.0, batch_branches=batch_branches))
        tol = EXACT if batch_branches == stock_batched else BATCHED
        torch.testing.assert_close(family(), stock, **tol)
        assert s2fast.trace(family.pipe) == ((),) * 4  # no sub-network was computed


def test_unwrap_restores_bit_identical_outputs(family):
    stock = family()
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=1))
    assert (family() - stock).abs().max() > EFFECT
    s2fast.unwrap(family.pipe)
    assert "forward" not in family.pipe.transformer.__dict__
    assert not hasattr(family.pipe, "_s2fast_controller")
    torch.testing.assert_close(family(), stock, **EXACT)
    s2fast.unwrap(family.pipe)  # unwrapping an unwrapped pipeline is a no-op


def test_wrapping_twice_replaces_the_config(family):
    expected = family.reference(MASKS_4, omega=0.5)
    config_before = dict(family.pipe.config)
    s2fast.wrap(family.pipe, S2Config(omega=2.0, seed=3))
    assert s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4)) is family.pipe
    assert s2fast.config_of(family.pipe).omega == 0.5
    torch.testing.assert_close(family(), expected, **BATCHED)
    assert dict(family.pipe.config) == config_before  # the pipeline's registered components are untouched
    s2fast.unwrap(family.pipe)
    assert "forward" not in family.pipe.transformer.__dict__


def test_masks_reproducible_from_seed_and_rng_untouched(family):
    torch.manual_seed(123)
    stock = family.pipe(**family.kwargs(generator=None)).images
    stock_rng = torch.get_rng_state()
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=7))
    torch.manual_seed(123)
    first = family.pipe(**family.kwargs(generator=None)).images
    assert torch.equal(torch.get_rng_state(), stock_rng)  # the global RNG advanced exactly as in the stock call
    trace = s2fast.trace(family.pipe)
    assert any(trace)
    second = family()
    assert s2fast.trace(family.pipe) == trace
    torch.manual_seed(123)
    assert torch.equal(family.pipe(**family.kwargs(generator=None)).images, first)
    assert not torch.equal(first, stock)
    # An explicit generator is consumed exactly as by the stock call (only by prepare_latents).
    g_stock, g_s2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s2fast.unwrap(family.pipe)
    family.pipe(**family.kwargs(generator=g_stock))
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=7))
    family.pipe(**family.kwargs(generator=g_s2))
    assert torch.equal(g_stock.get_state(), g_s2.get_state())
    # Other seeds give other masks; seed=None gives fresh masks per call.
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=8))
    family(steps=8)
    other = s2fast.trace(family.pipe)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=7))
    family(steps=8)
    assert s2fast.trace(family.pipe) != other
    assert second.shape == first.shape


def test_protected_blocks_are_never_dropped(family):
    protected = (0, 1, 3)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=0, protected_blocks=protected, drop_ratio=0.5))
    seen = set()
    for seed in range(3):
        family(steps=10, seed=seed)
        for mask in s2fast.trace(family.pipe):
            assert mask and not set(mask) & set(protected)
            seen.update(mask)
    assert seen == set(range(family.num_blocks)) - set(protected)


def test_interval_is_honoured(family):
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=4, interval=(0.25, 0.75)))
    got = family(steps=8)
    trace = s2fast.trace(family.pipe)
    assert [bool(m) for m in trace] == [False, False, True, True, True, True, False, False]
    torch.testing.assert_close(got, family.reference(trace, steps=8, omega=0.5), **BATCHED)
    # The masks of the shared steps do not depend on the interval.
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=4))
    family(steps=8)
    assert s2fast.trace(family.pipe)[2:6] == trace[2:6]


@pytest.mark.parametrize("batch_branches, fork_mode", [(True, "join"), (True, "separate"), (False, "separate")])
def test_num_masks_is_eq3_mean_of_subnetworks(family, batch_branches, fork_mode):
    # At block 2 the first and third sub-networks drop while the second runs: the engine's gather/scatter path.
    masks = (((2,), (3, 4), (2, 4)), (), ((1,), (1,), (4,)), ((3,), (2,), (1, 2)))
    expected = family.reference(masks, omega=0.5, num_masks=3)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, num_masks=3, masks=masks, batch_branches=batch_branches,
                                      fork_mode=fork_mode))
    torch.testing.assert_close(family(), expected, **(BATCHED if batch_branches else EXACT))
    assert s2fast.trace(family.pipe) == masks
    s2fast.wrap(family.pipe, S2Config(omega=0.5, num_masks=4, seed=2, drop_ratio=0.3))
    family()
    assert all(len(step) == 4 for step in s2fast.trace(family.pipe))


def test_trace_replays_a_call(family):
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=11))
    first = family()
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=s2fast.trace(family.pipe)))
    torch.testing.assert_close(family(), first, **EXACT)


def test_callbacks_progress_and_image_output_keep_working(family):
    s2fast.wrap(family.pipe, S2Config(omega=0.5, seed=1))
    steps = []

    def on_step(pipe, i, t, kwargs):
        steps.append((i, kwargs["latents"].shape))
        return kwargs

    family.pipe.set_progress_bar_config(disable=False)
    try:
        out = family.pipe(**family.kwargs(output_type="pil", callback_on_step_end=on_step))
    finally:
        family.pipe.set_progress_bar_config(disable=True)
    assert [i for i, _ in steps] == [0, 1, 2, 3]
    assert out.images[0].size == (family.size["width"], family.size["height"])


def test_direct_transformer_calls_run_the_stock_forward(sd3):
    model = sd3.pipe.transformer
    x = torch.randn(2, 16, sd3.shape.latent_size, sd3.shape.latent_size)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0, 500.0]),
                  encoder_hidden_states=torch.cat([sd3.emb["negative_prompt_embeds"], sd3.emb["prompt_embeds"]]),
                  pooled_projections=torch.cat([sd3.emb["negative_pooled_prompt_embeds"], sd3.emb["pooled_prompt_embeds"]]))
    stock = model(**inputs).sample
    s2fast.wrap(sd3.pipe, S2Config(omega=0.5, seed=1))
    torch.testing.assert_close(model(**inputs).sample, stock, **EXACT)


def test_batch_of_two_prompts(family):
    kw = {k: torch.cat([v, v.flip(-1)]) for k, v in family.emb.items()}
    pipe_kwargs = family.kwargs()
    pipe_kwargs.update(kw)
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4, batch_branches=False))
    exact = family.pipe(**pipe_kwargs).images
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS_4))
    pipe_kwargs["generator"] = torch.Generator().manual_seed(0)
    torch.testing.assert_close(family.pipe(**pipe_kwargs).images, exact, **BATCHED)
    assert exact.shape[0] == 2
