"""Flux.2 under s2fast.wrap: Flux2Pipeline (guidance-distilled: S² on the cond prediction alone, D = C − ω(S − C)) and
Flux2KleinPipeline (true CFG; or none when ``is_distilled``), against a plain three-pass loop written in the tests
(tests/s2_reference_families.py).

The results compared are the packed latents after the last step (read by a step-end callback, before the pipeline's
unpacking and de-normalisation, which are the same for every method).

Tolerances. Without CFG every prediction runs at batch 1, as in the stock loop and the reference: zero tolerance
(with ``fork_mode="separate"``: the sub-network a lane of its own). Klein with CFG: s2fast batches [uncond, cond]
into one batch-2 call where the stock loop makes two batch-1 calls; fp32 GEMMs of different row counts round
differently (~1e-7 relative per op), atol 2e-5 after 4 steps bounds that; with ``batch_branches=False`` the calls
are batch 1 again and the comparison is exact. S² moves the result by far more (checked > 1e-3).
"""

import pytest
import torch
from built_once import BuiltOnce
from s2_reference_families import flux2_three_pass

import s2fast
from s2fast import S2Config
from s2fast import tiny_families as tf

STEPS = 4
MASKS = ((1,), (2, 3), (), (4,))  # block 1 is the second double block; 2-4 are single blocks
BATCH_TOL = dict(atol=2e-5, rtol=2e-5)
EXACT = dict(atol=0, rtol=0)
SEPARATE = dict(fork_mode="separate")


class Case:
    def __init__(self, klein=False, is_distilled=False):
        self.shape = tf.Flux2Shape(guidance_embeds=not klein)
        self.pipe = tf.flux2_pipeline(self.shape, klein=klein, is_distilled=is_distilled)
        self.size = tf.flux2_image_size(self.shape)
        self.emb = tf.flux2_embeddings(self.shape)
        self.cfg = klein and not is_distilled
        if not klein:  # Flux2Pipeline has no negative prompt
            self.emb.pop("negative_prompt_embeds")

    def __call__(self, lam=4.0, **more):
        final = {}

        def keep(pipe, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        self.pipe(**self.emb, **self.size, num_inference_steps=STEPS, guidance_scale=lam, output_type="latent",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=keep, **more)
        return final["latents"]

    def reference(self, masks, omega=0.5, lam=4.0):
        guidance = None if isinstance(self.pipe, _klein()) else lam
        return flux2_three_pass(self.pipe, self.emb, masks, steps=STEPS, lam=lam, omega=omega, cfg=self.cfg,
                                guidance=guidance, **self.size)


def _klein():
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


_BUILD = {"dev": lambda: Case(), "klein": lambda: Case(klein=True),
          "klein_distilled": lambda: Case(klein=True, is_distilled=True)}
_CASES = BuiltOnce(_BUILD)


@pytest.fixture(params=list(_BUILD))
def case(request):
    yield from _CASES.unwrapped_after(request.param)


def test_omega_zero_is_stock_and_unwrap_is_bit_exact(case):
    stock = case()
    s2fast.wrap(case.pipe, S2Config(omega=0.0))
    torch.testing.assert_close(case(), stock, **(BATCH_TOL if case.cfg else EXACT))
    s2fast.wrap(case.pipe, S2Config(omega=0.0, batch_branches=False))
    torch.testing.assert_close(case(), stock, **EXACT)
    s2fast.unwrap(case.pipe)
    torch.testing.assert_close(case(), stock, **EXACT)


def test_s2_matches_a_plain_three_pass_loop(case):
    expected = case.reference(MASKS)
    s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=MASKS, **SEPARATE))
    got = case()
    torch.testing.assert_close(got, expected, **(BATCH_TOL if case.cfg else EXACT))
    assert s2fast.trace(case.pipe) == MASKS
    s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=MASKS, batch_branches=False, **SEPARATE))
    torch.testing.assert_close(case(), expected, **EXACT)
    s2fast.wrap(case.pipe, S2Config(omega=0.0))
    assert (case() - got).abs().max() > 1e-3  # S² is visible


def test_skipping_the_last_double_block_and_the_first_single_block():
    """The forward joins the streams between the two block kinds; a mask across that seam must still match."""
    case = _CASES["dev"]
    masks = ((1, 2), (1,), (2,), (1, 2))
    expected = case.reference(masks)
    s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=masks, **SEPARATE))
    try:
        torch.testing.assert_close(case(), expected, **EXACT)
    finally:
        s2fast.unwrap(case.pipe)


def test_images_per_prompt_at_omega_zero_is_stock():
    case = _CASES["klein"]
    stock = case(num_images_per_prompt=2)
    s2fast.wrap(case.pipe, S2Config(omega=0.0))
    try:
        torch.testing.assert_close(case(num_images_per_prompt=2), stock, **BATCH_TOL)
    finally:
        s2fast.unwrap(case.pipe)


def test_the_kv_cache_pipeline_is_refused_by_name():
    from diffusers import Flux2KleinKVPipeline

    case = _CASES["klein"]
    kv = Flux2KleinKVPipeline(**case.pipe.components)
    with pytest.raises(ValueError, match="does not support Flux2KleinKVPipeline"):
        s2fast.wrap(kv, S2Config())
    assert s2fast.config_of(kv) is None


def test_klein_with_a_reference_image_matches_the_reference_and_refuses_a_forced_fused_step():
    """A reference image appends its tokens after the latents' and the pipeline keeps the first ``latents`` tokens
    of the prediction: Eq. 4 over every token, cut by the pipeline, is the reference's Eq. 4 on the cut tokens. The
    prediction is longer than x_t, so the fused step (which needs them shaped alike) runs unfused under "auto" and
    ``fused_step=True`` fails naming the shapes (bad input)."""
    import numpy as np
    from PIL import Image

    case = _CASES["klein"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 64, 3), dtype=np.uint8))
    stock = case(image=image)
    expected = flux2_three_pass(case.pipe, case.emb, MASKS, steps=STEPS, lam=4.0, omega=0.5, cfg=True, image=image,
                                **case.size)
    try:
        s2fast.wrap(case.pipe, S2Config(omega=0.0, batch_branches=False))
        torch.testing.assert_close(case(image=image), stock, **EXACT)
        s2fast.wrap(case.pipe, S2Config(omega=0.5, masks=MASKS, batch_branches=False, **SEPARATE))
        got = case(image=image)
        torch.testing.assert_close(got, expected, **EXACT)
        assert (got - stock).abs().max() > 1e-3
        s2fast.wrap(case.pipe, S2Config(omega=0.5, fused_step=True))
        with pytest.raises(ValueError, match="not shaped like the prediction"):
            case(image=image)
    finally:
        s2fast.unwrap(case.pipe)


def test_a_mask_past_the_last_single_block_is_refused_at_wrap():
    """Bad input: block indices run over the double blocks then the single ones (5 here); index 5 does not exist."""
    case = _CASES["dev"]
    with pytest.raises(ValueError, match="drops block 5, but the model has 5 blocks"):
        s2fast.wrap(case.pipe, S2Config(masks=((5,), (1,), (), (2,))))
    assert s2fast.config_of(case.pipe) is None
