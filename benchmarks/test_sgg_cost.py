"""Per-sample cost of segmented guidance (SGG) against CFG on the 24-block SD3-shaped transformer of
test_step_cost.py (hidden 256, 32×32 latents, 77 text tokens; random weights, fp32, CPU unless CUDA is there).

A "sample" is the transformer work and the guidance combination of every step of a sampling run with SGG's default
split (CFG on the first half of the steps, skip-layer guidance with blocks 7, 8, 9 on the second half), without the
scheduler or the VAE (the same for every method). Four steps keep a round short; the cost per sample has the same
ratio for any even step count, since every step of a segment costs the same.

Cases:
- cfg-stock: the stock forward on [uncond, cond] at every step (the baseline of every ratio);
- sgg-reference-loop: the loop of the SGG authors' code: the batch-2 CFG forward at every step (its uncond half
  thrown away in the skip segment), plus a sequential cond forward with ``skip_layers`` in the skip segment;
- sgg-s2fast: s2fast's plan for SGGConfig() on its engine: only the cond rows outside cfg_window, the skip rows
  forked off them at block 7.
The block-row floor of each case (its block-rows over CFG's) is in extra_info and in the summary.

    .venv/bin/pytest benchmarks/test_sgg_cost.py --benchmark-only
"""

import pytest
import torch
from s2fast.kernels import guided_prediction

from s2fast import SGGConfig, tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.engine import block_rows, predict

SHAPE = tiny.BENCH_SD3
L = SHAPE.num_layers
LAMBDA = 4.5      # SD3-medium's usual guidance scale
STEPS = 4
ROUNDS = 6
CONFIG = SGGConfig()  # cfg_window (0, 0.5), skip_window (0.5, 1), skip_blocks (7, 8, 9), skip_scale 3


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    pipe = tiny.sd3_pipeline(SHAPE, with_vae=False)
    model, adapter = pipe.transformer, SD3Adapter()
    rows = BranchRows(adapter.batched_inputs, 2, stacked=tiny.sd3_step_inputs(SHAPE))
    yield model, adapter, rows
    torch.set_grad_enabled(True)


def _stock_cfg(model, rows):
    out = []
    for _ in range(STEPS):
        u, c = model(**rows.stacked(), return_dict=False)[0].chunk(2)
        out.append(guided_prediction(c, u, [], LAMBDA, 0.0))
    return out


def _in(window, i):
    return window[0] * STEPS <= i < window[1] * STEPS


def _reference_loop(model, rows):
    """The SGG code's loop: batch-2 CFG forward every step; the skip segment drops the uncond half and adds a
    sequential skip forward on the cond rows."""
    cond_only = rows.branch(1)
    out = []
    for i in range(STEPS):
        u, c = model(**rows.stacked(), return_dict=False)[0].chunk(2)
        d = u + LAMBDA * (c - u) if _in(CONFIG.cfg_window, i) else c
        if _in(CONFIG.skip_window, i):
            s = model(**cond_only, skip_layers=list(CONFIG.skip_blocks), return_dict=False)[0]
            d = d + CONFIG.skip_scale * (c - s)
        out.append(d)
    return out


def _s2fast(model, adapter, rows, plan):
    """What the controller does per step: the plan's rows on the engine, then the combination."""
    cond_only = rows.only(1)
    out = []
    for step in plan:
        if step.uncond:
            preds = predict(adapter, model, rows, step.subnets)
            uncond, cond, subs = preds[0], preds[1], preds[2:]
        else:
            preds = predict(adapter, model, cond_only, step.subnets)
            uncond, cond, subs = None, preds[0], preds[1:]
        scale = LAMBDA + step.guidance_offset if uncond is not None else None
        out.append(guided_prediction(cond, uncond, subs, scale, step.omega))
    return out


def _floors():
    k, d = min(CONFIG.skip_blocks), len(CONFIG.skip_blocks)
    cfg_steps = sum(_in(CONFIG.cfg_window, i) for i in range(STEPS))
    skip_steps = sum(_in(CONFIG.skip_window, i) for i in range(STEPS))
    stock = 2 * L * STEPS
    reference = 2 * L * STEPS + (L - d) * skip_steps
    s2fast = sum(block_rows(L, 2 if _in(CONFIG.cfg_window, i) else 1,
                            [CONFIG.skip_blocks] if _in(CONFIG.skip_window, i) else []) for i in range(STEPS))
    assert s2fast == L * STEPS + L * cfg_steps + (L - k - d) * skip_steps  # the cost model, written out
    return {"cfg-stock": 1.0, "sgg-reference-loop": reference / stock, "sgg-s2fast": s2fast / stock}


def test_sgg_sample(interleaved, setup):
    model, adapter, rows = setup
    plan = CONFIG.guidance_steps(STEPS, L)
    cases = {
        "cfg-stock": lambda: _stock_cfg(model, rows),
        "sgg-reference-loop": lambda: _reference_loop(model, rows),
        "sgg-s2fast": lambda: _s2fast(model, adapter, rows, plan),
    }
    # the two SGG loops compute the same D (batch rounding apart: the reference's skip pass is a batch-1 forward)
    for ref, fast in zip(cases["sgg-reference-loop"](), cases["sgg-s2fast"]()):
        torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    floors = {name: {"floor_ratio": f} for name, f in _floors().items()}
    interleaved(f"sd3-24x256 sample of {STEPS} steps, SGG default split, skip blocks {CONFIG.skip_blocks}", cases,
                "cfg-stock", ROUNDS, floors)
