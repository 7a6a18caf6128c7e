"""Z-Image under s2fast.wrap: ZImagePipeline (one call on [cond, uncond] per step, CFG ``C + λ(C − U)`` in fp32,
optional renormalisation, CFG truncation by step) against a plain three-pass loop written in the tests
(tests/s2_reference_families.py).

What S² means here: D = C + λ(C − U) − ω(S − C) in fp32, then the pipeline's renormalisation with the true C; at the
steps where the pipeline truncates CFG, D = C − ω(S − C).

Tolerances. The stock loop runs [cond, uncond] in one batch-2 call, as s2fast does by default: ω = 0 is stock bit
for bit. The reference loop makes batch-1 calls; with ``batch_branches=False`` and ``fork_mode="separate"`` s2fast
does too and the comparison is exact. Batched, the rows differ from batch-1 ones by fp32 rounding of different
GEMM shapes and of the caption padding the joint batch needs (~1e-7 relative per op): atol 2e-5 after 4 steps.
S² moves the result by far more (checked > 1e-2).
"""

import pytest
import torch
from s2_reference_families import zimage_three_pass

import s2fast
from s2fast import S2Config
from s2fast import tiny_families as tf

STEPS = 4
SHAPE = tf.ZImageShape()
SIZE = dict(height=SHAPE.latent_size * 8, width=SHAPE.latent_size * 8)
MASKS = ((1,), (2, 3), (), (1,))
BATCH_TOL = dict(atol=2e-5, rtol=2e-5)
EXACT = dict(atol=0, rtol=0)
APART = dict(batch_branches=False, fork_mode="separate")
EMB = tf.zimage_embeddings(SHAPE, negative_tokens=11)  # caption lengths differ: the joint batch pads
# renormalisation on, CFG truncated after the first two of four steps (t_norm 0, 0.25, 0.5, 0.75 here)
SETTINGS = {"plain": {}, "normalised_truncated": dict(cfg_normalization=True, cfg_truncation=0.3)}


@pytest.fixture(scope="module")
def pipe():
    return tf.zimage_pipeline(SHAPE)


@pytest.fixture
def zimage(pipe):
    yield pipe
    s2fast.unwrap(pipe)


def sample(pipe, emb=EMB, lam=4.0, **more):
    return pipe(**emb, **SIZE, num_inference_steps=STEPS, guidance_scale=lam, output_type="latent",
                generator=torch.Generator().manual_seed(0), **more).images


@pytest.mark.parametrize("setting", SETTINGS)
def test_omega_zero_is_stock_bit_for_bit_and_unwrap_is_bit_exact(zimage, setting):
    stock = sample(zimage, **SETTINGS[setting])
    s2fast.wrap(zimage, S2Config(omega=0.0))
    torch.testing.assert_close(sample(zimage, **SETTINGS[setting]), stock, **EXACT)
    s2fast.unwrap(zimage)
    torch.testing.assert_close(sample(zimage, **SETTINGS[setting]), stock, **EXACT)


@pytest.mark.parametrize("setting", SETTINGS)
def test_s2_matches_a_plain_three_pass_loop(zimage, setting):
    expected = zimage_three_pass(zimage, EMB, MASKS, steps=STEPS, lam=4.0, omega=0.5, **SETTINGS[setting], **SIZE)
    s2fast.wrap(zimage, S2Config(omega=0.5, masks=MASKS, **APART))
    got = sample(zimage, **SETTINGS[setting])
    torch.testing.assert_close(got, expected, **EXACT)
    s2fast.wrap(zimage, S2Config(omega=0.5, masks=MASKS))
    torch.testing.assert_close(sample(zimage, **SETTINGS[setting]), expected, **BATCH_TOL)
    assert s2fast.trace(zimage) == MASKS
    s2fast.wrap(zimage, S2Config(omega=0.0))
    assert (sample(zimage, **SETTINGS[setting]) - got).abs().max() > 1e-2


def test_the_renormalisation_and_truncation_are_what_make_it_match(zimage):
    """The reference with the pipeline's post-processing differs from the plain one, so the test above can fail."""
    kw = dict(steps=STEPS, lam=4.0, omega=0.5, **SIZE)
    plain = zimage_three_pass(zimage, EMB, MASKS, **kw)
    post = zimage_three_pass(zimage, EMB, MASKS, **SETTINGS["normalised_truncated"], **kw)
    assert (plain - post).abs().max() > 1e-2


def test_without_cfg_s2_applies_to_the_cond_prediction(zimage):
    expected = zimage_three_pass(zimage, EMB, MASKS, steps=STEPS, lam=0.0, omega=0.5, cfg=False, **SIZE)
    s2fast.wrap(zimage, S2Config(omega=0.5, masks=MASKS, **APART))
    torch.testing.assert_close(sample(zimage, lam=0.0), expected, **EXACT)


def test_a_normalisation_ratio_below_one_is_refused(zimage):
    s2fast.wrap(zimage, S2Config(omega=0.5, seed=0))
    with pytest.raises(ValueError, match="cfg_normalization=0.5"):
        sample(zimage, cfg_normalization=0.5)
    sample(zimage)  # still wrapped and usable
    with pytest.raises(ValueError, match="rescale|renormalises"):
        s2fast.wrap(zimage, S2Config(fused_step=True))
