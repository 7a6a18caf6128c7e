"""Per-step cost of S² against CFG on a 24-block SD3-shaped transformer (hidden 256, 32×32 latents, 77 text
tokens; random weights, fp32, CPU unless CUDA is there): the transformer work and the Eq. 4 combination of one
denoising step, without the scheduler or the VAE (the same for every method).

Cases: the stock forward on [uncond, cond] (CFG, the baseline of every ratio), s2fast's own CFG path, the naive
three-pass S² (stock batched call + a third forward with the blocks skipped), and s2fast S² with each option.
The block-row floor (the cost model of docs/PERFORMANCE.md) of each case is in extra_info and in the summary.

    make bench                       # or: .venv/bin/pytest benchmarks/ --benchmark-only
"""

import pytest
import torch
from s2fast.kernels import guided_prediction

from s2fast import tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.sd3 import SD3Adapter
from s2fast.engine import EngineOptions, block_rows, predict
from s2fast.reference import three_pass

SHAPE = tiny.BENCH_SD3
L = SHAPE.num_layers
LAMBDA, OMEGA = 7.5, 0.25
# Two of the 23 droppable blocks, as drop_ratio 0.1 draws: first dropped block at E[k] = 8, at 1 (worst) and 20.
MASKS = {"k8": (8, 15), "k1": (1, 12), "k20": (20, 22)}
ROUNDS = 12


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    pipe = tiny.sd3_pipeline(SHAPE, with_vae=False)
    model, adapter = pipe.transformer, SD3Adapter()
    rows = BranchRows(adapter.batched_inputs, 2, stacked=tiny.sd3_step_inputs(SHAPE))
    yield model, adapter, rows
    torch.set_grad_enabled(True)


def _combine(preds, n_subs):
    return guided_prediction(preds[1], preds[0], preds[2:2 + n_subs], LAMBDA, OMEGA)


def _stock_cfg(model, rows):
    u, c = model(**rows.stacked(), return_dict=False)[0].chunk(2)
    return guided_prediction(c, u, [], LAMBDA, OMEGA)


CASES = {
    # case: (function(model, adapter, rows, masks) -> D, block-row count of the case)
    "cfg-stock": (lambda m, a, r, s: _stock_cfg(m, r), lambda s: 2 * L),
    "cfg-s2fast": (lambda m, a, r, s: _combine(predict(a, m, r, []), 0), lambda s: 2 * L),
    "s2-naive-three-pass": (lambda m, a, r, s: _combine(three_pass(a, m, r, s), len(s)),
                            lambda s: block_rows(L, 2, s, reuse_prefix=False)),
    "s2-s2fast-join": (lambda m, a, r, s: _combine(predict(a, m, r, s, EngineOptions(fork_mode="join")), len(s)),
                       lambda s: block_rows(L, 2, s)),
    "s2-s2fast-separate": (lambda m, a, r, s: _combine(predict(a, m, r, s, EngineOptions()), len(s)),
                           lambda s: block_rows(L, 2, s)),
    "s2-s2fast-no-reuse": (lambda m, a, r, s: _combine(predict(a, m, r, s, EngineOptions(reuse_prefix=False)), len(s)),
                           lambda s: block_rows(L, 2, s, reuse_prefix=False)),
    "s2-s2fast-unbatched": (lambda m, a, r, s: _combine(predict(a, m, r, s, EngineOptions(batch_branches=False)), len(s)),
                            lambda s: block_rows(L, 2, s)),
}


@pytest.mark.parametrize("mask_name", MASKS)
def test_step(interleaved, setup, mask_name):
    model, adapter, rows = setup
    subnets = [MASKS[mask_name]]
    cases = {name: (lambda fn=fn: fn(model, adapter, rows, subnets)) for name, (fn, _) in CASES.items()}
    floors = {name: {"floor_ratio": rows_of(subnets) / (2 * L)} for name, (_, rows_of) in CASES.items()}
    interleaved(f"sd3-24x256 step, mask {MASKS[mask_name]}", cases, "cfg-stock", ROUNDS, floors)


def test_block_batch_scaling(interleaved, setup):
    """One block at batch 1, 2, 3: are the sub-network rows cheaper joined (3B) or separate (2B + B)?"""
    model, _, _ = setup
    block = model.transformer_blocks[5]
    g = torch.Generator().manual_seed(0)

    def inputs(batch):
        return (torch.randn(batch, (SHAPE.latent_size // 2) ** 2, SHAPE.hidden, generator=g),
                torch.randn(batch, SHAPE.text_tokens, SHAPE.hidden, generator=g),
                torch.randn(batch, SHAPE.hidden, generator=g))

    batches = {b: inputs(b) for b in (1, 2, 3)}
    cases = {f"batch-{b}": (lambda x=x: block(*x)) for b, x in batches.items()}
    interleaved("one SD3 block (hidden 256, 333 tokens) by batch", cases, "batch-1", 4 * ROUNDS)
