"""Per-step cost of S² against CFG on a 24-block Wan-shaped transformer (4 heads × 48, 5 latent frames of 16×16 =
320 video tokens, 64 text tokens; random weights, fp32, CPU unless CUDA is there): the transformer work and the
Eq. 4 combination of one denoising step, without the scheduler or the VAE (the same for every method).

Wan's own loop calls the transformer twice per step, cond then uncond, at batch B each: that is the baseline
("cfg-stock"). The naive S² adds a third batch-B call with the masked blocks skipped; s2fast runs uncond and cond in
one batch-2B call and forks the sub-network off the cond rows at its first dropped block. The block-row floor (the
cost model of docs/PERFORMANCE.md) of each case is in extra_info and in the summary.

    .venv/bin/pytest benchmarks/test_step_cost_wan.py --benchmark-only
"""

import pytest
import torch
from s2fast.kernels import guided_prediction

from s2fast import tiny
from s2fast.adapters.base import BranchRows
from s2fast.adapters.wan import WanAdapter
from s2fast.engine import EngineOptions, block_rows, predict
from s2fast.reference import skipping

SHAPE = tiny.BENCH_WAN
L = SHAPE.num_layers
LAMBDA, OMEGA = 5.0, 0.25
# Two of the 23 droppable blocks, as drop_ratio 0.1 draws: first dropped block at E[k] = 8, at 1 (worst) and 20.
MASKS = {"k8": (8, 15), "k1": (1, 12), "k20": (20, 22)}
ROUNDS = 12


@pytest.fixture(scope="module")
def setup():
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model, adapter = tiny.wan_transformer(SHAPE), WanAdapter()
    emb = tiny.wan_embeddings(SHAPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, SHAPE.latent_frames, SHAPE.latent_size, SHAPE.latent_size, generator=g)
    cond = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb["prompt_embeds"],
                encoder_hidden_states_image=None, attention_kwargs=None)
    uncond = dict(cond, encoder_hidden_states=emb["negative_prompt_embeds"])
    rows = BranchRows(adapter.batched_inputs, 2, branches=[uncond, cond])
    yield model, adapter, rows
    torch.set_grad_enabled(True)


def _forward(model, inputs):
    return model(**inputs, return_dict=False)[0]


def _stock_cfg(model, rows):
    # the pipeline's loop: cond, then uncond, two batch-B calls
    c = _forward(model, rows.branch(1))
    u = _forward(model, rows.branch(0))
    return guided_prediction(c, u, [], LAMBDA, OMEGA)


def _naive(model, adapter, rows, subnets):
    c = _forward(model, rows.branch(1))
    u = _forward(model, rows.branch(0))
    subs = []
    for mask in subnets:
        with skipping(adapter, adapter.blocks(model), mask):
            subs.append(_forward(model, rows.branch(1)))
    return guided_prediction(c, u, subs, LAMBDA, OMEGA)


def _s2fast(model, adapter, rows, subnets, options=None):
    preds = predict(adapter, model, rows, subnets, options or EngineOptions())
    return guided_prediction(preds[1], preds[0], preds[2:], LAMBDA, OMEGA)


CASES = {
    # case: (function(model, adapter, rows, masks) -> D, block-row count of the case)
    "cfg-stock": (lambda m, a, r, s: _stock_cfg(m, r), lambda s: 2 * L),
    "cfg-s2fast": (lambda m, a, r, s: _s2fast(m, a, r, []), lambda s: 2 * L),
    "s2-naive-three-pass": (lambda m, a, r, s: _naive(m, a, r, s), lambda s: block_rows(L, 2, s, reuse_prefix=False)),
    "s2-s2fast-separate": (lambda m, a, r, s: _s2fast(m, a, r, s), lambda s: block_rows(L, 2, s)),
    "s2-s2fast-join": (lambda m, a, r, s: _s2fast(m, a, r, s, EngineOptions(fork_mode="join")),
                       lambda s: block_rows(L, 2, s)),
}


@pytest.mark.parametrize("mask_name", MASKS)
def test_wan_step(interleaved, setup, mask_name):
    model, adapter, rows = setup
    subnets = [MASKS[mask_name]]
    cases = {name: (lambda fn=fn: fn(model, adapter, rows, subnets)) for name, (fn, _) in CASES.items()}
    floors = {name: {"floor_ratio": rows_of(subnets) / (2 * L)} for name, (_, rows_of) in CASES.items()}
    interleaved(f"wan-24x192 step, mask {MASKS[mask_name]}", cases, "cfg-stock", ROUNDS, floors)
