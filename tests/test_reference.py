"""The naive three-pass baseline (s2fast.reference) samples Eq. 4 too: it must agree with the engine."""

import torch

import s2fast
from s2fast import S2Config
from s2fast.reference import wrap_three_pass

MASKS = ((2,), (1, 3), (), (4,))


def test_three_pass_baseline_matches_the_test_reference_and_the_engine(family):
    expected = family.reference(MASKS, omega=0.5)
    wrap_three_pass(family.pipe, S2Config(omega=0.5, masks=MASKS))
    naive = family()
    # SD3: the baseline's batched [uncond, cond] call is the stock one, the sub-network a batch-B call like the test
    # reference: exact where the batch sizes agree. Flux's reference runs uncond and cond separately: rounding.
    torch.testing.assert_close(naive, expected, atol=2e-5, rtol=1e-5)
    submodules = list(family.pipe.transformer.modules())[1:]  # the root holds the wrap's own forward
    assert all("forward" not in m.__dict__ for m in submodules)  # the skips were undone
    s2fast.wrap(family.pipe, S2Config(omega=0.5, masks=MASKS))
    torch.testing.assert_close(family(), naive, atol=2e-5, rtol=1e-5)
