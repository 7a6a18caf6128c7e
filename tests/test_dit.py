"""DiTPipeline (class-conditional, [cond, null] batch order, guidance on the eps channels, learned sigma)."""

import pytest
import torch
from s2_reference import dit_three_pass

import s2fast
from s2fast import S2Config, tiny

MASKS = ((2,), (1, 3), (), (4,))
LABELS = [3, 207]


@pytest.fixture(scope="module")
def dit():
    return tiny.dit_pipeline()


def run(pipe, lam=4.0, steps=4, seed=0):
    return pipe(class_labels=LABELS, guidance_scale=lam, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def decoded(pipe, latents):
    # DiTPipeline's own decode, for the reference's latents.
    samples = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample
    return (samples / 2 + 0.5).clamp(0, 1)


def test_omega_zero_is_bit_identical_to_stock_dit(dit):
    stock = run(dit)
    s2fast.wrap(dit, S2Config(omega=0.0))
    try:
        assert torch.equal(run(dit), stock)  # the stock [cond, null] batch, row for row
    finally:
        s2fast.unwrap(dit)


@pytest.mark.parametrize("lam", [4.0, 1.0], ids=["cfg", "no-cfg"])
def test_s2_matches_a_plain_three_pass_loop(dit, lam):
    expected = decoded(dit, dit_three_pass(dit, LABELS, MASKS, steps=4, lam=lam, omega=0.5))
    s2fast.wrap(dit, S2Config(omega=0.5, masks=MASKS))
    try:
        got = run(dit, lam=lam)
        # Batched [cond, null] and forked rows against batch-B forwards: fp32 rounding of different batch sizes
        # (~1e-6 relative) through a tiny VAE; any real difference (ω moves the latents by > 1e-2) fails.
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        assert s2fast.trace(dit) == MASKS
        s2fast.wrap(dit, S2Config(omega=0.0))
        assert (run(dit, lam=lam) - got).abs().max() > 1e-3  # S² changed the images: the check is not vacuous
    finally:
        s2fast.unwrap(dit)


def test_any_scheduler_runs_unfused_and_fused_step_true_is_refused():
    pipe = tiny.dit_pipeline(scheduler="dpm")  # a multistep scheduler: the pipeline's own step, unfused
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0))
    images = run(pipe)
    assert torch.isfinite(images).all() and len(s2fast.trace(pipe)) == 4
    with pytest.raises(ValueError, match="fused_step=True"):
        s2fast.wrap(pipe, S2Config(fused_step=True))
    assert s2fast.config_of(pipe).fused_step == "auto"  # the refused wrap changed nothing
