"""Qwen-Image under s2fast.wrap: QwenImagePipeline with true CFG and its norm rescale, without CFG, against a plain
three-pass loop written in the tests (tests/s2_reference_families.py).

What S² means here: the pipeline rescales its combination to the cond prediction's norm, per token
(``comb · ‖C‖/‖comb‖``); S² applies that rescale to Eq. 4 with the true cond: D · ‖C‖/‖D‖. The reference loop does
exactly that.

Tolerances. The tiny prompt has two padded tokens (a text mask) and the negative none (no mask): the branches
cannot share a batch, so every prediction runs at batch 1 (with ``fork_mode="separate"``: the sub-network a lane
of its own), as the stock loop's and the reference's do, and results are compared at zero tolerance. With
equal-length unmasked embeddings s2fast batches [uncond, cond] (one batch-2 call against two batch-1 calls): fp32
GEMMs of different row counts round differently (~1e-7 relative per op); atol 2e-5 after 4 steps bounds that,
and S² (ω = 0.5) moves the result by far more (checked > 1e-2).
"""

import pytest
import torch
from s2_reference_families import qwen_three_pass

import s2fast
from s2fast import S2Config
from s2fast import tiny_families as tf

STEPS = 4
SHAPE = tf.QwenShape()
SIZE = tf.qwen_image_size(SHAPE)
MASKS = ((1,), (2, 3), (), (4,))
BATCH_TOL = dict(atol=2e-5, rtol=2e-5)
EXACT = dict(atol=0, rtol=0)


@pytest.fixture(scope="module")
def pipe():
    return tf.qwen_pipeline(SHAPE)


@pytest.fixture
def qwen(pipe):
    yield pipe
    s2fast.unwrap(pipe)


def sample(pipe, emb, lam=4.0, seed=0, **more):
    return pipe(**emb, **SIZE, num_inference_steps=STEPS, true_cfg_scale=lam, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **more).images


MASKED = tf.qwen_embeddings(SHAPE)                 # prompt padded (mask), negative not: run apart
PLAIN = tf.qwen_embeddings(SHAPE, padding=0)       # no masks, equal lengths: [uncond, cond] batched


def test_omega_zero_is_stock_bit_for_bit_and_unwrap_is_bit_exact(qwen):
    stock = sample(qwen, MASKED)
    s2fast.wrap(qwen, S2Config(omega=0.0))
    torch.testing.assert_close(sample(qwen, MASKED), stock, **EXACT)
    s2fast.unwrap(qwen)
    torch.testing.assert_close(sample(qwen, MASKED), stock, **EXACT)


def test_omega_zero_with_batched_branches_is_stock_within_batch_rounding(qwen):
    stock = sample(qwen, PLAIN)
    s2fast.wrap(qwen, S2Config(omega=0.0))
    torch.testing.assert_close(sample(qwen, PLAIN), stock, **BATCH_TOL)
    s2fast.wrap(qwen, S2Config(omega=0.0, batch_branches=False))  # batch-1 calls, as the stock loop makes
    torch.testing.assert_close(sample(qwen, PLAIN), stock, **EXACT)


def test_s2_with_true_cfg_is_the_rescale_of_eq4_with_the_true_cond(qwen):
    expected = qwen_three_pass(qwen, MASKED, MASKS, steps=STEPS, lam=4.0, omega=0.5, **SIZE)
    s2fast.wrap(qwen, S2Config(omega=0.5, masks=MASKS, fork_mode="separate"))
    got = sample(qwen, MASKED)
    torch.testing.assert_close(got, expected, **EXACT)
    assert s2fast.trace(qwen) == MASKS
    s2fast.wrap(qwen, S2Config(omega=0.0))
    assert (sample(qwen, MASKED) - got).abs().max() > 1e-2  # S² is visible


def test_s2_with_batched_branches_matches_the_reference(qwen):
    expected = qwen_three_pass(qwen, PLAIN, MASKS, steps=STEPS, lam=4.0, omega=0.5, **SIZE)
    s2fast.wrap(qwen, S2Config(omega=0.5, masks=MASKS))  # fork_mode "auto": joined or not, within batch rounding
    torch.testing.assert_close(sample(qwen, PLAIN), expected, **BATCH_TOL)


def test_the_rescale_is_what_makes_it_match():
    """Eq. 4 handed to the pipeline without the rescale (the pipeline then rescales D by ‖D‖/‖D‖ = 1) is a different
    sampler: the reference without the rescale is far from the one with it, so the test above can fail."""
    pipe = tf.qwen_pipeline(SHAPE)
    with_rescale = qwen_three_pass(pipe, MASKED, MASKS, steps=STEPS, lam=4.0, omega=0.5, **SIZE)
    import s2_reference_families as ref

    saved = ref.qwen_rescale
    ref.qwen_rescale = lambda d, cond: d
    try:
        without = qwen_three_pass(pipe, MASKED, MASKS, steps=STEPS, lam=4.0, omega=0.5, **SIZE)
    finally:
        ref.qwen_rescale = saved
    assert (with_rescale - without).abs().max() > 1e-2


def test_without_true_cfg_s2_applies_to_the_cond_prediction(qwen):
    emb = {k: v for k, v in MASKED.items() if not k.startswith("negative")}
    expected = qwen_three_pass(qwen, emb, MASKS, steps=STEPS, lam=1.0, omega=0.5, cfg=False, **SIZE)
    stock = sample(qwen, emb, lam=1.0)
    s2fast.wrap(qwen, S2Config(omega=0.5, masks=MASKS, fork_mode="separate"))
    torch.testing.assert_close(sample(qwen, emb, lam=1.0), expected, **EXACT)
    s2fast.wrap(qwen, S2Config(omega=0.0))
    torch.testing.assert_close(sample(qwen, emb, lam=1.0), stock, **EXACT)


def test_fused_step_true_is_refused_naming_the_rescale(qwen):
    with pytest.raises(ValueError, match="rescale"):
        s2fast.wrap(qwen, S2Config(fused_step=True))
    assert s2fast.config_of(qwen) is None


def test_zero_cond_t_models_are_refused_at_wrap():
    pipe = tf.qwen_pipeline(SHAPE, zero_cond_t=True)
    with pytest.raises(ValueError, match="zero_cond_t"):
        s2fast.wrap(pipe, S2Config())
    assert s2fast.config_of(pipe) is None


def test_images_per_prompt_and_return_dict(qwen):
    stock = sample(qwen, MASKED, num_images_per_prompt=2)
    s2fast.wrap(qwen, S2Config(omega=0.0))
    torch.testing.assert_close(sample(qwen, MASKED, num_images_per_prompt=2), stock, **BATCH_TOL)


# --- QwenImageEditPlusPipeline: the reference image's tokens appended to the latents --------------------------------

@pytest.fixture(scope="module")
def edit_plus():
    import numpy as np
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module
    from PIL import Image

    # The pipeline resizes reference images to 1024² for its VAE (VAE_IMAGE_SIZE); 64² keeps the tiny test fast
    # (16 reference tokens instead of 4096) and changes nothing else in the loop.
    saved, module.VAE_IMAGE_SIZE = module.VAE_IMAGE_SIZE, 64 * 64
    pipe = tf.qwen_pipeline(SHAPE, edit_plus=True, seed=1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    yield pipe, image
    s2fast.unwrap(pipe)
    module.VAE_IMAGE_SIZE = saved


def test_edit_plus_omega_zero_is_stock_s2_matches_the_reference_and_unwrap_is_bit_exact(edit_plus):
    pipe, image = edit_plus
    stock = sample(pipe, MASKED, image=image)
    expected = qwen_three_pass(pipe, MASKED, MASKS, steps=STEPS, lam=4.0, omega=0.5, image=image, **SIZE)
    s2fast.wrap(pipe, S2Config(omega=0.0))
    torch.testing.assert_close(sample(pipe, MASKED, image=image), stock, **EXACT)
    s2fast.wrap(pipe, S2Config(omega=0.5, masks=MASKS, fork_mode="separate"))
    got = sample(pipe, MASKED, image=image)
    torch.testing.assert_close(got, expected, **EXACT)
    assert (got - stock).abs().max() > 1e-2
    s2fast.unwrap(pipe)
    torch.testing.assert_close(sample(pipe, MASKED, image=image), stock, **EXACT)


def test_edit_plus_with_a_zero_cond_t_model_is_refused_at_wrap():
    """Bad input: Edit-Plus checkpoints with ``zero_cond_t`` (a zero-timestep modulation for the reference tokens)
    cannot be split by row; wrap refuses them and leaves the pipeline stock."""
    pipe = tf.qwen_pipeline(SHAPE, edit_plus=True, zero_cond_t=True)
    with pytest.raises(ValueError, match="zero_cond_t=True"):
        s2fast.wrap(pipe, S2Config())
    assert s2fast.config_of(pipe) is None
