"""The Eq. 4 combination op (s2fast.kernels.guided_prediction) against float64 and the pipelines' own CFG line."""

import pytest
import torch
from s2fast.kernels import guided_prediction


def _inputs(dtype, shape=(2, 16, 9, 7), n_subs=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, c = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    subs = [torch.randn(shape, generator=g).to(dtype) for _ in range(n_subs)]
    return u, c, subs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_without_subnetwork_equals_the_pipelines_cfg_line_bit_for_bit(dtype):
    u, c, _ = _inputs(dtype)
    torch.testing.assert_close(guided_prediction(c, u, [], 7.5, 0.25), u + 7.5 * (c - u), atol=0, rtol=0)
    assert guided_prediction(c, None, [], None, 0.25) is c


@pytest.mark.parametrize("n_subs", [1, 4])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_matches_float64_formula(n_subs, with_uncond):
    u, c, subs = _inputs(torch.float32, n_subs=n_subs)
    u64, c64, s64 = u.double(), c.double(), torch.stack(subs).double().mean(0)
    base = u64 + 7.5 * (c64 - u64) if with_uncond else c64
    expected = base - 0.25 * (s64 - c64)
    got = guided_prediction(c, u if with_uncond else None, subs, 7.5, 0.25)
    # fp32: a handful of roundings of values up to ~|7.5·6|, so a few ulp of 50 (~4e-6) is the scale of the error.
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-6)


def test_uncond_without_scale_is_an_error():
    u, c, subs = _inputs(torch.float32)
    with pytest.raises(ValueError, match="guidance_scale"):
        guided_prediction(c, u, subs, None, 0.25)
