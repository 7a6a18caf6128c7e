"""BlockCache and S2Config.correction_every together: each is unchanged by the other switched off, and together
the engine equals the plain cached loop (tests/step_cache_reference.py) handed the same steps, with trace_steps
reporting both what the blocks did and where the correction came from.

The correction reuse itself (which steps compute Δ) is the controller's and is checked against its own plain
reference in tests/test_correction_reuse.py; here the point is that the two mechanisms compose: a reuse step hands
the engine no sub-network, so a cached reuse step needs only the branches' residuals, and a full reuse step stores
only theirs (the next cached step with a sub-network runs fully). Tolerance atol 1e-4: the reference runs every
branch alone at batch B, the engine batches U and C (tests/test_step_cache.py states the same).
"""

import pytest
import torch
from step_cache_reference import CachedReference

import s2fast
from s2fast import BlockCache, S2Config
from s2fast.digits.model import build_scheduler, build_transformer
from s2fast.digits.pipeline import DigitsFlowPipeline

STEPS = 10
CACHE = BlockCache(threshold=0.4)


@pytest.fixture
def digits():
    torch.manual_seed(0)
    pipe = DigitsFlowPipeline(build_transformer(num_layers=4, attention_head_dim=8).eval(), build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    s2fast.unwrap(pipe)


def _sample(pipe, config, **wrap_kwargs):
    s2fast.wrap(pipe, config, **wrap_kwargs)
    return pipe([3, 7, 0], guidance_scale=4.0, num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_each_is_unchanged_by_the_other_switched_off(digits):
    base = S2Config(omega=0.5, seed=1)
    reuse_only = _sample(digits, base.replace(correction_every=2))
    reuse_records = s2fast.trace_steps(digits)
    assert torch.equal(_sample(digits, base.replace(correction_every=2, cache=BlockCache(threshold=0.0))),
                       reuse_only)
    assert s2fast.trace_steps(digits) == reuse_records
    cache_only = _sample(digits, base.replace(cache=CACHE))
    cache_records = s2fast.trace_steps(digits)
    assert torch.equal(_sample(digits, base.replace(cache=CACHE, correction_every=1)), cache_only)
    assert s2fast.trace_steps(digits) == cache_records


def test_together_the_engine_equals_the_plain_cached_loop(digits):
    config = S2Config(omega=0.5, seed=1, cache=CACHE, correction_every=2)
    reference = CachedReference(CACHE, STEPS)
    expected = _sample(digits, config, _predictor=reference)
    expected_records = s2fast.trace_steps(digits)
    got = _sample(digits, config)
    records = s2fast.trace_steps(digits)
    assert records == expected_records
    assert [r.blocks for r in records] == reference.log
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    blocks = [r.blocks for r in records]
    corrections = [r.correction for r in records]
    assert "cached" in blocks
    # both sources of a reused correction occur: a full step that reuses Δ and a step that computes it
    assert any(b == "full" and c == "reused" for b, c in zip(blocks, corrections))
    assert "computed" in corrections
    # and the two together differ from either alone (so the equality above compares something of both)
    for alone in (config.replace(cache=None), config.replace(correction_every=1)):
        assert (_sample(digits, alone) - got).abs().max() > 1e-3
